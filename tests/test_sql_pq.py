"""The SQL store's libpq path on PostgreSQL (stores/sql_pq.py), on a real server.

What must hold: the hot statements really run on it, values come back exactly as
psycopg's cursors give them (floats to the last bit, every byte of a payload, NULLs,
non-ASCII ids), a statement the server forgot (a pooler's reset) is prepared again and
one it knows already is used, an error reply is psycopg's exception for it (a unique
violation is a lost race), and a table whose columns it cannot read sends the store
back to psycopg's cursors.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select

from flask_cloakroom.stores import open_store
from flask_cloakroom.stores.base import PollBackoff, Record
from flask_cloakroom.stores.sql import SQLStore

from .support import drop_tables

NOW = 1_900_000_000.0


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[SQLStore]:
    store = open_store(postgres_url, sql_table="cr_pq_" + secrets.token_hex(4))
    assert isinstance(store, SQLStore)
    yield store
    drop_tables(store)
    store.close()


def _cursor_view(store: SQLStore, key: str) -> tuple[object, ...] | None:
    """The record's row as psycopg's own cursor reads it (the other path)."""
    query = sql.SQL(
        "SELECT key, user_id, expires_at, version, payload FROM {} WHERE key = %s"
    ).format(sql.Identifier(store.table.name))
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        with raw.cursor() as cursor:
            cursor.execute(query, (key,))
            row = cursor.fetchone()
        raw.rollback()
    return None if row is None else tuple(row)


def test_the_hot_statements_run_on_libpq_and_read_back_exactly(pg_store: SQLStore) -> None:
    assert pg_store._pq is not None
    records = [
        Record("a" * 32, "user-é-😀", NOW + 0.1 + 1e-7, 1, bytes(range(256)) * 3),
        Record("b" * 32, None, 1_234_567_890.123_456_7, 7, b""),
        Record("c" * 32, "u" * 255, NOW + 123.456, 2_000_000_000, b"\x00\x01{json}\xff"),
    ]
    for record in records:
        assert pg_store.save(record, expected=None, now=NOW)
        assert pg_store.load(record.key) == record
        row = _cursor_view(pg_store, record.key)
        assert row is not None
        assert row[:4] == (record.key, record.user_id, record.expires_at, record.version)
        assert isinstance(row[4], bytes) and row[4] == record.payload
    # Prepared once on the connection, under the store's own names.
    idle = list(pg_store._connections._idle)
    load_name = pg_store._pq["load"].name
    assert load_name.startswith(b"cloakroom_load_")
    assert idle and any(load_name in conn.prepared for conn in idle)
    # Another table's statement has another name (a pooler may share server connections).
    other = SQLStore(pg_store.engine, table=pg_store.table.name + "_x", create_table=False)
    assert other._pq is not None and other._pq["load"].name != load_name
    # An update is conditional on the version; a create on an existing key is refused.
    newer = Record("a" * 32, None, NOW + 60, 2, b"v2")
    assert not pg_store.save(newer, expected=5, now=NOW)
    assert pg_store.save(newer, expected=1, now=NOW)
    assert not pg_store.save(records[1], expected=None, now=NOW)  # a unique violation
    assert pg_store.load("a" * 32) == newer
    assert pg_store.user_records("u" * 255, now=NOW) == [records[2]]
    assert pg_store.delete("b" * 32) and pg_store.load("b" * 32) is None


def test_a_statement_the_server_forgot_is_prepared_again(pg_store: SQLStore) -> None:
    record = Record("d" * 32, "alice", NOW + 60, 1, b"payload")
    assert pg_store.save(record, expected=None, now=NOW)
    assert pg_store.load(record.key) == record
    for conn in pg_store._connections._idle:
        conn.dbapi.execute("DEALLOCATE ALL")  # what a pooler's reset does
    assert pg_store.load(record.key) == record
    assert pg_store.save(Record("d" * 32, "alice", NOW + 90, 2, b"p2"), expected=1, now=NOW)
    assert pg_store.load(record.key) == Record("d" * 32, "alice", NOW + 90, 2, b"p2")
    # The other way round: the server knows the statement and the store does not (a
    # pooler's server connection that another client prepared it on).
    for conn in pg_store._connections._idle:
        conn.prepared.clear()
    assert pg_store.load(record.key) == Record("d" * 32, "alice", NOW + 90, 2, b"p2")
    assert pg_store._pq is not None
    load_name = pg_store._pq["load"].name
    assert all(load_name in conn.prepared for conn in pg_store._connections._idle)


@pytest.mark.parametrize("busy_poll", [0.0, 0.0001], ids=["asleep", "polled"])
def test_an_error_reply_is_psycopgs_exception_for_it(pg_store: SQLStore, busy_poll: float) -> None:
    from flask_cloakroom.stores.sql_pq import PQCursor, PQStatement

    pg_store.ping()
    with pg_store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        raw.autocommit = True
        cursor = PQCursor(raw, {}, {}, busy_poll)
        broken = PQStatement(b"cloakroom_test", b"SELECT 1/$1::int", ("n",), returns_rows=True)
        cursor.execute(broken, (1,))
        assert cursor.fetchone() == (1,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            cursor.execute(broken, (0,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            cursor.execute("SELECT * FROM cloakroom_no_such_table")


def state(polling: PollBackoff) -> tuple[int, int]:
    """Waits left to skip the polling for, and how many the next miss skips."""
    return polling.skip, polling.backoff


@pytest.mark.usefixtures("no_collector_pauses")  # it counts answers within 1 ms
def test_a_quick_answer_is_polled_for_and_a_slow_one_slept_for(postgres_url: str) -> None:
    """Each statement keeps its own polling count on its connection: a quick one (a
    load) stays polled for; one that waits longer than the polling time (an update
    held up by a row lock, as a durable commit's fsync would) gets its answer all the
    same, asleep, and its next wait skips the polling; then it is polled for again."""
    store = open_store(postgres_url, sql_table="cr_pq_" + secrets.token_hex(4), busy_poll_us=1000)
    assert isinstance(store, SQLStore) and store._pq is not None
    try:
        load, update = store._pq["load"].name, store._pq["update"].name
        record = Record("f" * 32, "alice", NOW + 60, 1, b"payload")
        assert store.save(record, expected=None, now=NOW)
        for _ in range(20):
            assert store.load(record.key) == record
        (conn,) = store._connections._idle
        polls = conn.polls[load]
        # Polled for, and answered within a millisecond: a hit leaves nothing to skip.
        # A busy machine may answer one late (a miss: the next wait is slept); the
        # next hit starts over.
        for _ in range(50):
            if state(polls) == (0, 1):
                break
            assert store.load(record.key) == record
        assert state(polls) == (0, 1)
        assert polls.hits > polls.misses, (polls.hits, polls.misses)
        with store.engine.connect() as other:  # holds the row's lock for 50 ms
            key = store.table.c.key
            other.execute(select(key).where(key == record.key).with_for_update())
            timer = threading.Timer(0.05, other.rollback)
            timer.start()
            started = time.monotonic()
            assert store.save(record._replace(version=2), expected=1, now=NOW)  # asleep
            assert time.monotonic() - started >= 0.04
            timer.join()
        assert state(conn.polls[update]) == (1, 2)  # a miss: the next wait skips the polling
        assert conn.polls[update].misses == 1
        assert store.save(record._replace(version=3), expected=2, now=NOW)
        assert state(conn.polls[update]) == (0, 2)  # skipped
        assert store.save(record._replace(version=4), expected=3, now=NOW)
        # Polled for again: answered in time (starts over), or a miss (skips two next).
        assert state(conn.polls[update]) in ((0, 1), (2, 4))
        assert store.load(record.key) == record._replace(version=4)
    finally:
        drop_tables(store)
        store.close()


def test_no_polling_when_it_is_off(postgres_url: str) -> None:
    store = open_store(postgres_url, sql_table="cr_pq_" + secrets.token_hex(4), busy_poll_us=0)
    assert isinstance(store, SQLStore)
    try:
        record = Record("g" * 32, None, NOW + 60, 1, b"p")
        assert store.save(record, expected=None, now=NOW)
        assert store.load(record.key) == record
        assert [conn.polls for conn in store._connections._idle] == [{}]
    finally:
        drop_tables(store)
        store.close()


def test_a_table_it_cannot_read_sends_the_store_back_to_psycopgs_cursors(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = "cr_pq_numeric_" + secrets.token_hex(4)
    store = open_store(postgres_url, sql_table=table)
    assert isinstance(store, SQLStore)
    try:
        with store.engine.begin() as conn:  # made by hand: expires_at as NUMERIC
            conn.exec_driver_sql(
                f"CREATE TABLE {table} (key varchar(32) PRIMARY KEY, user_id varchar(255), "
                "expires_at numeric NOT NULL, version integer NOT NULL, payload bytea NOT NULL)"
            )
        record = Record("e" * 32, "bob", NOW + 60.5, 1, b"data")
        assert store.save(record, expected=None, now=NOW)  # writes need no conversion
        with caplog.at_level(logging.WARNING, logger="flask_cloakroom"):
            loaded = store.load(record.key)
        assert store._pq is None
        assert "using psycopg's cursors instead" in caplog.text
        assert loaded is not None and loaded.key == record.key and loaded.payload == b"data"
        assert float(loaded.expires_at) == NOW + 60.5
    finally:
        drop_tables(store)
        store.close()
