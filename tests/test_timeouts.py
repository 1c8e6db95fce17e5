"""Idle and absolute timeouts, enforced on the server from stored timestamps."""

from __future__ import annotations

import time

from flask.testing import FlaskClient

from .conftest import AppFactory
from .support import FakeClock


def alive(client: FlaskClient) -> bool:
    return bool(client.get("/get/x").get_json()["value"] == "here")


def test_idle_timeout(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app(CLOAKROOM_IDLE_TIMEOUT=600, CLOAKROOM_TOUCH_INTERVAL=60)
    client = app.test_client()
    client.post("/set/x", json="here")
    clock.advance(seconds=599)
    assert alive(client)
    clock.advance(seconds=599)  # the read above recorded activity
    assert alive(client)
    clock.advance(seconds=601)
    assert not alive(client)


def test_activity_is_recorded_at_most_once_per_touch_interval(
    make_app: AppFactory, clock: FakeClock
) -> None:
    app, _, store = make_app(CLOAKROOM_IDLE_TIMEOUT=600, CLOAKROOM_TOUCH_INTERVAL=60)
    client = app.test_client()
    client.post("/set/x", json="here")
    store.reset()
    for _ in range(5):  # 5 reads within 50 seconds: no write
        clock.advance(seconds=10)
        assert alive(client)
    assert store.writes == 0
    clock.advance(seconds=15)  # 65 s since the last write: one touch
    assert alive(client)
    assert store.writes == 1
    assert alive(client)
    assert store.writes == 1


def test_idle_expiry_is_never_late_and_at_most_one_touch_interval_early(
    make_app: AppFactory, clock: FakeClock
) -> None:
    app, _, _ = make_app(CLOAKROOM_IDLE_TIMEOUT=600, CLOAKROOM_TOUCH_INTERVAL=60)
    client = app.test_client()
    client.post("/set/x", json="here")
    clock.advance(seconds=59)
    assert alive(client)  # within the touch interval: activity not recorded
    clock.advance(seconds=600 - 59)  # 600 s after the recorded activity
    assert not alive(client)


def test_absolute_timeout_ends_even_an_active_session(
    make_app: AppFactory, clock: FakeClock
) -> None:
    app, _, _ = make_app(CLOAKROOM_IDLE_TIMEOUT=1800, CLOAKROOM_ABSOLUTE_TIMEOUT=3600 * 12)
    client = app.test_client()
    client.post("/set/x", json="here")
    for _ in range(71):  # active every 10 minutes for 11 h 50 min
        clock.advance(minutes=10)
        assert alive(client)
    clock.advance(minutes=10)
    assert not alive(client)


def test_absolute_timeout_restarts_at_login(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app(CLOAKROOM_IDLE_TIMEOUT=1800, CLOAKROOM_ABSOLUTE_TIMEOUT=3600)
    client = app.test_client()
    client.post("/set/x", json="here")
    clock.advance(minutes=25)
    client.post("/login/alice")
    for _ in range(5):
        clock.advance(minutes=10)
        assert alive(client)  # 75 min since creation, 50 since login
    clock.advance(minutes=10)
    assert not alive(client)


def test_remember_me_uses_the_long_timeouts(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app()
    remembered = app.test_client()
    remembered.post("/set/x", json="here")
    response = remembered.post("/login/alice?remember=1")
    assert "Expires=" in response.headers["Set-Cookie"]
    plain = app.test_client()
    plain.post("/set/x", json="here")
    plain.post("/login/bob")
    clock.advance(days=1)
    assert alive(remembered)
    assert not alive(plain)
    for _ in range(3):
        clock.advance(days=9)
        assert alive(remembered)
    clock.advance(days=3)  # 31 days after login
    assert not alive(remembered)


def test_timeouts_with_the_real_clock(make_app: AppFactory) -> None:
    """The one test that waits: proves the wiring to time.time() works."""
    from flask import Flask

    from flask_cloakroom import Cloakroom

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s" * 32,
        CLOAKROOM_STORE="memory://",
        CLOAKROOM_IDLE_TIMEOUT=0.6,
        CLOAKROOM_ABSOLUTE_TIMEOUT=5,
        CLOAKROOM_TOUCH_INTERVAL=0.1,
    )
    from .conftest import add_views

    cloak = Cloakroom(app)
    add_views(app, cloak)
    client = app.test_client()
    client.post("/set/x", json="here")
    time.sleep(0.3)
    assert alive(client)
    time.sleep(0.8)
    assert not alive(client)
