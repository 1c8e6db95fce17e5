"""flask.session keeps working as Flask users know it, now stored on the server."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Response, flash, get_flashed_messages, jsonify, make_response, session
from markupsafe import Markup

from flask_cloakroom.interface import _vary_on_cookie
from flask_cloakroom.session import Meta, ServerSession

from .conftest import AppFactory


def test_every_tagged_json_type_round_trips(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    values: dict[str, Any] = {
        "tuple": (1, "two", (3.0, None)),
        "bytes": b"\x00\xffraw",
        "markup": Markup("<b>bold</b>"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "datetime": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        "nested": {"list": [1, {"x": (1, 2)}], " t": "looks like a tag"},
        "unicode": "ünïcødé ✓",
        "number": 1.5,
        "flag": True,
        "nothing": None,
    }

    @app.get("/store")
    def store_values() -> str:
        session.update(values)
        return "ok"

    @app.get("/check")
    def check() -> Any:
        return jsonify(
            {k: session[k] == v and type(session[k]) is type(v) for k, v in values.items()}
        )

    client = app.test_client()
    client.get("/store")
    result = client.get("/check").get_json()
    assert result == dict.fromkeys(values, True)


def test_dict_api(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/ops")
    def ops() -> Any:
        session["a"] = 1
        session.setdefault("b", [])
        session["b"].append(2)
        session.modified = True
        session.update(c=3)
        session.update({"d": 4})
        del session["a"]
        popped = session.pop("c")
        missing = session.pop("zzz", "default")
        return jsonify(
            popped=popped,
            missing=missing,
            keys=sorted(session.keys()),
            contains="d" in session,
            length=len(session),
            copy=dict(session),
        )

    @app.get("/after")
    def after() -> Any:
        return jsonify(dict(session))

    client = app.test_client()
    data = client.get("/ops").get_json()
    assert data == {
        "popped": 3,
        "missing": "default",
        "keys": ["b", "d"],
        "contains": True,
        "length": 2,
        "copy": {"b": [2], "d": 4},
    }
    assert client.get("/after").get_json() == {"b": [2], "d": 4}


def test_flash_messages_survive_a_redirect(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/flash")
    def do_flash() -> str:
        flash("saved!", "info")
        return "ok"

    @app.get("/show")
    def show() -> Any:
        return jsonify(get_flashed_messages(with_categories=True))

    client = app.test_client()
    client.get("/flash")
    assert client.get("/show").get_json() == [["info", "saved!"]]
    assert client.get("/show").get_json() == []


def test_permanent_session_gets_a_persistent_cookie(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/temporary")
    def temporary() -> str:
        session["x"] = 1
        return "ok"

    @app.get("/permanent")
    def permanent() -> str:
        session.permanent = True
        return "ok"

    client = app.test_client()
    first = client.get("/temporary").headers["Set-Cookie"]
    assert "Expires" not in first
    second = client.get("/permanent").headers["Set-Cookie"]
    assert "Expires=" in second
    # Nothing changed about the cookie afterwards: no new Set-Cookie.
    assert "Set-Cookie" not in client.get("/permanent").headers


def test_nested_change_needs_modified_like_flask(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/start")
    def start() -> str:
        session["cart"] = ["apple"]
        return "ok"

    @app.get("/append-silently")
    def append_silently() -> str:
        session["cart"].append("pear")
        return "ok"

    @app.get("/append-marked")
    def append_marked() -> str:
        session["cart"].append("plum")
        session.modified = True
        return "ok"

    client = app.test_client()
    client.get("/start")
    client.get("/append-silently")
    assert client.get("/get/cart").get_json() == {"value": ["apple"]}
    client.get("/append-marked")
    assert client.get("/get/cart").get_json() == {"value": ["apple", "plum"]}


def test_vary_cookie_only_when_the_session_was_used(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    client = app.test_client()
    client.post("/set/x", json=1)
    assert "Cookie" in client.get("/get/x").headers.get("Vary", "")
    assert "Cookie" not in client.get("/nothing").headers.get("Vary", "")


def test_vary_keeps_the_views_own_values_and_names_cookie_once(make_app: AppFactory) -> None:
    app, _, _ = make_app()

    @app.get("/vary/<value>")
    def vary(value: str) -> Any:
        session.get("x")
        response = make_response("ok")
        response.headers["Vary"] = value
        return response

    client = app.test_client()
    client.post("/set/x", json=1)
    assert client.get("/vary/Accept-Encoding").headers.getlist("Vary") == [
        "Accept-Encoding",
        "Cookie",
    ]
    assert client.get("/vary/Accept, cookie").headers.getlist("Vary") == ["Accept, cookie"]


def test_vary_is_found_whatever_the_case_of_its_name() -> None:
    response = Response("ok")
    response.headers["vary"] = "Accept, COOKIE"
    _vary_on_cookie(response)
    assert response.headers.getlist("Vary") == ["Accept, COOKIE"]
    response = Response("ok")
    response.headers["VARY"] = "Accept"
    _vary_on_cookie(response)
    assert response.headers.getlist("Vary") == ["Accept", "Cookie"]


class _PlainHeaders:
    """Headers that are not Werkzeug's: a list of pairs behind the public methods."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = list(pairs)

    def getlist(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k.lower() == name.lower()]

    def add(self, name: str, value: str) -> None:
        self.pairs.append((name, value))


def test_vary_goes_through_the_public_methods_of_other_headers() -> None:
    response = Response("ok")
    response.headers = _PlainHeaders(("Vary", "Accept"))  # type: ignore[assignment]
    _vary_on_cookie(response)
    assert response.headers.pairs == [("Vary", "Accept"), ("Vary", "Cookie")]  # type: ignore[attr-defined]
    _vary_on_cookie(response)
    assert response.headers.pairs == [("Vary", "Accept"), ("Vary", "Cookie")]  # type: ignore[attr-defined]


def test_anonymous_visitor_with_empty_session_gets_no_cookie_and_no_record(
    make_app: AppFactory,
) -> None:
    app, _, store = make_app()
    client = app.test_client()
    response = client.get("/get/x")
    assert "Set-Cookie" not in response.headers
    assert store.calls["save"] == 0
    assert store.inner.count(now=0) == 0


def test_clearing_the_session_ends_it(make_app: AppFactory) -> None:
    app, _, store = make_app()

    @app.get("/clear")
    def clear() -> str:
        session.clear()
        return "ok"

    client = app.test_client()
    client.post("/set/x", json=1)
    assert store.inner.count(now=0) == 1
    response = client.get("/clear")
    assert "session=;" in response.headers["Set-Cookie"]  # cookie expired
    assert store.inner.count(now=0) == 0
    assert client.get("/get/x").get_json() == {"value": None}


def test_emptying_the_session_deletes_its_record(make_app: AppFactory) -> None:
    app, _, store = make_app()
    client = app.test_client()
    client.post("/set/x", json=1)
    client.post("/pop/x")
    assert store.inner.count(now=0) == 0
    assert client.get("/get/x").get_json() == {"value": None}


def test_a_loaded_session_is_what_the_constructor_builds() -> None:
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_100, user_id="u")
    data = {"cart": ["tea"], "_permanent": True}
    raw = {"cart": ["tea"], "_permanent": True}
    built = ServerSession(data, key="k", version=3, meta=meta, raw=raw)
    loaded = ServerSession.loaded(data, "k", 3, meta, raw)
    assert not loaded.accessed and not loaded.modified
    assert vars(loaded) == vars(built)
    assert (loaded.key, loaded.version, loaded.new) == ("k", 3, False)
    assert loaded.loaded_permanent
    assert dict(loaded) == dict(built) == data
    loaded["n"] = 1
    assert "n" not in data  # the data was copied in, not taken
    loaded.pending.append(("x", {}))
    assert built.pending == []  # and nothing mutable is shared between sessions


# Every way a view can reach a stored value and change it in place (then set
# session.modified, as with Flask's own session): the change is saved.
_IN_PLACE: dict[str, Callable[[], None]] = {
    "getitem": lambda: session["cart"].append("plum"),
    "get": lambda: session.get("cart", []).append("plum"),
    "setdefault": lambda: session.setdefault("cart", []).append("plum"),
    "values": lambda: next(v for v in session.values() if isinstance(v, list)).append("plum"),
    "items": lambda: dict(session.items())["cart"].append("plum"),
    "copy": lambda: session.copy()["cart"].append("plum"),  # type: ignore[attr-defined]
    "iteration": lambda: next(session[k] for k in session if k == "cart").append("plum"),
    "update then get": lambda: (session.update(n=1), session["cart"].append("plum"))[1],
}


@pytest.mark.parametrize("route", sorted(_IN_PLACE))
def test_a_value_changed_in_place_is_saved_whichever_way_it_was_reached(
    make_app: AppFactory, route: str
) -> None:
    app, _, _ = make_app()

    @app.post("/change")
    def change() -> str:
        _IN_PLACE[route]()
        session.modified = True
        return "ok"

    client = app.test_client()
    client.post("/set/cart", json=["tea"])
    client.post("/set/prefs", json={"theme": "dark"})
    client.post("/change")
    assert client.get("/get/cart").get_json() == {"value": ["tea", "plum"]}
    assert client.get("/get/prefs").get_json() == {"value": {"theme": "dark"}}
