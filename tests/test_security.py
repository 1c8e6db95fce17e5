"""Attacks on the session cookie and the store, tried as an attacker would."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request, session
from flask.testing import FlaskClient

from flask_cloakroom import RecordTooLarge, SessionNotSerializable
from flask_cloakroom.stores import Record, open_store
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.tokens import CookieSigner, new_session_id, store_key

from .conftest import AppFactory
from .support import FakeClock


def cookie_of(client: FlaskClient, name: str = "session") -> str | None:
    cookie = client.get_cookie(name)
    return None if cookie is None else cookie.value


def set_cookie_header(response: Any) -> str:
    return ";".join(response.headers.getlist("Set-Cookie"))


def logged_in(app: Flask, user: str = "alice") -> FlaskClient:
    client = app.test_client()
    client.post("/set/secret", json="the crown jewels")
    client.post(f"/login/{user}")
    return client


def test_tampered_mac_is_rejected_without_a_store_lookup(make_app: AppFactory) -> None:
    app, _, store = make_app()
    victim = logged_in(app)
    value = cookie_of(victim)
    assert value is not None
    attacker = app.test_client()
    for forged in (
        value[:50] + ("A" if value[50] != "A" else "B") + value[51:],  # flipped MAC
        ("B" if value[0] != "B" else "C") + value[1:],  # flipped id, MAC kept
        value.split(".")[0] + "." + base64.urlsafe_b64encode(b"\0" * 16).decode().rstrip("="),
        value.split(".")[0],  # MAC dropped
    ):
        attacker.set_cookie("session", forged)
        store.reset()
        response = attacker.get("/get/secret")
        assert response.get_json() == {"value": None}
        assert store.reads == 0, "a forged cookie must cost no store traffic"
        assert "session=;" in set_cookie_header(response)  # the bad cookie is expired


def test_a_cookie_has_exactly_one_valid_spelling() -> None:
    """Base64 leaves spare bits in the last character; other spellings must not verify."""
    signer = CookieSigner(["k" * 32])
    value = signer.sign(new_session_id())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for position in (42, len(value) - 1):  # last character of the id and of the tag
        accepted = [
            c for c in alphabet if signer.unsign(value[:position] + c + value[position + 1 :])
        ]
        assert accepted == [value[position]]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "x",
        "." * 66,
        "a" * 43 + "." + "b" * 22,
        "ünïcødé" * 10,
        "a" * 4000,
        "%00%ff" * 20,
    ],
)
def test_garbage_cookies_give_a_fresh_session(make_app: AppFactory, garbage: str) -> None:
    app, _, store = make_app()
    client = app.test_client()
    client.set_cookie("session", garbage)
    store.reset()
    assert client.get("/get/x").get_json() == {"value": None}
    assert store.reads == 0
    client.post("/set/x", json=1)
    assert client.get("/get/x").get_json() == {"value": 1}


def test_a_planted_id_is_never_adopted(make_app: AppFactory) -> None:
    """A correctly signed cookie for an id with no record gets a new id on first write."""
    app, _, store = make_app()
    signer = CookieSigner([app.config["SECRET_KEY"]])
    planted = new_session_id()
    client = app.test_client()
    client.set_cookie("session", signer.sign(planted))
    client.post("/set/x", json=1)
    assert store.inner.load(store_key(planted)) is None
    issued = cookie_of(client)
    assert issued is not None
    assert issued != signer.sign(planted)
    assert client.get("/get/x").get_json() == {"value": 1}


def test_fixation_a_pre_login_cookie_is_dead_after_login(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    attacker = app.test_client()
    attacker.post("/set/cart", json=["bait"])
    planted = cookie_of(attacker)
    assert planted is not None
    victim = app.test_client()
    victim.set_cookie("session", planted)
    victim.post("/login/victim")
    assert cookie_of(victim) != planted
    assert victim.get("/whoami").get_json() == {"user": "victim"}
    assert victim.get("/get/cart").get_json() == {"value": ["bait"]}  # data kept
    # The attacker's copy of the old id is not logged in, and not even alive.
    assert attacker.get("/whoami").get_json() == {"user": None}
    assert attacker.get("/get/cart").get_json() == {"value": None}


def test_replay_after_logout_fails(make_app: AppFactory) -> None:
    app, _, store = make_app()
    client = logged_in(app)
    stolen = cookie_of(client)
    response = client.post("/logout")
    assert "session=;" in set_cookie_header(response)
    assert store.inner.count(now=0) == 0
    thief = app.test_client()
    thief.set_cookie("session", stolen or "")
    assert thief.get("/whoami").get_json() == {"user": None}
    assert thief.get("/get/secret").get_json() == {"value": None}


def test_replay_of_an_expired_cookie_fails(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, store = make_app()
    client = logged_in(app)
    stolen = cookie_of(client)
    clock.advance(minutes=31)
    thief = app.test_client()
    thief.set_cookie("session", stolen or "")
    response = thief.get("/get/secret")
    assert response.get_json() == {"value": None}
    assert "session=;" in set_cookie_header(response)
    assert store.inner.count(now=0) == 0  # the expired record was deleted on sight


def test_secret_key_fallbacks_verify_and_reissue(make_app: AppFactory) -> None:
    app, _, store = make_app()
    client = logged_in(app)
    old_cookie = cookie_of(client)
    assert old_cookie is not None
    rotated_app, _, _ = make_app(
        store.inner,
        SECRET_KEY="a-brand-new-secret-key-0123456789",
        SECRET_KEY_FALLBACKS=["test-secret-" + "k" * 20],
    )
    client2 = rotated_app.test_client()
    client2.set_cookie("session", old_cookie)
    response = client2.get("/whoami")
    assert response.get_json() == {"user": "alice"}
    new_cookie = cookie_of(client2)
    assert new_cookie is not None
    assert new_cookie != old_cookie
    assert new_cookie.split(".")[0] == old_cookie.split(".")[0]  # same id, new MAC
    # Without the fallback the old cookie is worthless.
    strict_app, _, _ = make_app(store.inner, SECRET_KEY="a-brand-new-secret-key-0123456789")
    client3 = strict_app.test_client()
    client3.set_cookie("session", old_cookie)
    assert client3.get("/whoami").get_json() == {"user": None}


def test_several_cookies_with_the_session_name(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    client = logged_in(app)
    good = cookie_of(client)
    environ = {
        "HTTP_COOKIE": f"session=garbage; session={good}; session=more",
        "HTTP_USER_AGENT": client.environ_base.get("HTTP_USER_AGENT", ""),
    }
    with app.test_request_context("/", environ_base=environ):
        opened = app.session_interface.open_session(app, request)
        assert opened is not None
        assert opened.get("secret") == "the crown jewels"


def test_store_dump_holds_no_session_id(tmp_path: Path, make_app: AppFactory) -> None:
    sql_path = tmp_path / "dump.sqlite3"
    for store in (open_store(f"sqlite:///{sql_path}"), FileStore(str(tmp_path / "files"))):
        app, _, _ = make_app(store)
        client = logged_in(app)
        value = cookie_of(client)
        assert value is not None
        text_id = value.split(".")[0]
        raw_id = base64.urlsafe_b64decode(text_id + "=")
        if isinstance(store, FileStore):
            files = [p for p in Path(store.root).rglob("*") if p.is_file()]
            blobs = [p.read_bytes() + str(p).encode() for p in files]
        else:
            store.close()
            blobs = [p.read_bytes() for p in tmp_path.glob("dump.sqlite3*")]
        dump = b"".join(blobs)
        assert b"the crown jewels" in dump  # the dump is real (encryption is off here)
        for needle in (raw_id, text_id.encode(), raw_id.hex().encode(), value.encode()):
            assert needle not in dump


def test_logs_never_hold_a_session_id(
    make_app: AppFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_cloakroom")
    app, _, store = make_app()
    client = logged_in(app)
    value = cookie_of(client) or ""
    key = store_key(base64.urlsafe_b64decode(value.split(".")[0] + "="))
    record = store.inner.load(key)
    assert record is not None
    store.inner.save(
        Record(key, record.user_id, record.expires_at, record.version + 1, b"{corrupt"),
        expected=record.version,
        now=0,
    )
    client.get("/get/secret")
    client2 = logged_in(app)
    value2 = cookie_of(client2) or ""
    clock.advance(hours=13)
    client2.get("/get/secret")
    assert caplog.records, "the scenario should have logged something"
    text = "\n".join(r.getMessage() for r in caplog.records)
    for v in (value, value2):
        assert v.split(".")[0] not in text
    assert key in text  # records are named by their handle


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{corrupt",
        b"[]",
        b'{"v": 99, "d": {}}',
        b'{"v": 1, "c": "yesterday", "s": 1, "d": {}}',
        b'{"v": 1, "c": 1, "s": 1}',
        b'{"v": 1, "c": NaN, "s": 1, "d": {}}',
        b'{"v": 1, "c": 1, "s": 1, "d": []}',
        b'{"v": 1, "c": 1, "s": 1, "u": 5, "d": {}}',
        os.urandom(64),
    ],
)
def test_a_corrupt_record_is_treated_as_absent(
    make_app: AppFactory, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    app, _, store = make_app()
    client = logged_in(app)
    key = store_key(base64.urlsafe_b64decode((cookie_of(client) or "").split(".")[0] + "="))
    record = store.inner.load(key)
    assert record is not None
    store.inner.save(
        Record(key, record.user_id, record.expires_at, record.version + 1, payload),
        expected=record.version,
        now=0,
    )
    response = client.get("/whoami")
    assert response.status_code == 200
    assert response.get_json() == {"user": None}
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_an_oversized_session_is_refused_and_the_stored_one_kept(make_app: AppFactory) -> None:
    app, _, _ = make_app(CLOAKROOM_MAX_RECORD_SIZE=2048)
    client = app.test_client()
    client.post("/set/small", json="fits")
    with pytest.raises(RecordTooLarge) as caught:
        client.post("/set/big", json="x" * 4000)
    assert caught.value.limit == 2048
    assert caught.value.largest[0][0] == "big"
    assert "CLOAKROOM_MAX_RECORD_SIZE" in str(caught.value)
    assert client.get("/get/small").get_json() == {"value": "fits"}
    assert client.get("/get/big").get_json() == {"value": None}


def test_an_unserializable_value_fails_naming_its_key(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/bad")
    def bad() -> str:
        session["ok"] = 1
        session["widget"] = object()
        return "no"

    client = app.test_client()
    client.post("/set/ok", json=0)
    with pytest.raises(SessionNotSerializable) as caught:
        client.get("/bad")
    assert caught.value.key == "widget"
    assert isinstance(caught.value, TypeError)
    assert client.get("/get/ok").get_json() == {"value": 0}


def test_cookie_attributes_by_default(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    response = app.test_client().post("/set/x", json=1)
    header = set_cookie_header(response)
    assert "HttpOnly" in header
    assert "SameSite=Lax" in header
    assert "Path=/" in header
    assert "Secure" not in header
    https = app.test_client().post("/set/x", json=1, base_url="https://localhost")
    assert "Secure" in set_cookie_header(https)


def test_secure_when_configured(make_app: AppFactory) -> None:
    app, _, _ = make_app(SESSION_COOKIE_SECURE=True, SESSION_COOKIE_SAMESITE="Strict")
    header = set_cookie_header(app.test_client().post("/set/x", json=1))
    assert "Secure" in header
    assert "SameSite=Strict" in header


def test_host_prefixed_cookie(make_app: AppFactory) -> None:
    app, _, _ = make_app(SESSION_COOKIE_NAME="__Host-sid")
    client = app.test_client()
    header = set_cookie_header(client.post("/set/x", json=1, base_url="https://localhost"))
    assert header.startswith("__Host-sid=")
    assert "Secure" in header
    assert "Path=/" in header
    assert "Domain" not in header
    assert client.get("/get/x", base_url="https://localhost").get_json() == {"value": 1}
