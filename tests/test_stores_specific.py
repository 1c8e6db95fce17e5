"""Store behaviour beyond the contract: file paths, SQL schema and engines."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, func, inspect, select, text

from flask_cloakroom import Cloakroom, StoreError
from flask_cloakroom.stores import Record
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.sql import SQLStore

from .conftest import add_views, build_store, store_config


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "/etc/passwd", "..", "", "a" * 32 + "/../x", "ABCDEF" * 6, "0" * 31],
)
def test_file_store_refuses_keys_that_are_not_hashes(tmp_path: Path, key: str) -> None:
    store = FileStore(str(tmp_path / "s"))
    assert store.load(key) is None
    assert store.delete(key) is False
    with pytest.raises(StoreError, match="not a store key"):
        store.save(Record(key, None, 1e10, 1, b"x"), expected=None, now=0)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"records", "users", "events"}


def test_file_store_keeps_user_ids_out_of_paths(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "s"))
    user = "../../../tmp/evil\x00name"
    record = Record("ab" + "0" * 30, user, 1e10, 1, b"x")
    assert store.save(record, expected=None, now=0)
    names = [p.name for p in (tmp_path / "s").rglob("*")]
    assert all("evil" not in n and ".." not in n for n in names)
    assert [r.user_id for r in store.user_records(user, now=0)] == [user]


def test_file_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "s"), durable=True)
    key = "cd" + "1" * 30
    store.save(Record(key, "u", 1e10, 1, b"one"), expected=None, now=0)
    store.save(Record(key, "u", 1e10, 2, b"two"), expected=1, now=0)
    leftovers = list((tmp_path / "s").rglob(".tmp-*"))
    assert leftovers == []
    loaded = store.load(key)
    assert loaded is not None
    assert loaded.payload == b"two"


def test_sql_store_creates_its_table_with_indexes(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    store = SQLStore(engine, table="my_sessions")
    assert store.count(now=0) == 0
    inspector = inspect(engine)
    assert inspector.get_pk_constraint("my_sessions")["constrained_columns"] == ["key"]
    indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("my_sessions")}
    assert {("user_id",), ("expires_at",)} <= indexed


def test_postgres_purge_batches_walk_the_expiry_index_from_where_the_last_one_ended(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A batch's cost must not grow with the rows deleted before it, nor with the live
    rows beside them.  Picking "any 100 expired rows" let PostgreSQL scan the table from
    its first page, past every live row and every row the purge had deleted (dead until
    a vacuum); from the start of the expiry index, it would pass every deleted entry.
    Here the live rows fill the table's first pages, as in a table whose old sessions
    expired after newer ones were stored, and the pages each batch's pick touches are
    counted with EXPLAIN (ANALYZE, BUFFERS)."""
    store = build_store("postgres", request, tmp_path)
    assert isinstance(store, SQLStore)
    now = 1_800_000_000.0
    rows = 4000
    store._ensure_table()
    with store.engine.begin() as conn:
        for expires in (now + 3600.0, None):
            conn.execute(
                store.table.insert(),
                [
                    {
                        "key": f"{expires is None:d}{n:031x}",
                        "user_id": None,
                        "expires_at": expires or now - rows + n,  # all apart, all expired
                        "version": 1,
                        "payload": b"x" * 200,
                    }
                    for n in range(rows)
                ],
            )
        conn.execute(text(f"ANALYZE {store.table.name}"))

    def pages_of_next_pick(_deleted: int) -> None:
        # What the next batch's pick touches: from the oldest expiry left (the store's
        # floor is the last batch's newest, just below it) to as many rows on.
        with store.engine.connect() as conn:
            floor = conn.execute(
                select(func.min(store.table.c.expires_at)).where(store.table.c.expires_at <= now)
            ).scalar_one()
            if floor is None:
                return
            pick = store._purge_pick(100, True, addresses=True).params(now=now, floor=floor)
            sql = pick.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
            plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"))
            top = plan.scalar_one()[0]["Plan"]
        touched.append(int(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)))

    touched: list[int] = []
    assert store.purge_expired(now=now, batch_size=100, progress=pages_of_next_pick) == rows
    assert len(touched) == rows // 100 - 1
    # The table is about 240 pages (the live rows half of them), its expiry index about
    # 25; the pages a batch's rows lie on are about 5.  Measured (PostgreSQL 15): 6 to 8
    # a batch; picking any expired rows, 150 growing to 286; in expiry order from the
    # index's start, 10 growing to 29.
    assert max(touched) <= 20, touched
    assert max(touched[-10:]) <= max(touched[:10]) + 5, touched  # no growth
    assert store.count(now=now) == rows


def test_postgres_purge_picks_keys_where_the_table_has_no_row_addresses(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A purge batch deletes by row address (ctid) on PostgreSQL's own tables.  A view
    has none, nor may a server that speaks PostgreSQL's protocol on storage of its own:
    there the purge picks keys, and still deletes only what expired."""
    store = build_store("postgres", request, tmp_path)
    assert isinstance(store, SQLStore)
    store._ensure_table()
    view = f"{store.table.name}_view"
    now = 1_800_000_000.0
    with store.engine.begin() as conn:
        everything = select(store.table).compile(store.engine)
        conn.execute(text(f"CREATE VIEW {view} AS {everything}"))
    through_view = SQLStore(store.engine, table=view)
    try:
        dead = [Record(f"{n:032x}", "u", now - 10 - n, 1, b"x") for n in range(5)]
        live = Record(f"{99:032x}", "u", now + 60, 1, b"x")
        for record in [*dead, live]:
            assert through_view.save(record, expected=None, now=now - 100)
        assert through_view.purge_expired(now=now, batch_size=2) == 5
        assert through_view._addresses is False
        assert [r.key for r in store.user_records("u", now=now)] == [live.key]
        assert store.purge_expired(now=now) == 0
        assert store._addresses is True
    finally:
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP VIEW IF EXISTS {view}"))


def test_postgres_purge_picks_keys_on_a_partitioned_table(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On a partitioned table each partition numbers its rows from the same first
    address, so a batch deleting by ``ctid`` would also take other partitions' expired
    rows and move its floor past rows it has not reached.  There the purge picks keys:
    every expired row goes, whichever partition holds it, and the live ones stay."""
    store = build_store("postgres", request, tmp_path)
    assert isinstance(store, SQLStore)
    name = f"{store.table.name}_parted"
    now = 1_800_000_000.0
    first = [f"a{n:031x}" for n in range(4)]  # one partition: the four oldest
    second = [f"b{n:031x}" for n in range(3)]  # the other: two expired later, one live
    with store.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {name} (key varchar(32) PRIMARY KEY, user_id varchar(255),"
                " expires_at double precision NOT NULL, version integer NOT NULL,"
                " payload bytea NOT NULL) PARTITION BY LIST (key)"
            )
        )
        listed = ", ".join(f"'{key}'" for key in first)
        conn.execute(text(f"CREATE TABLE {name}_1 PARTITION OF {name} FOR VALUES IN ({listed})"))
        conn.execute(text(f"CREATE TABLE {name}_2 PARTITION OF {name} DEFAULT"))
        conn.execute(text(f"CREATE INDEX ON {name} (expires_at)"))
    parted = SQLStore(store.engine, table=name, create_table=False)
    try:
        records = [Record(k, "u", now - 100 + n, 1, b"x") for n, k in enumerate(first)]
        records += [Record(second[0], "u", now - 50, 1, b"x")]
        records += [Record(second[1], "u", now - 49, 1, b"x")]
        records += [Record(second[2], "u", now + 60, 1, b"x")]
        for record in records:
            assert parted.save(record, expected=None, now=now - 200)
        with store.engine.connect() as conn:
            addresses = text(f"SELECT count(DISTINCT ctid), count(*) FROM {name}")  # noqa: S608
            shared = conn.execute(addresses).one()
        assert shared[0] < shared[1]  # the partitions' rows share addresses
        assert parted.purge_expired(now=now, batch_size=1) == 6
        assert parted._addresses is False
        assert parted.count_expired(now=now) == 0
        assert [r.key for r in parted.user_records("u", now=now)] == [second[2]]
    finally:
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


def test_postgres_purge_keeps_a_session_renewed_while_it_runs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A purge batch is one statement that picks its rows itself; a session renewed
    between that pick and the delete (its row locked by the renewing request) survives."""
    store = build_store("postgres", request, tmp_path)
    assert isinstance(store, SQLStore)
    now = 1_800_000_000.0
    keys = [f"{n:032x}" for n in range(1, 4)]
    for key in keys:
        assert store.save(Record(key, "u", now - 10, 1, b"old"), expected=None, now=now - 100)
    renewed = keys[1]
    table = store.table
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE '%DELETE FROM%'"
    )
    # Both connections are open before the purge starts: on a busy machine, opening the
    # watcher's afterwards could take longer than the purge's statement timeout.
    with store.engine.connect() as renewing, store.engine.connect() as watcher:
        renewing.execute(
            table.update()
            .where(table.c.key == renewed)
            .values(expires_at=now + 3600, version=2, payload=b"renewed")
        )  # not committed yet: the row stays locked

        def purge_waits() -> bool:
            found = bool(watcher.execute(waiting).scalar_one())
            watcher.rollback()  # a transaction sees one snapshot of pg_stat_activity
            return found

        purge_waits()
        outcome: dict[str, int] = {}
        purge = threading.Thread(target=lambda: outcome.update(n=store.purge_expired(now=now)))
        purge.start()
        deadline = time.monotonic() + 10
        while not purge_waits() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert purge_waits(), "the purge never waited for the row"
        renewing.commit()
        purge.join(timeout=30)
    assert outcome == {"n": 2}
    kept = store.load(renewed)
    assert kept is not None and kept.payload == b"renewed" and kept.version == 2
    assert store.load(keys[0]) is None and store.load(keys[2]) is None


class _Captured(Exception):
    """Raised in place of connecting: the driver's arguments were what was wanted."""


def _driver_arguments(url: str) -> dict[str, object]:
    """The keyword arguments the store's engine would hand the driver for ``url``."""
    from sqlalchemy import event

    from flask_cloakroom.stores import open_store

    store = open_store(url, timeout=1.5)
    assert isinstance(store, SQLStore)
    seen: dict[str, object] = {}

    def capture(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        seen.update(cparams)
        raise _Captured

    event.listen(store.engine, "do_connect", capture)
    try:
        with pytest.raises(_Captured):
            store.engine.connect()
    finally:
        store.close()
    return seen


@pytest.mark.parametrize(
    ("url", "wanted"),
    [
        # SQLAlchemy turns ssl_* into PyMySQL's ssl dict, which checks the certificate
        # and the host name (docs/stores.md, "TLS to the database").
        (
            "mysql+pymysql://app@db.example/app?ssl_ca=/etc/ssl/db-ca.pem",
            {"ssl": {"ca": "/etc/ssl/db-ca.pem"}},
        ),
        (
            "postgresql+psycopg://app@db.example/app"
            "?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
            {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/db-ca.pem"},
        ),
    ],
)
def test_a_urls_tls_settings_reach_the_driver_beside_the_stores_timeouts(
    url: str, wanted: dict[str, object]
) -> None:
    """The store's own connection settings (timeouts) are added to the URL's, never in
    place of them: a TLS setting in CLOAKROOM_STORE is what the driver gets."""
    pytest.importorskip("pymysql" if url.startswith("mysql") else "psycopg")
    given = _driver_arguments(url)
    for name, value in wanted.items():
        assert given[name] == value
    assert given["connect_timeout"] == (1.5 if url.startswith("mysql") else 2)


def test_an_engine_can_be_the_store(tmp_path: Path) -> None:
    """Flask-SQLAlchemy users pass their engine; Cloakroom adds its table to that database."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_STORE=engine)
    add_views(app, Cloakroom(app))
    client = app.test_client()
    client.post("/set/x", json=[1, 2])
    assert client.get("/get/x").get_json() == {"value": [1, 2]}
    assert "cloakroom_sessions" in inspect(engine).get_table_names()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = SQLStore(create_engine(f"sqlite:///{tmp_path / 'w.db'}"))
    store.count(now=0)
    assert os.path.exists(tmp_path / "w.db-wal")


def test_a_sqlite_write_tries_a_lock_held_elsewhere_again_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's write holds SQLite's lock for tens of microseconds: a write that
    finds it taken tries again after 50 µs, then 100, 200 ... up to 1 ms between tries
    (SQLite's own busy handler, which would sleep a whole millisecond first, is off), and
    goes through once the lock is free."""
    import sqlite3

    from flask_cloakroom.stores import sql

    path = tmp_path / "busy.db"
    store = SQLStore(create_engine(f"sqlite:///{path}"), busy_timeout=5)
    assert store.save(Record("a" * 32, None, 1e10, 1, b"first"), expected=None, now=0)
    waits: list[float] = []

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(sql, "time", Clock)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:  # the lock taken as another process would take it
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        holder.execute("ROLLBACK")
        holder.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(5)
    threading.Timer(0.02, release.set).start()
    assert store.save(Record("a" * 32, None, 1e10, 2, b"second"), expected=1, now=0)
    holder.join(5)
    assert release.is_set(), "the write went through while the lock was held"
    assert store.load("a" * 32) == Record("a" * 32, None, 1e10, 2, b"second")
    assert len(waits) >= 7, waits  # 20 ms at the most 1 ms apart
    assert waits[:6] == [50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1e-3]
    assert set(waits[5:]) == {1e-3}
    store.close()


# -- Turns: the in-process write queue of SQLite and of Redis's locked updates ----------


def test_turns_are_given_in_arrival_order_and_waits_are_bounded() -> None:
    import threading
    import time

    from flask_cloakroom.stores.turns import Turns

    turns = Turns()
    assert turns.acquire(timeout=0.1)
    order: list[int] = []
    arrived = threading.Event()
    threads = []
    for i in range(8):
        arrived.clear()

        def wait(i: int = i) -> None:
            arrived.set()
            assert turns.acquire(timeout=5)
            order.append(i)
            turns.release()

        thread = threading.Thread(target=wait)
        thread.start()
        arrived.wait(1)
        time.sleep(0.02)  # let it queue before the next one arrives
        threads.append(thread)
    # A waiter that gives up leaves the queue without taking a turn.
    started = time.monotonic()
    assert not turns.acquire(timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 1.0
    turns.release()
    for thread in threads:
        thread.join(5)
    assert order == list(range(8))
    # Free again: the next caller gets it at once, and a released lock is not held.
    assert turns.acquire(timeout=0)
    turns.release()
    assert turns.acquire(timeout=0)


def test_turns_with_slots_lend_that_many_at_once_then_queue_in_order() -> None:
    """``Turns(size)``: the SQL store's connection slots."""
    import threading
    import time

    from flask_cloakroom.stores.turns import Turns

    slots = Turns(3)
    assert all(slots.acquire(timeout=0) for _ in range(3))
    started = time.monotonic()
    assert not slots.acquire(timeout=0.1)  # all three lent: the fourth waits, then gives up
    assert 0.05 <= time.monotonic() - started < 1.0
    order: list[int] = []
    threads = []
    for i in range(4):

        def wait(i: int = i) -> None:
            assert slots.acquire(timeout=5)
            order.append(i)

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 5
        while len(slots._waiting) <= i and time.monotonic() < deadline:
            time.sleep(0.001)  # it queues before the next one arrives
        threads.append(thread)
    # Each release hands a slot to the longest waiter (a semaphore's slots have no
    # owner: seven taken, seven given back, whoever gives them).
    for count in range(1, 5):
        slots.release()
        deadline = time.monotonic() + 5
        while len(order) < count and time.monotonic() < deadline:
            time.sleep(0.001)  # that waiter notes its turn before the next release
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3]
    for _ in range(3):
        slots.release()
    assert all(slots.acquire(timeout=0) for _ in range(3))  # all free again
    for _ in range(3):
        slots.release()
    with pytest.raises(ValueError, match="released more often"):
        slots.release()  # as BoundedSemaphore: a release without its acquire is a bug
    with pytest.raises(ValueError, match="at least one slot"):
        Turns(0)


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "not-closed"])
@pytest.mark.parametrize(
    "kind",
    ["sqlite", "postgres", "mysql", "redis", "redis_cached", "redis_cluster", "redis_sentinel"],
)
def test_an_app_dropped_with_its_store_leaves_nothing_behind(
    kind: str, closed: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An app factory run once per test, or an app rebuilt at run time, drops stores.
    Each must be freed with what it holds: the driver's client or engine and, on
    Redis, the lanes and their sockets (a Cluster's per node).  A Cluster store's lanes
    had been held for good by a clean-up callback that reached the client it waited
    for: every Cluster store made kept its client, its command table and, unless
    closed, a socket to each node."""
    config = store_config(kind, request, tmp_path)

    def use_and_drop() -> list[weakref.ref[Any]]:
        app = Flask(__name__)
        app.config.update(SECRET_KEY="s" * 32, **config)
        cloak = Cloakroom(app)
        add_views(app, cloak)
        client = app.test_client()
        for step in range(3):
            assert client.post("/login/alice").status_code == 200
            assert client.post("/set/k", json=step).status_code == 200
            assert client.get("/get/k").get_json() == {"value": step}
        store = app.extensions["cloakroom"].store
        held = [store, *_store_parts(store)]
        if closed:
            store.close()
        return [weakref.ref(part) for part in held]

    refs = use_and_drop()
    gc.collect()
    alive = [type(ref()).__name__ for ref in refs if ref() is not None]
    assert len(refs) > 1, refs
    assert alive == [], f"{kind}: still held after the app was dropped: {alive}"


def _store_parts(store: Any) -> list[Any]:
    """What a store holds that must go with it: its engine, or its redis-py client and
    the connection pools of its lanes (a Cluster's node clients and theirs too)."""
    if isinstance(store, SQLStore):
        return [store.engine]
    client = store.client
    if not store.cluster:
        return [client, client.connection_pool]
    assert store._node_lanes, "the requests went through no node's lane"
    nodes = [node.redis_connection for node in client.get_nodes() if node.redis_connection]
    return [client, *nodes, *(node.connection_pool for node in nodes)]
