"""Login, logout, rotation, listing and revoking sessions, on every store."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask, jsonify, request, session
from flask.testing import FlaskClient

from flask_cloakroom import Cloakroom, NoSession
from flask_cloakroom.manager import MIN_WRITE_ATTEMPTS
from flask_cloakroom.stores import Store
from flask_cloakroom.stores.base import Record, paced
from flask_cloakroom.stores.memory import MemoryStore

from .conftest import AppFactory
from .support import FakeClock, SlowBatch


def cookie(client: FlaskClient) -> str:
    value = client.get_cookie("session")
    assert value is not None
    return value.value


def as_user(app: Flask, user: str, agent: str = "TestBrowser/1.0") -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    client.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    client.post("/set/cart", json=["book"])
    client.post(f"/login/{user}")
    return client


def same_session(app: Flask, value: str) -> FlaskClient:
    """Another browser holding the session cookie ``value``: a concurrent request."""
    other = app.test_client()
    other.set_cookie("session", value)
    return other


def add_revoke_views(app: Flask, cloak: Cloakroom) -> None:
    @app.post("/revoke/<handle>")
    def revoke(handle: str) -> Any:
        return jsonify(ended=cloak.revoke(handle))

    @app.post("/revoke-user/<user>")
    def revoke_user(user: str) -> Any:
        keep = request.args.get("keep") == "1"
        return jsonify(ended=cloak.revoke_user(user, keep_current=keep))


def test_login_rotates_the_id_keeps_the_data_and_records_the_client(
    make_app: AppFactory, store: Store, clock: FakeClock
) -> None:
    app, cloak, _ = make_app(store)
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = "TestBrowser/1.0"
    client.post("/set/cart", json=["book"])
    before = cookie(client)
    client.post("/login/alice")
    after = cookie(client)
    assert after != before
    assert client.get("/whoami").get_json() == {"user": "alice"}
    assert client.get("/get/cart").get_json() == {"value": ["book"]}
    old = app.test_client()
    old.set_cookie("session", before)
    assert old.get("/get/cart").get_json() == {"value": None}
    with app.test_request_context():
        (info,) = cloak.sessions("alice")
    assert info.user_id == "alice"
    assert info.ip == info.login_ip == "127.0.0.1"
    assert info.user_agent == "TestBrowser/1.0"
    assert info.login_at is not None
    assert info.login_at.timestamp() == pytest.approx(clock.timestamp())
    assert info.created_at <= info.login_at <= info.last_seen_at < info.expires_at
    assert info.current is False  # listed from outside that session's request


def test_login_on_another_users_session_starts_clean(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    client = as_user(app, "alice")
    client.post("/set/private", json="alice's")
    client.post("/login/bob")
    assert client.get("/whoami").get_json() == {"user": "bob"}
    assert client.get("/get/private").get_json() == {"value": None}


def test_logout_ends_the_session_and_a_flash_afterwards_survives(
    make_app: AppFactory, store: Store
) -> None:
    app, cloak, _ = make_app(store)

    @app.post("/logout-and-flash")
    def logout_and_flash() -> str:
        cloak.logout()
        session["notice"] = "goodbye"
        return "ok"

    client = as_user(app, "alice")
    old = cookie(client)
    client.post("/logout-and-flash")
    assert cookie(client) != old
    assert client.get("/whoami").get_json() == {"user": None}
    assert client.get("/get/notice").get_json() == {"value": "goodbye"}
    assert client.get("/get/cart").get_json() == {"value": None}
    with app.test_request_context():
        assert cloak.sessions("alice") == []


def test_rotate_gives_a_new_id_and_kills_the_old(make_app: AppFactory, store: Store) -> None:
    app, _, _ = make_app(store)
    client = as_user(app, "alice")
    old = cookie(client)
    client.post("/rotate")
    assert cookie(client) != old
    assert client.get("/whoami").get_json() == {"user": "alice"}
    replay = same_session(app, old)
    assert replay.get("/whoami").get_json() == {"user": None}


def test_sessions_lists_a_users_sessions_newest_first(
    make_app: AppFactory, store: Store, clock: FakeClock
) -> None:
    app, _, _ = make_app(store)
    phone = as_user(app, "alice", "Phone/1")
    clock.advance(seconds=120)
    laptop = as_user(app, "alice", "Laptop/1")
    as_user(app, "bob")
    listed = laptop.get("/sessions/alice").get_json()
    assert len(listed) == 2
    assert [s["current"] for s in listed] == [True, False]
    assert phone.get("/sessions/alice").get_json()[1]["current"] is True
    assert len(laptop.get("/sessions/bob").get_json()) == 1
    assert laptop.get("/sessions/nobody").get_json() == []


def test_revoke_one_session(make_app: AppFactory, store: Store) -> None:
    app, cloak, _ = make_app(store)
    add_revoke_views(app, cloak)
    phone = as_user(app, "alice", "Phone/1")
    laptop = as_user(app, "alice", "Laptop/1")
    listed = laptop.get("/sessions/alice").get_json()
    phone_handle = next(s["handle"] for s in listed if not s["current"])
    assert laptop.post(f"/revoke/{phone_handle}").get_json() == {"ended": True}
    assert laptop.post(f"/revoke/{phone_handle}").get_json() == {"ended": False}
    assert laptop.post("/revoke/not-a-handle").get_json() == {"ended": False}
    assert phone.get("/whoami").get_json() == {"user": None}
    assert laptop.get("/whoami").get_json() == {"user": "alice"}


def test_revoking_the_current_session_logs_it_out(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()
    add_revoke_views(app, cloak)
    client = as_user(app, "alice")
    (mine,) = client.get("/sessions/alice").get_json()
    response = client.post(f"/revoke/{mine['handle']}")
    assert "session=;" in response.headers["Set-Cookie"]
    assert client.get("/whoami").get_json() == {"user": None}


def test_revoke_user_ends_all_or_all_but_current(make_app: AppFactory, store: Store) -> None:
    app, cloak, _ = make_app(store)
    add_revoke_views(app, cloak)
    clients = [as_user(app, "alice", f"Browser/{i}") for i in range(3)]
    bob = as_user(app, "bob")
    assert clients[0].post("/revoke-user/alice?keep=1").get_json() == {"ended": 2}
    assert [c.get("/whoami").get_json()["user"] for c in clients] == ["alice", None, None]
    assert clients[0].post("/revoke-user/alice").get_json() == {"ended": 1}
    assert clients[0].get("/whoami").get_json() == {"user": None}
    assert bob.get("/whoami").get_json() == {"user": "bob"}
    with app.test_request_context():
        assert cloak.revoke_user("alice") == 0


def test_a_revoked_session_is_not_resurrected_by_a_request_in_flight(
    make_app: AppFactory, store: Store
) -> None:
    app, cloak, counted = make_app(store)

    @app.post("/slow-write")
    def slow_write() -> str:
        session.get("cart")  # loaded ...
        assert cloak.handle is not None
        counted.inner.delete(cloak.handle)  # ... then revoked by someone else ...
        session["cart"] = ["resurrected?"]  # ... and then changed
        return "ok"

    client = as_user(app, "alice")
    response = client.post("/slow-write")
    assert "session=;" in response.headers["Set-Cookie"]
    assert client.get("/get/cart").get_json() == {"value": None}
    assert client.get("/whoami").get_json() == {"user": None}


def test_concurrent_changes_to_different_keys_are_merged(
    make_app: AppFactory, store: Store
) -> None:
    app, _, _ = make_app(store)
    client = app.test_client()

    @app.post("/write-b-while-someone-writes-c")
    def interleaved() -> str:
        session["b"] = 2
        other = same_session(app, cookie(client))
        other.post("/set/c", json=3)  # a concurrent request on the same session wins the race
        other.post("/pop/a")
        return "ok"

    client.post("/set/a", json=1)
    client.post("/write-b-while-someone-writes-c")
    values = {k: client.get(f"/get/{k}").get_json()["value"] for k in "abc"}
    assert values == {"a": None, "b": 2, "c": 3}


def test_a_login_that_races_a_write_to_its_session_keeps_both(
    make_app: AppFactory, store: Store
) -> None:
    """The login's new id is written with the other request's change merged in."""
    app, cloak, _ = make_app(store)
    client = app.test_client()

    @app.post("/login-while-someone-writes")
    def interleaved() -> str:
        session["b"] = 2
        cloak.login("alice")
        # Lands first: the login's rotation finds a newer record.
        same_session(app, cookie(client)).post("/set/c", json=3)
        return "ok"

    client.post("/set/a", json=1)
    before = cookie(client)
    client.post("/login-while-someone-writes")
    assert cookie(client) != before
    assert client.get("/whoami").get_json() == {"user": "alice"}
    values = {k: client.get(f"/get/{k}").get_json()["value"] for k in "abc"}
    assert values == {"a": 1, "b": 2, "c": 3}
    stale = same_session(app, before)
    assert stale.get("/whoami").get_json() == {"user": None}
    assert stale.get("/get/c").get_json() == {"value": None}  # the old id was retired
    assert [s["current"] for s in client.get("/sessions/alice").get_json()] == [True]


def test_a_login_whose_session_was_ended_meanwhile_still_logs_in_afresh(
    make_app: AppFactory, store: Store
) -> None:
    app, cloak, _ = make_app(store)
    client = app.test_client()

    @app.post("/login-while-someone-logs-out")
    def interleaved() -> str:
        cloak.login("alice")
        # Ends the session the login is about to rotate.
        same_session(app, cookie(client)).post("/logout")
        return "ok"

    client.post("/set/a", json=1)
    before = cookie(client)
    client.post("/login-while-someone-logs-out")
    assert cookie(client) != before
    assert client.get("/whoami").get_json() == {"user": "alice"}
    assert len(client.get("/sessions/alice").get_json()) == 1
    stale = same_session(app, before)
    assert stale.get("/whoami").get_json() == {"user": None}


def test_a_write_racing_a_logout_does_not_bring_the_session_back(
    make_app: AppFactory, store: Store
) -> None:
    """A request writes to a session that another request logs out meanwhile: its write
    loses the race, finds the session gone, and drops its changes; it must never write
    the session back (a logout that does not end the session)."""
    app, cloak, _ = make_app(store)

    @app.post("/write-while-someone-logs-out")
    def interleaved() -> str:
        session["b"] = 2
        assert same_session(app, before).post("/logout").status_code == 200
        return "ok"

    client = as_user(app, "alice")
    before = cookie(client)
    assert client.post("/write-while-someone-logs-out").status_code == 200
    assert client.get("/whoami").get_json() == {"user": None}
    assert client.get("/get/b").get_json() == {"value": None}
    assert client.get("/get/cart").get_json() == {"value": None}
    replay = same_session(app, before)
    assert replay.get("/whoami").get_json() == {"user": None}
    with app.test_request_context():
        assert cloak.sessions("alice") == []


class EverRaced(MemoryStore):
    """A memory store on which, while ``racing``, another writer always gets to a
    session first: every rotation finds the record one version newer than the request
    had loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.racing = True
        self.rotations = 0

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        self.rotations += 1
        current = self.load(old_key)
        if self.racing and current is not None:
            newer = current._replace(version=current.version + 1)
            assert self.save(newer, expected=current.version, now=now)
        return super().rotate(old_key, record, expected=expected, now=now)


def test_a_login_that_loses_every_race_gives_up_after_the_store_timeout(
    make_app: AppFactory,
) -> None:
    """Retries back off, so a login racing writes that never stop answers 503 once the
    store timeout has passed, not never; the session it was rotating is left as it was
    (not logged in, its data kept), and the next login goes through."""
    store = EverRaced()
    app, _, _ = make_app(store, CLOAKROOM_STORE_TIMEOUT=0.2)
    client = app.test_client()
    client.post("/set/cart", json=["book"])
    before = cookie(client)
    started = time.monotonic()
    response = client.post("/login/alice")
    assert response.status_code == 503
    assert 0.2 <= time.monotonic() - started < 2.0
    assert store.rotations >= MIN_WRITE_ATTEMPTS
    assert cookie(client) == before
    assert client.get("/whoami").get_json() == {"user": None}
    assert client.get("/get/cart").get_json() == {"value": ["book"]}
    store.racing = False
    assert client.post("/login/alice").status_code == 200
    assert client.get("/whoami").get_json() == {"user": "alice"}
    assert client.get("/get/cart").get_json() == {"value": ["book"]}


def test_an_expired_session_not_yet_purged_is_neither_listed_nor_revoked(
    make_app: AppFactory, store: Store, clock: FakeClock
) -> None:
    """Stores may return expired records from user_records(): Cloakroom leaves them out."""
    app, cloak, _ = make_app(store, CLOAKROOM_IDLE_TIMEOUT=600)
    add_revoke_views(app, cloak)
    as_user(app, "alice", "OldBrowser/1.0")
    clock.advance(seconds=400)
    current = as_user(app, "alice")
    clock.advance(seconds=300)  # the first session has been idle 700 s, the second 300 s
    listed = current.get("/sessions/alice").get_json()
    assert [s["current"] for s in listed] == [True]
    assert current.post("/revoke-user/alice").get_json() == {"ended": 1}
    assert current.get("/whoami").get_json() == {"user": None}


def test_purge_expired(make_app: AppFactory, store: Store, clock: FakeClock) -> None:
    app, cloak, _ = make_app(store)
    for i in range(3):
        as_user(app, f"user{i}")
    clock.advance(minutes=20)
    fresh = as_user(app, "fresh")
    clock.advance(minutes=15)
    with app.app_context():
        assert cloak.purge_expired() == 3
        assert cloak.purge_expired() == 0
    assert fresh.get("/whoami").get_json() == {"user": "fresh"}


def test_a_paced_purge_rests_after_each_batch_as_long_as_pace_times_the_batch() -> None:
    """The rest follows each batch's own time; the batch is reported before it."""
    now = [100.0]
    log: list[str] = []

    def sleep(seconds: float) -> None:
        log.append(f"rest {seconds:g}")
        now[0] += seconds

    rest = paced(
        lambda deleted: log.append(f"batch {deleted}"), 1.5, clock=lambda: now[0], sleep=sleep
    )
    assert rest is not None
    now[0] += 0.2  # the first batch takes 0.2 s
    rest(250)
    now[0] += 0.04  # the second 0.04 s: the rest after the first is not counted in it
    rest(7)
    assert log == ["batch 250", f"rest {0.2 * 1.5:g}", "batch 7", f"rest {0.04 * 1.5:g}"]
    quiet: list[float] = []
    silent = paced(None, 2, clock=lambda: now[0], sleep=quiet.append)
    assert silent is not None
    now[0] += 0.5
    silent(1)
    assert quiet == [1.0]


def test_pace_zero_keeps_the_callback_and_a_negative_pace_is_refused() -> None:
    def report(deleted: int) -> None:
        return None

    assert paced(report, 0) is report
    assert paced(None, 0) is None
    for wrong in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="pace must be 0 or more"):
            paced(report, wrong)


def test_purge_expired_without_rest(make_app: AppFactory, store: Store, clock: FakeClock) -> None:
    app, cloak, _ = make_app(store)
    as_user(app, "gone")
    clock.advance(minutes=40)
    with app.app_context():
        assert cloak.purge_expired(pace=0) == 1
        with pytest.raises(ValueError, match="pace"):
            cloak.purge_expired(pace=-1)


def test_the_purges_pace_comes_from_the_config_unless_the_call_names_one(
    make_app: AppFactory,
) -> None:
    slow = SlowBatch()
    app, cloak, _ = make_app(slow, CLOAKROOM_PURGE_PACE=3)
    with app.app_context():
        cloak.purge_expired()
        cloak.purge_expired(pace=0)
    rest, none = slow.rests
    assert rest is not None and rest >= 3 * 0.02  # the config's 3, not the default 1
    assert none is None  # pace 0: no rest, and no callback at all
    unpaced = SlowBatch()
    app, cloak, _ = make_app(unpaced, CLOAKROOM_PURGE_PACE=0)
    with app.app_context():
        cloak.purge_expired()
    assert unpaced.rests == [None]


def test_api_outside_a_request_explains_itself(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()
    with app.app_context(), pytest.raises(NoSession, match="no request"):
        cloak.login("alice")
    plain = Flask(__name__)
    with plain.test_request_context(), pytest.raises(NoSession, match="init_app"):
        cloak.sessions("alice")


def test_user_ids_are_text(make_app: AppFactory) -> None:
    app, cloak, _ = make_app()
    with app.test_request_context():
        cloak.login(42)
        assert cloak.user_id == "42"
        with pytest.raises(TypeError):
            cloak.login(4.2)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="1 to 255"):
            cloak.login("")


def test_one_cloakroom_serves_two_apps(clock: FakeClock) -> None:
    cloak = Cloakroom(clock=clock)
    apps = []
    for name in ("one", "two"):
        app = Flask(name)
        app.config.update(
            SECRET_KEY=f"{name}-secret-key-xxxxxxxxxxxxxxxx", CLOAKROOM_STORE="memory://"
        )
        cloak.init_app(app)

        @app.post("/login/<user>")
        def login(user: str) -> str:
            cloak.login(user)
            return "ok"

        @app.get("/whoami")
        def whoami() -> Any:
            return jsonify(user=cloak.user_id)

        apps.append(app)
    assert not hasattr(cloak, "app")
    one, two = (a.test_client() for a in apps)
    one.post("/login/alice")
    two.post("/login/bob")
    assert one.get("/whoami").get_json() == {"user": "alice"}
    assert two.get("/whoami").get_json() == {"user": "bob"}
    assert apps[0].extensions["cloakroom"].store is not apps[1].extensions["cloakroom"].store
