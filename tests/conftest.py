"""Shared fixtures: stores on every backend, a fake clock, and an app factory."""

from __future__ import annotations

import gc
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_cloakroom import Cloakroom
from flask_cloakroom.stores import Store, open_store
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.memory import MemoryStore
from flask_cloakroom.stores.sql import SQLStore

from .minimal_store import MinimalStore
from .support import CountingStore, FakeClock, drop_tables

pytest_plugins = ["tests.servers"]

#: Every store backend the contract suite and the end-to-end tests run on.
STORE_KINDS = [
    "memory",
    "minimal",  # only the methods a store must have: the base class's defaults at work
    "sqlite",
    "files",
    "postgres",
    "mysql",
    "redis",
    "redis_cached",
    "redis_cluster",
    "redis_sentinel",
]
#: The records a "redis_cached" store keeps in process (CLOAKROOM_REDIS_CLIENT_CACHE).
CLIENT_CACHE = 1000


def _sql_store(url: str, *, async_commit: bool = False) -> SQLStore:
    table = "cr_test_" + secrets.token_hex(4)
    store = open_store(url, sql_table=table, sql_async_commit=async_commit)
    assert isinstance(store, SQLStore)
    return store


def build_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Make an empty store of ``kind``; it is removed when the test ends."""
    store: Store
    if kind == "memory":
        return MemoryStore()
    if kind == "minimal":
        return MinimalStore()
    if kind == "files":
        return FileStore(str(tmp_path / "sessions"))
    if kind in ("redis", "redis_cached", "redis_cluster", "redis_sentinel"):
        from flask_cloakroom.stores.redis import open_redis_store

        from .servers import flush_prefix

        fixture = "redis_server" if kind in ("redis", "redis_cached") else kind
        server = request.getfixturevalue(fixture)
        prefix = f"{server.prefix}{secrets.token_hex(4)}:"
        cache = CLIENT_CACHE if kind == "redis_cached" else 0
        store = open_redis_store(
            server.url, prefix=prefix, timeout=2.0, wait_replicas=0, client_cache=cache
        )

        def flush() -> None:
            store.close()
            flush_prefix(server.url, prefix)

        request.addfinalizer(flush)
        return store
    if kind == "sqlite":
        store = _sql_store(f"sqlite:///{tmp_path / 'sessions.sqlite3'}")
    elif kind in ("postgres", "postgres_async"):
        url = request.getfixturevalue("postgres_url")
        store = _sql_store(url, async_commit=kind == "postgres_async")
    elif kind == "mysql":
        store = _sql_store(request.getfixturevalue("mysql_url"))
    else:  # pragma: no cover
        raise ValueError(kind)

    def drop() -> None:
        assert isinstance(store, SQLStore)
        drop_tables(store)
        store.close()

    request.addfinalizer(drop)
    return store


def store_config(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """An app's settings for a store of ``kind`` opened from its URL, as users configure
    it: ``CLOAKROOM_STORE`` on the test servers, with the test's own table or key
    prefix (removed when the test ends); ``redis_cached`` adds the client-side cache."""
    if kind == "memory":
        return {"CLOAKROOM_STORE": "memory://"}
    if kind == "sqlite":
        return {"CLOAKROOM_STORE": f"sqlite:///{tmp_path / 'sessions.db'}"}
    if kind in ("postgres", "mysql"):
        url = request.getfixturevalue(f"{kind}_url")
        table = "cr_test_" + secrets.token_hex(4)

        def drop() -> None:
            store = open_store(url, sql_table=table)
            assert isinstance(store, SQLStore)
            drop_tables(store)
            store.close()

        request.addfinalizer(drop)
        return {"CLOAKROOM_STORE": url, "CLOAKROOM_SQL_TABLE": table}
    from .servers import flush_prefix

    server = request.getfixturevalue(
        {"redis": "redis_server", "redis_cached": "redis_server"}.get(kind, kind)
    )
    prefix = f"{server.prefix}{secrets.token_hex(4)}:"
    request.addfinalizer(lambda: flush_prefix(server.url, prefix))
    cache = {"CLOAKROOM_REDIS_CLIENT_CACHE": 100} if kind == "redis_cached" else {}
    return {"CLOAKROOM_STORE": server.url, "CLOAKROOM_REDIS_PREFIX": prefix, **cache}


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store, once per backend."""
    return build_store(request.param, request, tmp_path)


@pytest.fixture(params=[kind for kind in STORE_KINDS if kind != "minimal"])
def logging_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store that keeps an activity log (every backend but the minimal one)."""
    return build_store(request.param, request, tmp_path)


@pytest.fixture
def no_collector_pauses() -> Iterator[None]:
    """For tests that bound how long a request may take: the garbage collector looks
    only at the objects made during the test.  A full collection of what earlier tests
    left (a Redis Cluster client alone makes some 40,000 objects) took up to 0.7 s in
    the whole suite, more than the margin those bounds allow for a noisy machine, and
    it is this process's pause, not the store's.  ``gc.freeze()`` sets the objects that
    exist now aside from collections, at no cost; they are collected again after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


AppFactory = Callable[..., tuple[Flask, Cloakroom, CountingStore]]


@pytest.fixture
def make_app(clock: FakeClock) -> AppFactory:
    """Build a Flask app with Cloakroom on a given store (memory by default).

    Returns ``(app, cloak, counting_store)``; config keys are passed as keyword
    arguments.  The app has a few generic views used across the tests.
    """

    def factory(
        store: Store | None = None, **config: Any
    ) -> tuple[Flask, Cloakroom, CountingStore]:
        counting = CountingStore(store if store is not None else MemoryStore())
        app = Flask(__name__)
        app.config.update(SECRET_KEY="test-secret-" + "k" * 20, TESTING=True)
        app.config.update(config)
        cloak = Cloakroom(app, store=counting, clock=clock)
        add_views(app, cloak)
        return app, cloak, counting

    return factory


def add_views(app: Flask, cloak: Cloakroom) -> None:
    """Views the tests drive: set/get/pop values, login, logout, rotate, sessions."""
    from flask import jsonify, request, session

    @app.get("/get/<name>")
    def get_value(name: str) -> Any:
        return jsonify(value=session.get(name))

    @app.post("/set/<name>")
    def set_value(name: str) -> Any:
        session[name] = request.get_json()
        return jsonify(ok=True)

    @app.post("/pop/<name>")
    def pop_value(name: str) -> Any:
        session.pop(name, None)
        return jsonify(ok=True)

    @app.get("/nothing")
    def nothing() -> str:
        return "no session here"

    @app.post("/login/<user>")
    def login(user: str) -> Any:
        cloak.login(user, remember=request.args.get("remember") == "1")
        return jsonify(ok=True)

    @app.post("/logout")
    def logout() -> Any:
        cloak.logout()
        return jsonify(ok=True)

    @app.post("/rotate")
    def rotate() -> Any:
        cloak.rotate()
        return jsonify(ok=True)

    @app.get("/whoami")
    def whoami() -> Any:
        return jsonify(user=cloak.user_id)

    @app.get("/sessions/<user>")
    def sessions(user: str) -> Any:
        return jsonify([{"handle": s.handle, "current": s.current} for s in cloak.sessions(user)])
