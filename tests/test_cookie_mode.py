"""cookie:// mode: the whole session in the cookie, encrypted, with server-enforced timeouts."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask, jsonify, session
from flask.testing import FlaskClient
from markupsafe import Markup

from flask_cloakroom import Cloakroom, CookieTooLarge, NotSupported, generate_key

from .conftest import add_views
from .support import FakeClock

MARKER = "top-secret-cart-contents"


def make(clock: FakeClock, **config: Any) -> tuple[Flask, Cloakroom]:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="cookie-mode-secret-" + "x" * 16, CLOAKROOM_STORE="cookie://", TESTING=True
    )
    app.config.update(config)
    cloak = Cloakroom(app, clock=clock)
    add_views(app, cloak)

    @app.get("/types")
    def types() -> Any:
        session["t"] = (
            1,
            b"\x00",
            Markup("<b>"),
            uuid.UUID(int=5),
            datetime(2030, 1, 1, tzinfo=UTC),
        )
        return "ok"

    @app.get("/types/check")
    def types_check() -> Any:
        return jsonify(
            session["t"]
            == (1, b"\x00", Markup("<b>"), uuid.UUID(int=5), datetime(2030, 1, 1, tzinfo=UTC))
        )

    return app, cloak


def cookie(client: FlaskClient) -> str:
    value = client.get_cookie("session")
    assert value is not None
    return value.value


def test_values_round_trip_and_the_cookie_is_unreadable(clock: FakeClock) -> None:
    app, _ = make(clock)
    client = app.test_client()
    client.post("/set/cart", json=MARKER)
    client.get("/types")
    assert client.get("/get/cart").get_json() == {"value": MARKER}
    assert client.get("/types/check").get_json() is True
    value = cookie(client)
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    assert MARKER.encode() not in raw
    assert MARKER.encode() not in value.encode()
    assert raw[0] == 0x01  # sealed


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "unicode"])
def test_tampered_cookies_give_an_empty_session(clock: FakeClock, damage: str) -> None:
    app, _ = make(clock)
    client = app.test_client()
    client.post("/login/alice")
    value = cookie(client)
    forged = {
        "flip": value[:40] + ("A" if value[40] != "A" else "B") + value[41:],
        "truncate": value[: len(value) // 2],
        "garbage": "not-a-cookie",
        "empty": "",
        "unicode": "ünïcødé",
    }[damage]
    thief = app.test_client()
    thief.set_cookie("session", forged)
    response = thief.get("/whoami")
    assert response.status_code == 200
    assert response.get_json() == {"user": None}


def test_a_cookie_from_another_cookie_name_does_not_open(clock: FakeClock) -> None:
    app, _ = make(clock, SESSION_COOKIE_NAME="other")
    client = app.test_client()
    client.post("/login/alice")
    value = client.get_cookie("other")
    assert value is not None
    app2, _ = make(clock)  # same keys, another cookie name
    client2 = app2.test_client()
    client2.set_cookie("session", value.value)
    assert client2.get("/whoami").get_json() == {"user": None}


def test_replay_after_expiry_fails(clock: FakeClock) -> None:
    app, _ = make(clock, CLOAKROOM_IDLE_TIMEOUT=600, CLOAKROOM_ABSOLUTE_TIMEOUT=3600)
    client = app.test_client()
    client.post("/login/alice")
    captured = cookie(client)
    clock.advance(seconds=601)
    thief = app.test_client()
    thief.set_cookie("session", captured)
    response = thief.get("/whoami")
    assert response.get_json() == {"user": None}
    assert "session=;" in response.headers["Set-Cookie"]


def test_absolute_timeout_from_inside_the_ciphertext(clock: FakeClock) -> None:
    app, _ = make(clock, CLOAKROOM_IDLE_TIMEOUT=600, CLOAKROOM_ABSOLUTE_TIMEOUT=3600)
    client = app.test_client()
    client.post("/login/alice")
    for _ in range(11):
        clock.advance(seconds=300)
        assert client.get("/whoami").get_json() == {"user": "alice"}
    clock.advance(seconds=300)
    assert client.get("/whoami").get_json() == {"user": None}


def test_read_only_requests_send_no_cookie_until_a_touch_is_due(clock: FakeClock) -> None:
    app, _ = make(clock, CLOAKROOM_TOUCH_INTERVAL=60)
    client = app.test_client()
    client.post("/set/x", json=1)
    clock.advance(seconds=30)
    assert "Set-Cookie" not in client.get("/get/x").headers
    clock.advance(seconds=31)
    assert "Set-Cookie" in client.get("/get/x").headers


def test_an_oversized_session_is_refused_before_the_cookie_passes_4096_bytes(
    clock: FakeClock,
) -> None:
    app, _ = make(clock)
    client = app.test_client()
    client.post("/set/small", json="fits")
    before = cookie(client)
    with pytest.raises(CookieTooLarge) as caught:
        client.post("/set/big", json="x" * 3500)
    assert caught.value.limit == 4093
    assert caught.value.largest[0][0] == "big"
    assert cookie(client) == before
    assert client.get("/get/small").get_json() == {"value": "fits"}


def test_key_rotation(clock: FakeClock) -> None:
    key_a, key_b = generate_key(), generate_key()
    old, _ = make(clock, CLOAKROOM_ENCRYPTION_KEYS=[key_a])
    client = old.test_client()
    client.post("/login/alice")
    sealed_under_a = cookie(client)
    rotated, _ = make(clock, CLOAKROOM_ENCRYPTION_KEYS=[key_b, key_a])
    moved = rotated.test_client()
    moved.set_cookie("session", sealed_under_a)
    response = moved.get("/whoami")
    assert response.get_json() == {"user": "alice"}
    assert "Set-Cookie" in response.headers  # re-sealed under the new key at once
    only_b, _ = make(clock, CLOAKROOM_ENCRYPTION_KEYS=[key_b])
    final = only_b.test_client()
    final.set_cookie("session", cookie(moved))
    assert final.get("/whoami").get_json() == {"user": "alice"}
    final.set_cookie("session", sealed_under_a)
    assert final.get("/whoami").get_json() == {"user": None}


def test_keys_derived_from_secret_key_rotate_with_its_fallbacks(clock: FakeClock) -> None:
    old, _ = make(clock)
    client = old.test_client()
    client.post("/login/alice")
    rotated, _ = make(
        clock,
        SECRET_KEY="a-new-secret-key-" + "y" * 20,
        SECRET_KEY_FALLBACKS=["cookie-mode-secret-" + "x" * 16],
    )
    moved = rotated.test_client()
    moved.set_cookie("session", cookie(client))
    assert moved.get("/whoami").get_json() == {"user": "alice"}


def test_login_rotates_and_logout_clears_but_copies_stay_valid(clock: FakeClock) -> None:
    app, _ = make(clock)
    client = app.test_client()
    client.post("/set/cart", json=["tea"])
    before = cookie(client)
    client.post("/login/alice")
    assert cookie(client) != before
    assert client.get("/get/cart").get_json() == {"value": ["tea"]}
    copy = cookie(client)
    response = client.post("/logout")
    assert "session=;" in response.headers["Set-Cookie"]
    assert client.get("/whoami").get_json() == {"user": None}
    # The documented limit of cookie mode: a copy taken before logout still works
    # until it expires, because the server keeps nothing to revoke.
    thief = app.test_client()
    thief.set_cookie("session", copy)
    assert thief.get("/whoami").get_json() == {"user": "alice"}


def test_server_side_operations_explain_why_they_cannot_work(clock: FakeClock) -> None:
    app, cloak = make(clock)
    with app.test_request_context():
        with pytest.raises(NotSupported, match="cookie://"):
            cloak.sessions("alice")
        with pytest.raises(NotSupported, match="revoke"):
            cloak.revoke("0" * 32)
        with pytest.raises(NotSupported, match="revoke"):
            cloak.revoke_user("alice")
        assert cloak.purge_expired() == 0


def test_a_password_change_ends_the_users_other_cookies_through_the_fingerprint(
    clock: FakeClock,
) -> None:
    passwords = {"alice": "hash-1"}
    app, cloak = make(clock, CLOAKROOM_CREDENTIAL_FINGERPRINT=passwords.get)

    @app.post("/password")
    def change_password() -> Any:
        passwords["alice"] = "hash-2"
        return jsonify(ended=cloak.credentials_changed())

    laptop, phone = app.test_client(), app.test_client()
    laptop.post("/login/alice")
    phone.post("/login/alice")
    stolen = cookie(laptop)  # copied before the change
    assert laptop.post("/password").get_json() == {"ended": 0}  # no store: nothing to count
    assert laptop.get("/whoami").get_json() == {"user": "alice"}  # re-sealed, new fingerprint
    assert phone.get("/whoami").get_json() == {"user": None}
    thief = app.test_client()
    thief.set_cookie("session", stolen)
    assert thief.get("/whoami").get_json() == {"user": None}


def test_without_a_fingerprint_a_password_change_cannot_end_other_cookies_and_says_so(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, cloak = make(clock)

    @app.post("/password")
    def change_password() -> Any:
        return jsonify(ended=cloak.credentials_changed())

    laptop, phone = app.test_client(), app.test_client()
    laptop.post("/login/alice")
    phone.post("/login/alice")
    with caplog.at_level("WARNING", logger="flask_cloakroom"):
        assert laptop.post("/password").get_json() == {"ended": 0}
    assert "without CLOAKROOM_CREDENTIAL_FINGERPRINT" in caplog.text
    # The documented limit: the other browser stays signed in until its cookie expires.
    assert phone.get("/whoami").get_json() == {"user": "alice"}
    assert laptop.get("/whoami").get_json() == {"user": "alice"}


def test_only_the_first_four_cookies_of_the_name_are_tried(clock: FakeClock) -> None:
    """A browser may send several cookies of the session's name (a parent domain's, an
    old path's): the first that opens wins.  Each costs a decryption, so no more than
    four are tried: a good cookie after four bad ones is not, however many are sent."""
    app, _ = make(clock)
    client = app.test_client()
    client.post("/login/alice")
    good = cookie(client)
    for bad_before, opened in ((3, "alice"), (4, None)):
        jar = "; ".join([f"session=garbage{n}" for n in range(bad_before)] + [f"session={good}"])
        fresh = app.test_client(use_cookies=False)
        response = fresh.get("/whoami", headers={"Cookie": jar})
        assert response.get_json() == {"user": opened}
