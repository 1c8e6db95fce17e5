"""Encryption at rest: what a store dump shows, tampering, key rotation, hashed user ids."""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_cloakroom import Cloakroom, ConfigError, generate_key
from flask_cloakroom.crypto import Keyring, key_id, parse_key
from flask_cloakroom.errors import RecordDecodeError
from flask_cloakroom.stores import Record, Store
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.sql import SQLStore
from flask_cloakroom.tokens import store_key

from .conftest import AppFactory, add_views
from .support import FakeClock

MARKER = "plaintext-marker-" + secrets.token_hex(4)
KEY_A, KEY_B = generate_key(), generate_key()


def login_with_secret(app: Flask, user: str = "alice") -> FlaskClient:
    client = app.test_client()
    client.post("/set/secret", json=MARKER)
    client.post(f"/login/{user}")
    return client


def key_of(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return store_key(base64.urlsafe_b64decode(cookie.value.split(".")[0] + "="))


def dump(store: Store) -> bytes:
    """Everything the store holds: every field of every record, and its files on disk."""
    parts: list[bytes] = []
    cursor = None
    while True:
        page, cursor = store.scan(cursor=cursor, limit=100)
        parts += [r.key.encode() + (r.user_id or "").encode() + r.payload for r in page]
        if cursor is None:
            break
    if isinstance(store, FileStore):
        parts += [
            p.read_bytes() + str(p).encode() for p in Path(store.root).rglob("*") if p.is_file()
        ]
    if isinstance(store, SQLStore) and store.name == "sqlite":
        database = store.engine.url.database
        assert database is not None
        store.engine.dispose()
        parts += [p.read_bytes() for p in Path(database).parent.glob(Path(database).name + "*")]
    return b"".join(parts)


def test_a_store_dump_holds_no_plaintext_and_no_id(make_app: AppFactory, store: Store) -> None:
    app, _, _ = make_app(store, CLOAKROOM_ENCRYPTION_KEYS=[KEY_A], CLOAKROOM_HASH_USER_IDS=True)
    client = login_with_secret(app, "alice@example.com")
    assert client.get("/get/secret").get_json() == {"value": MARKER}
    cookie = client.get_cookie("session")
    assert cookie is not None
    text_id = cookie.value.split(".")[0]
    raw_id = base64.urlsafe_b64decode(text_id + "=")
    everything = dump(store)
    assert len(everything) > 100
    for needle in (
        MARKER.encode(),
        b"alice@example.com",
        raw_id,
        text_id.encode(),
        raw_id.hex().encode(),
    ):
        assert needle not in everything


def test_without_keys_the_same_dump_is_readable(make_app: AppFactory, tmp_path: Path) -> None:
    """The dump test above can fail: unencrypted, the marker is right there."""
    store = FileStore(str(tmp_path / "plain"))
    app, _, _ = make_app(store)
    login_with_secret(app, "alice@example.com")
    everything = dump(store)
    assert MARKER.encode() in everything
    assert b"alice@example.com" in everything


@pytest.mark.parametrize(
    "damage",
    ["swap", "swap-with-user", "other-user", "flip", "truncate", "unknown-key", "drop-tag"],
)
def test_tampered_records_are_absent_and_logged(
    make_app: AppFactory, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, _, store = make_app(CLOAKROOM_ENCRYPTION_KEYS=[KEY_A])
    victim = login_with_secret(app, "victim")
    attacker = login_with_secret(app, "attacker")
    victim_record = store.inner.load(key_of(victim))
    own = store.inner.load(key_of(attacker))
    assert victim_record is not None
    assert own is not None
    payload, user = own.payload, own.user_id
    if damage == "swap":  # the victim's ciphertext copied onto the attacker's session
        payload = victim_record.payload
    elif damage == "swap-with-user":  # ... together with the victim's user id beside it
        payload, user = victim_record.payload, victim_record.user_id
    elif damage == "other-user":  # the attacker's record relabelled as the victim's
        user = victim_record.user_id
    elif damage == "flip":
        payload = payload[:-20] + bytes([payload[-20] ^ 1]) + payload[-19:]
    elif damage == "truncate":
        payload = payload[: len(payload) // 2]
    elif damage == "unknown-key":
        payload = Keyring([parse_key(KEY_B)]).seal(b'{"c":1,"s":1,"d":{}}', own.key.encode())
    elif damage == "drop-tag":
        payload = payload[:-16]
    store.inner.save(
        Record(own.key, user, own.expires_at, own.version + 1, payload),
        expected=own.version,
        now=0,
    )
    response = attacker.get("/whoami")
    assert response.status_code == 200
    assert response.get_json() == {"user": None}
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert victim.get("/whoami").get_json() == {"user": "victim"}


def test_key_rotation_end_to_end(make_app: AppFactory, tmp_path: Path, clock: FakeClock) -> None:
    shared = FileStore(str(tmp_path / "rotation"))
    old_app, _, _ = make_app(shared, CLOAKROOM_ENCRYPTION_KEYS=[f"a:{KEY_A}"])
    clients = [login_with_secret(old_app, f"user{i}") for i in range(4)]
    cookies = [c.get_cookie("session") for c in clients]

    def reopen(keys: list[str]) -> tuple[Flask, Cloakroom, list[FlaskClient]]:
        app, cloak, _ = make_app(shared, CLOAKROOM_ENCRYPTION_KEYS=keys)
        moved = []
        for cookie in cookies:
            assert cookie is not None
            client = app.test_client()
            client.set_cookie("session", cookie.value)
            moved.append(client)
        return app, cloak, moved

    rings = {name: Keyring([parse_key(key)]) for name, key in (("a", KEY_A), ("b", KEY_B))}

    def key_ids() -> list[str]:
        """Which key opens each record (the payload does not name its key)."""
        page, _ = shared.scan(limit=100)
        names = []
        for record in page:
            assert record.user_id is not None
            aad = record.key.encode() + b"\0" + record.user_id.encode()
            for name, ring in rings.items():
                try:
                    ring.open(record.payload, aad)
                except RecordDecodeError:
                    continue
                names.append(name)
        return sorted(names)

    assert key_ids() == ["a", "a", "a", "a"]
    app, cloak, moved = reopen([f"b:{KEY_B}", f"a:{KEY_A}"])
    assert [c.get("/whoami").get_json()["user"] for c in moved] == [f"user{i}" for i in range(4)]
    moved[0].post("/set/x", json=1)  # a write re-encrypts under the new key
    assert key_ids() == ["a", "a", "a", "b"]
    with app.app_context():
        report = cloak.rekey()
    assert (report.rewritten, report.current, report.unreadable) == (3, 1, 0)
    assert key_ids() == ["b", "b", "b", "b"]
    _, _, moved = reopen([f"b:{KEY_B}"])  # the old key is gone: nothing is lost
    assert [c.get("/get/secret").get_json()["value"] for c in moved] == [MARKER] * 4


def test_dropping_a_key_too_early_logs_out_without_errors(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = FileStore(str(tmp_path / "early"))
    app, _, _ = make_app(shared, CLOAKROOM_ENCRYPTION_KEYS=[KEY_A])
    cookie = login_with_secret(app).get_cookie("session")
    assert cookie is not None
    app2, _, _ = make_app(shared, CLOAKROOM_ENCRYPTION_KEYS=[KEY_B])
    client = app2.test_client()
    client.set_cookie("session", cookie.value)
    response = client.get("/whoami")
    assert response.status_code == 200
    assert response.get_json() == {"user": None}
    assert any(
        "does not open under any key in CLOAKROOM_ENCRYPTION_KEYS" in r.getMessage()
        for r in caplog.records
    )


def test_turning_encryption_on_for_an_existing_store(make_app: AppFactory, tmp_path: Path) -> None:
    shared = FileStore(str(tmp_path / "rollout"))
    plain_app, _, _ = make_app(shared)
    cookie = login_with_secret(plain_app).get_cookie("session")
    assert cookie is not None

    strict_app, _, _ = make_app(shared, CLOAKROOM_ENCRYPTION_KEYS=[KEY_A])
    strict = strict_app.test_client()
    strict.set_cookie("session", cookie.value)
    assert strict.get("/whoami").get_json() == {"user": None}  # plaintext refused by default

    plain_app2, _, _ = make_app(shared)
    cookie2 = login_with_secret(plain_app2).get_cookie("session")
    assert cookie2 is not None
    rollout_app, cloak, _ = make_app(
        shared, CLOAKROOM_ENCRYPTION_KEYS=[KEY_A], CLOAKROOM_ENCRYPTION_ACCEPT_PLAINTEXT=True
    )
    rolling = rollout_app.test_client()
    rolling.set_cookie("session", cookie2.value)
    assert rolling.get("/whoami").get_json() == {"user": "alice"}
    with rollout_app.app_context():
        assert cloak.rekey().rewritten == 2  # both sessions made before the rollout
    assert MARKER.encode() not in dump(shared)
    for value in (cookie.value, cookie2.value):  # now readable with plaintext refused
        strict.set_cookie("session", value)
        assert strict.get("/get/secret").get_json() == {"value": MARKER}


def test_hashed_user_ids_follow_secret_key_rotation(make_app: AppFactory, tmp_path: Path) -> None:
    shared = FileStore(str(tmp_path / "hashed"))
    app, _, _ = make_app(shared, CLOAKROOM_HASH_USER_IDS=True)
    client = login_with_secret(app, "carol")
    assert b"carol" not in b"".join((r.user_id or "").encode() for r in shared.scan()[0])
    cookie = client.get_cookie("session")
    assert cookie is not None
    rotated, cloak, _ = make_app(
        shared,
        SECRET_KEY="another-secret-key-0123456789abcdef",
        SECRET_KEY_FALLBACKS=["test-secret-" + "k" * 20],
        CLOAKROOM_HASH_USER_IDS=True,
    )
    with rotated.test_request_context():
        assert len(cloak.sessions("carol")) == 1  # found under the fallback's index
        assert cloak.rekey().rewritten == 1  # moved to the current key's index
        assert len(cloak.sessions("carol")) == 1
        assert cloak.revoke_user("carol") == 1


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_turning_user_id_hashing_on_and_off_keeps_everyone_logged_in(
    make_app: AppFactory, tmp_path: Path, encrypted: bool
) -> None:
    """Unhashed, a record's user id is kept only beside its payload; hashed, only
    inside it.  Either kind reads under the other setting, and rekey() moves it."""
    shared = FileStore(str(tmp_path / "toggle"))
    keys = {"CLOAKROOM_ENCRYPTION_KEYS": [KEY_A]} if encrypted else {}
    app, _, _ = make_app(shared, **keys)
    client = login_with_secret(app, "dave")
    (record,) = shared.scan()[0]
    assert record.user_id == "dave"
    if not encrypted:
        assert b"dave" not in record.payload  # beside the payload, not in it too
    cookie = client.get_cookie("session")
    assert cookie is not None
    for hashed in (True, False):
        app, cloak, _ = make_app(shared, CLOAKROOM_HASH_USER_IDS=hashed, **keys)
        reader = app.test_client()
        reader.set_cookie("session", cookie.value)
        assert reader.get("/whoami").get_json() == {"user": "dave"}
        with app.test_request_context():
            assert cloak.rekey().rewritten == 1
            assert [s.user_id for s in cloak.sessions("dave")] == ["dave"]
        (record,) = shared.scan()[0]
        assert (record.user_id != "dave") is hashed
        assert reader.get("/get/secret").get_json() == {"value": MARKER}


def test_encryption_adds_no_store_round_trip(make_app: AppFactory) -> None:
    app, _, store = make_app(CLOAKROOM_ENCRYPTION_KEYS=[KEY_A])
    client = login_with_secret(app)
    store.reset()
    client.get("/get/secret")
    assert (store.reads, store.writes) == (1, 0)
    store.reset()
    client.post("/set/x", json=1)
    assert (store.reads, store.writes) == (1, 1)


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["not base64 !!"], "entry 0"),
        ([base64.urlsafe_b64encode(b"short").decode()], "has 5 bytes"),
        ([KEY_A, KEY_A], "same id"),
        ([f"bad id!:{KEY_A}"], "key id"),
        ([42], "must be text"),
        ({"a": KEY_A}, "list of keys"),
    ],
)
def test_bad_keys_fail_at_start_up(keys: object, words: str) -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s" * 32, CLOAKROOM_STORE="memory://", CLOAKROOM_ENCRYPTION_KEYS=keys
    )
    with pytest.raises(ConfigError) as caught:
        Cloakroom(app)
    assert caught.value.key == "CLOAKROOM_ENCRYPTION_KEYS"
    assert words in str(caught.value)


def test_keys_from_an_environment_string() -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s" * 32,
        CLOAKROOM_STORE="memory://",
        CLOAKROOM_ENCRYPTION_KEYS=f"new:{KEY_B}, {KEY_A}",
    )
    add_views(app, Cloakroom(app))
    keyring = app.extensions["cloakroom"].codec.keyring
    assert keyring.ids == ("new", key_id(base64.urlsafe_b64decode(KEY_A)))


def test_generated_keys_are_fresh_and_valid() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        kid, raw = parse_key(key)
        assert len(raw) == 32
        assert len(kid) == 8


def test_logs_of_decryption_failures_name_only_the_handle(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_cloakroom")
    app, _, store = make_app(CLOAKROOM_ENCRYPTION_KEYS=[KEY_A])
    client = login_with_secret(app)
    key = key_of(client)
    record = store.inner.load(key)
    assert record is not None
    store.inner.save(
        Record(key, record.user_id, record.expires_at, 2, record.payload[:-1]), expected=1, now=0
    )
    client.get("/whoami")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert key in text
    assert MARKER not in text
