"""CLOAKROOM_SQL_ASYNC_COMMIT: PostgreSQL session writes that do not wait for the disk.

What is checked on a real PostgreSQL server, from outside the store: right after a write
returns, has the server flushed its WAL up to where it has written it?  A durable commit
waits for that flush; an asynchronous one returns first, and the server's WAL writer
flushes it a little later.  Deletions must stay durable in either mode.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from flask import Flask, session

from flask_cloakroom import Cloakroom
from flask_cloakroom.errors import ConfigError
from flask_cloakroom.stores import Record, open_store
from flask_cloakroom.stores.sql import SQLStore

from .support import drop_tables

pytestmark = pytest.mark.filterwarnings("error")

#: Writes per measurement: the WAL writer flushes about every 200 ms, and a burst of
#: this many single-row writes takes a fraction of that.
BURST = 40


@pytest.fixture
def observer(postgres_url: str) -> Iterator[sqlalchemy.Connection]:
    """A connection of the test's own, to read the server's WAL positions."""
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        default = conn.execute(sqlalchemy.text("SHOW synchronous_commit")).scalar()
        if default != "on":  # a server set up by someone else, not durable by default
            engine.dispose()
            pytest.skip(f"this PostgreSQL's synchronous_commit is {default!r}, not 'on'")
        yield conn
    engine.dispose()


def _store(url: str, *, async_commit: bool) -> SQLStore:
    store = open_store(
        url, sql_table="cr_async_" + secrets.token_hex(4), sql_async_commit=async_commit
    )
    assert isinstance(store, SQLStore)
    return store


@pytest.fixture
def make_store(postgres_url: str) -> Iterator[Callable[..., SQLStore]]:
    made: list[SQLStore] = []

    def make(*, async_commit: bool) -> SQLStore:
        store = _store(postgres_url, async_commit=async_commit)
        made.append(store)
        return store

    yield make
    for store in made:
        drop_tables(store)
        store.close()


def _unflushed(observer: sqlalchemy.Connection) -> bool:
    """Whether the server has written WAL that it has not flushed yet."""
    row = observer.execute(
        sqlalchemy.text("SELECT pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()")
    ).one()
    return bool(row[0])


def _record(n: int, version: int = 1) -> Record:
    return Record(f"{n:032x}", "alice", 4_000_000_000.0, version, b"payload %d" % version)


def _unflushed_after_each(observer: sqlalchemy.Connection, operation: Callable[[int], Any]) -> int:
    """Run ``operation(i)`` BURST times; how many times the WAL was left unflushed."""
    count = 0
    for i in range(BURST):
        operation(i)
        count += _unflushed(observer)
    return count


def test_session_writes_commit_without_waiting_for_the_disk(
    make_store: Callable[..., SQLStore], observer: sqlalchemy.Connection
) -> None:
    durable, fast = make_store(async_commit=False), make_store(async_commit=True)
    for store in (durable, fast):
        for i in range(BURST):
            assert store.save(_record(i), expected=None, now=0.0)

    def update(store: SQLStore) -> Callable[[int], Any]:
        return lambda i: store.save(_record(i, 2), expected=1, now=0.0)

    # A durable commit has flushed the WAL up to itself when it returns (a write of
    # another session of the server could slip in between: allow a few).
    assert _unflushed_after_each(observer, update(durable)) <= BURST // 10
    # An asynchronous one has not, most of the time: the WAL writer catches up later.
    assert _unflushed_after_each(observer, update(fast)) >= BURST // 2
    assert [fast.load(_record(i).key) for i in range(BURST)] == [
        _record(i, 2) for i in range(BURST)
    ]


def test_deletions_wait_for_the_disk_even_with_asynchronous_commits(
    make_store: Callable[..., SQLStore], observer: sqlalchemy.Connection
) -> None:
    fast = make_store(async_commit=True)
    for i in range(BURST):
        assert fast.save(_record(i), expected=None, now=0.0)
    # A logout or a revocation: flushed when it returns, and with it the writes before.
    assert _unflushed_after_each(observer, lambda i: fast.delete(_record(i).key)) <= BURST // 10
    assert all(fast.load(_record(i).key) is None for i in range(BURST))
    for i in range(BURST):
        assert fast.save(_record(i), expected=None, now=0.0)
    assert fast.delete_many([_record(i).key for i in range(BURST)]) == BURST
    assert not _unflushed(observer)


def test_only_the_store_s_own_connections_commit_asynchronously(
    make_store: Callable[..., SQLStore],
) -> None:
    fast = make_store(async_commit=True)
    assert fast.save(_record(1), expected=None, now=0.0)
    assert "asynchronous commit" in fast.describe()
    # The engine is the app's too (Flask-SQLAlchemy's, say): its connections are durable.
    with fast.engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SHOW synchronous_commit")).scalar() == "on"
    assert "asynchronous" not in make_store(async_commit=False).describe()


def test_an_app_on_postgresql_with_asynchronous_commits_works_end_to_end(
    postgres_url: str,
) -> None:
    app = Flask(__name__)
    table = "cr_async_" + secrets.token_hex(4)
    app.config.update(
        SECRET_KEY="test-secret-" + "k" * 20,
        CLOAKROOM_STORE=postgres_url,
        CLOAKROOM_SQL_TABLE=table,
        CLOAKROOM_SQL_ASYNC_COMMIT=True,
    )
    cloak = Cloakroom(app)

    @app.post("/login")
    def login() -> str:
        cloak.login("alice")
        session["cart"] = ["tea"]
        return "in"

    @app.get("/read")
    def read() -> str:
        return f"{cloak.user_id} {session.get('cart')}"

    @app.post("/logout")
    def logout() -> str:
        cloak.logout()
        return "out"

    client = app.test_client()
    store = app.extensions["cloakroom"].store
    try:
        assert isinstance(store, SQLStore) and store.async_commit
        client.post("/login")
        assert client.get("/read").text == "alice ['tea']"
        with app.app_context():
            assert len(cloak.sessions("alice")) == 1
        client.post("/logout")
        assert client.get("/read").text == "None None"
        with app.app_context():
            assert cloak.sessions("alice") == []
    finally:
        drop_tables(store)
        store.close()


@pytest.mark.parametrize(
    ("store", "named"),
    [
        (None, "sqlite"),  # the default store
        ("memory://", "memory://"),
        ("redis://127.0.0.1:1/0", "redis://"),  # refused before any connection is made
        ("file:///tmp/cloakroom-never-made", "file://"),
    ],
)
def test_asynchronous_commits_on_another_store_fail_at_start_up(
    store: str | None, named: str, tmp_path: Any
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(SECRET_KEY="test-secret-" + "k" * 20, CLOAKROOM_SQL_ASYNC_COMMIT=True)
    if store is not None:
        app.config["CLOAKROOM_STORE"] = store
    with pytest.raises(ConfigError) as raised:
        Cloakroom(app)
    assert raised.value.key == "CLOAKROOM_SQL_ASYNC_COMMIT"
    assert "PostgreSQL" in str(raised.value) and named in str(raised.value)


def test_asynchronous_commits_with_a_store_built_by_the_app_fail_at_start_up(
    tmp_path: Any,
) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 's.db'}")
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test-secret-" + "k" * 20, CLOAKROOM_SQL_ASYNC_COMMIT=True)
    fix = re.escape("SQLStore(engine, async_commit=True)")
    with pytest.raises(ConfigError, match=fix) as raised:
        Cloakroom(app, store=SQLStore(engine))
    assert raised.value.key == "CLOAKROOM_SQL_ASYNC_COMMIT"
    with pytest.raises(ConfigError, match="is for PostgreSQL"):
        SQLStore(engine, async_commit=True)
    engine.dispose()


def test_the_setting_takes_a_bool_only() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test-secret-" + "k" * 20, CLOAKROOM_SQL_ASYNC_COMMIT="yes")
    with pytest.raises(ConfigError, match="expected True or False") as raised:
        Cloakroom(app)
    assert raised.value.key == "CLOAKROOM_SQL_ASYNC_COMMIT"


def test_libpq_options_in_the_url_are_kept_beside_the_store_s_own(postgres_url: str) -> None:
    """A URL's ``?options=-c ...`` (a search_path, say) reaches the server, and the
    store's statement timeout is still set."""
    schema = "cr_opts_" + secrets.token_hex(4)
    admin = sqlalchemy.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    url = sqlalchemy.make_url(postgres_url).update_query_dict(
        {"options": f"-c search_path={schema}"}
    )
    store = open_store(url.render_as_string(hide_password=False), timeout=1.5)
    assert isinstance(store, SQLStore)
    try:
        assert store.save(_record(7), expected=None, now=0.0)
        with store.engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SHOW search_path")).scalar() == schema
            assert conn.execute(sqlalchemy.text("SHOW statement_timeout")).scalar() == "1500ms"
        with admin.connect() as conn:  # the table went where the URL said
            found = conn.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = :s AND table_name = 'cloakroom_sessions'"
                ),
                {"s": schema},
            ).scalar()
        assert found == 1
    finally:
        store.close()
        with admin.begin() as conn:
            conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
