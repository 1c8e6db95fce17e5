"""Switching to Cloakroom without logging anyone out: Flask cookies and Flask-Session."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import pickle
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask, jsonify, session
from flask.sessions import session_json_serializer
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from markupsafe import Markup

from flask_cloakroom import Cloakroom, Event, signals
from flask_cloakroom.stores import Store
from flask_cloakroom.stores.memory import MemoryStore

from .conftest import add_views
from .servers import RedisServer

SECRET = "adoption-secret-" + "a" * 24


def flask_cookie_app(**config: Any) -> Flask:
    """An app on Flask's own cookie session, as before the switch."""
    app = Flask(__name__)
    app.config.update({"SECRET_KEY": SECRET, **config})

    @app.post("/start")
    def start() -> str:
        session["_user_id"] = "42"  # what Flask-Login keeps
        session["cart"] = ("tea", "pen")
        session["note"] = Markup("<b>hi</b>")
        return "ok"

    return app


def cloakroom_app(store: Any = None, **config: Any) -> tuple[Flask, Cloakroom]:
    app = Flask(__name__)
    app.config.update({"SECRET_KEY": SECRET, **config})
    cloak = Cloakroom(app, store=store if store is not None else MemoryStore())
    add_views(app, cloak)

    @app.get("/everything")
    def everything() -> Any:
        return jsonify(
            cart=list(session.get("cart", ())),
            cart_is_tuple=isinstance(session.get("cart"), tuple),
            note=str(session.get("note")),
            user=cloak.user_id,
        )

    return app, cloak


def move_cookie(source: FlaskClient, target: FlaskClient) -> str:
    cookie = source.get_cookie("session")
    assert cookie is not None
    target.set_cookie("session", cookie.value)
    return cookie.value


def test_a_flask_cookie_session_is_adopted(store: Store) -> None:
    before = flask_cookie_app().test_client()
    before.post("/start")
    app, cloak = cloakroom_app(
        store, CLOAKROOM_ADOPT_FLASK_COOKIES=True, CLOAKROOM_ADOPT_USER_KEY="_user_id"
    )
    client = app.test_client()
    old = move_cookie(before, client)
    adopted: list[Event] = []

    def receiver(sender: Any, event: Event, **_: Any) -> None:
        adopted.append(event)

    with signals.session_adopted.connected_to(receiver):
        response = client.get("/everything")
    assert response.get_json() == {
        "cart": ["tea", "pen"],
        "cart_is_tuple": True,
        "note": "<b>hi</b>",
        "user": "42",
    }
    new = client.get_cookie("session")
    assert new is not None
    assert new.value != old
    assert new.value.count(".") == 1 and len(new.value) == 66  # Cloakroom's format
    assert [(e.kind, e.user_id, e.details) for e in adopted] == [
        ("adopted", "42", {"source": "flask-cookie"})
    ]
    with app.test_request_context():
        assert len(cloak.sessions("42")) == 1
    assert client.get("/everything").get_json()["cart"] == ["tea", "pen"]


def test_without_the_option_a_flask_cookie_is_ignored() -> None:
    before = flask_cookie_app().test_client()
    before.post("/start")
    app, _ = cloakroom_app()
    client = app.test_client()
    move_cookie(before, client)
    assert client.get("/everything").get_json()["cart"] == []


def test_an_expired_or_foreign_flask_cookie_is_not_adopted() -> None:
    class LongAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 40 * 86400  # older than the 31-day default

    old = URLSafeTimedSerializer(
        SECRET,
        salt="cookie-session",
        serializer=session_json_serializer,
        signer=LongAgo,
        signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha1},
    ).dumps({"cart": ["stale"]})
    app, _ = cloakroom_app(CLOAKROOM_ADOPT_FLASK_COOKIES=True)
    client = app.test_client()
    client.set_cookie("session", old)
    assert client.get("/everything").get_json()["cart"] == []
    other = flask_cookie_app(SECRET_KEY="another-app-" + "b" * 24).test_client()
    other.post("/start")
    move_cookie(other, client)
    assert client.get("/everything").get_json()["cart"] == []


def test_a_cookie_signed_with_a_fallback_key_is_adopted() -> None:
    before = flask_cookie_app().test_client()
    before.post("/start")
    app, _ = cloakroom_app(
        SECRET_KEY="the-new-secret-" + "c" * 24,
        SECRET_KEY_FALLBACKS=[SECRET],
        CLOAKROOM_ADOPT_FLASK_COOKIES=True,
    )
    client = app.test_client()
    move_cookie(before, client)
    assert client.get("/everything").get_json()["cart"] == ["tea", "pen"]


# -- Flask-Session 0.8 ------------------------------------------------------------------


def flask_session_app(**config: Any) -> Flask:
    from flask_session import Session

    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET, SESSION_PERMANENT=True, **config)
    Session(app)

    @app.post("/start")
    def start() -> str:
        session["_user_id"] = "7"
        session["cart"] = ["tea", "pen"]
        session["seen"] = b"\x00\x01"
        return "ok"

    return app


def check_switch(before: FlaskClient, app: Flask, cloak: Cloakroom) -> None:
    client = app.test_client()
    old = move_cookie(before, client)
    data = client.get("/everything").get_json()
    assert data["cart"] == ["tea", "pen"]
    assert data["user"] == "7"
    new = client.get_cookie("session")
    assert new is not None
    assert new.value != old  # re-issued in Cloakroom's format, with a new id
    assert client.get("/everything").get_json()["cart"] == ["tea", "pen"]
    replay = app.test_client()
    replay.set_cookie("session", old)
    assert replay.get("/everything").get_json()["cart"] == []  # the old id is spent


def test_flask_session_redis_sessions_are_imported(redis_server: RedisServer) -> None:
    prefix = f"{redis_server.prefix}fs-{secrets.token_hex(3)}:"
    client = redis.Redis.from_url(redis_server.url)
    before_app = flask_session_app(
        SESSION_TYPE="redis", SESSION_REDIS=client, SESSION_KEY_PREFIX=prefix
    )
    browsers = [before_app.test_client() for _ in range(3)]
    for browser in browsers:
        browser.post("/start")
    client.set(f"{prefix}pickled", pickle.dumps({"cart": ["evil"]}))
    client.set(f"{prefix}garbage", b"\xc1\xc1 not msgpack nor json")
    app, cloak = cloakroom_app(
        CLOAKROOM_ADOPT_FLASK_SESSION=True, CLOAKROOM_ADOPT_USER_KEY="_user_id"
    )
    try:
        with app.app_context():
            report = cloak.import_flask_session(redis_server.url, key_prefix=prefix)
            assert (report.imported, report.pickled, report.undecodable) == (3, 1, 1)
            again = cloak.import_flask_session(client, key_prefix=prefix)
            assert (again.imported, again.already_there) == (0, 3)
        check_switch(browsers[0], app, cloak)
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def _open_files(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.path.realpath(fd) == str(path.resolve())
    return count


@pytest.mark.filterwarnings("ignore:No valid SQLAlchemy instance:RuntimeWarning")
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_an_import_from_a_url_closes_the_connections_it_opened(tmp_path: Path) -> None:
    """The import makes its own engine from a URL; its pooled connection must be closed
    when the import is done, not left for the garbage collector (which Python 3.13
    reports as an unclosed database)."""
    db = tmp_path / "fs.db"
    url = f"sqlite:///{db}"
    before_app = flask_session_app(SESSION_TYPE="sqlalchemy", SQLALCHEMY_DATABASE_URI=url)
    before_app.test_client().post("/start")
    app, cloak = cloakroom_app()
    gc.disable()  # an engine left open lives on in reference cycles until a collection
    try:
        opened = _open_files(db)
        with app.app_context():
            assert cloak.import_flask_session(url).imported == 1
        assert _open_files(db) == opened
    finally:
        gc.enable()
    dispose_flask_sqlalchemy(before_app)


def dispose_flask_sqlalchemy(app: Flask) -> None:
    """Close the connections of the Flask-SQLAlchemy engine Flask-Session made."""
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


@pytest.mark.filterwarnings("ignore:No valid SQLAlchemy instance:RuntimeWarning")
def test_flask_session_sqlalchemy_sessions_are_imported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fs.db'}"
    # Flask-Session makes its own Flask-SQLAlchemy instance and table.
    before_app = flask_session_app(SESSION_TYPE="sqlalchemy", SQLALCHEMY_DATABASE_URI=url)
    browser = before_app.test_client()
    browser.post("/start")
    app, cloak = cloakroom_app(
        CLOAKROOM_ADOPT_FLASK_SESSION=True, CLOAKROOM_ADOPT_USER_KEY="_user_id"
    )
    with app.app_context():
        report = cloak.import_flask_session(url)
    assert (report.examined, report.imported) == (1, 1)
    check_switch(browser, app, cloak)
    dispose_flask_sqlalchemy(before_app)
