"""The store contract: one suite, run unchanged against every store backend.

The ``store`` fixture (tests/conftest.py) yields an empty store per backend:
memory, SQLite, files, PostgreSQL and MariaDB, all real.  A third-party store
can reuse this module by overriding that fixture.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest

from flask_cloakroom.stores import Record, Store
from flask_cloakroom.stores.base import EventRecord

from .conftest import STORE_KINDS, build_store
from .minimal_store import MinimalStore

NOW = 2_000_000_000.0


@pytest.fixture(params=[*STORE_KINDS, "postgres_async"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store, once per backend, and once more on PostgreSQL with
    asynchronous commits (CLOAKROOM_SQL_ASYNC_COMMIT), whose deletions take
    another path."""
    return build_store(request.param, request, tmp_path)


def rec(
    key: str | None = None,
    *,
    user: str | None = None,
    expires: float = NOW + 600,
    version: int = 1,
    payload: bytes = b'{"v":1}',
) -> Record:
    return Record(key or secrets.token_hex(16), user, expires, version, payload)


def test_load_missing_returns_none(store: Store) -> None:
    assert store.load(secrets.token_hex(16)) is None


def test_create_then_load_round_trips_every_field(store: Store) -> None:
    payload = bytes(range(256)) * 4  # every byte value survives
    record = rec(user="ålice 🔑", expires=NOW + 123.456, payload=payload)
    assert store.save(record, expected=None, now=NOW) is True
    loaded = store.load(record.key)
    assert loaded is not None
    assert loaded.key == record.key
    assert loaded.user_id == "ålice 🔑"
    assert loaded.expires_at == pytest.approx(NOW + 123.456, abs=1e-3)
    assert loaded.version == 1
    assert loaded.payload == payload


def test_large_payload_round_trips(store: Store) -> None:
    record = rec(payload=secrets.token_bytes(64 * 1024))
    assert store.save(record, expected=None, now=NOW)
    loaded = store.load(record.key)
    assert loaded is not None
    assert loaded.payload == record.payload


def test_create_refuses_an_existing_key(store: Store) -> None:
    first = rec(payload=b"first")
    assert store.save(first, expected=None, now=NOW)
    clash = rec(first.key, payload=b"second")
    assert store.save(clash, expected=None, now=NOW) is False
    loaded = store.load(first.key)
    assert loaded is not None
    assert loaded.payload == b"first"


def test_conditional_update(store: Store) -> None:
    record = rec(payload=b"v1")
    assert store.save(record, expected=None, now=NOW)
    v2 = rec(record.key, version=2, payload=b"v2")
    assert store.save(v2, expected=1, now=NOW) is True
    stale = rec(record.key, version=2, payload=b"stale")
    assert store.save(stale, expected=1, now=NOW) is False
    loaded = store.load(record.key)
    assert loaded is not None
    assert (loaded.version, loaded.payload) == (2, b"v2")


def test_update_never_recreates_a_deleted_record(store: Store) -> None:
    record = rec()
    assert store.save(record, expected=None, now=NOW)
    assert store.delete(record.key) is True
    again = rec(record.key, version=2)
    assert store.save(again, expected=1, now=NOW) is False
    assert store.load(record.key) is None


def test_delete(store: Store) -> None:
    record = rec(user="u1")
    store.save(record, expected=None, now=NOW)
    assert store.delete(record.key) is True
    assert store.delete(record.key) is False
    assert store.load(record.key) is None
    assert store.user_records("u1", now=NOW) == []


def test_delete_many(store: Store) -> None:
    records = [rec(user="u") for _ in range(5)]
    for r in records:
        store.save(r, expected=None, now=NOW)
    gone = [r.key for r in records[:3]] + [secrets.token_hex(16)]
    assert store.delete_many(gone) == 3
    assert {r.key for r in store.user_records("u", now=NOW)} == {r.key for r in records[3:]}
    assert store.delete_many([]) == 0


def test_user_index(store: Store) -> None:
    alice = [rec(user="alice") for _ in range(3)]
    bob = rec(user="bob")
    anonymous = rec()
    for r in [*alice, bob, anonymous]:
        assert store.save(r, expected=None, now=NOW)
    assert {r.key for r in store.user_records("alice", now=NOW)} == {r.key for r in alice}
    assert [r.key for r in store.user_records("bob", now=NOW)] == [bob.key]
    assert store.user_records("carol", now=NOW) == []


def test_user_index_follows_a_change_of_user(store: Store) -> None:
    record = rec(user="alice")
    store.save(record, expected=None, now=NOW)
    moved = rec(record.key, user="bob", version=2)
    assert store.save(moved, expected=1, now=NOW)
    assert store.user_records("alice", now=NOW) == []
    assert [r.key for r in store.user_records("bob", now=NOW)] == [record.key]
    unbound = rec(record.key, user=None, version=3)
    assert store.save(unbound, expected=2, now=NOW)
    assert store.user_records("bob", now=NOW) == []


def test_user_records_hold_the_live_records_and_ours_leave_out_expired_ones(
    store: Store,
) -> None:
    live = rec(user="alice", expires=NOW + 60)
    dead = rec(user="alice", expires=NOW - 1)
    store.save(live, expected=None, now=NOW - 100)
    store.save(dead, expected=None, now=NOW - 100)
    keys = [r.key for r in store.user_records("alice", now=NOW)]
    assert live.key in keys
    if not isinstance(store, MinimalStore):  # the contract lets a store return them
        assert keys == [live.key]


def test_rotate_moves_the_record_atomically(store: Store) -> None:
    old = rec(user="alice", payload=b"old")
    store.save(old, expected=None, now=NOW)
    new = rec(user="alice", payload=b"new")
    assert store.rotate(old.key, new, expected=1, now=NOW) is True
    assert store.load(old.key) is None
    loaded = store.load(new.key)
    assert loaded is not None
    assert loaded.payload == b"new"
    assert [r.key for r in store.user_records("alice", now=NOW)] == [new.key]


def test_rotate_refuses_a_stale_or_missing_record(store: Store) -> None:
    old = rec(payload=b"old")
    store.save(old, expected=None, now=NOW)
    assert store.rotate(old.key, rec(), expected=7, now=NOW) is False
    loaded = store.load(old.key)
    assert loaded is not None
    assert loaded.payload == b"old"
    store.delete(old.key)
    orphan = rec()
    assert store.rotate(old.key, orphan, expected=1, now=NOW) is False
    assert store.load(orphan.key) is None


def test_scan_pages_through_every_record(store: Store) -> None:
    keys = {secrets.token_hex(16) for _ in range(25)}
    for key in keys:
        store.save(rec(key), expected=None, now=NOW)
    seen: set[str] = set()
    cursor = None
    pages = 0
    while True:
        page, cursor = store.scan(cursor=cursor, limit=4)
        pages += 1
        assert len(page) <= 40, "a page must stay near its limit"
        seen.update(r.key for r in page)
        if cursor is None:
            break
        assert pages < 100, "the scan does not end"
    assert seen == keys
    assert pages >= 3, "the store should page, not return everything at once"


def test_scan_of_an_empty_store(store: Store) -> None:
    page, cursor = store.scan(limit=10)
    assert (page, cursor) == ([], None)


def test_purge_expired_deletes_only_expired_records_in_batches(store: Store) -> None:
    dead = [rec(user="u", expires=NOW - i) for i in range(10)]
    at_the_edge = rec(expires=NOW)  # expires_at == now: dead
    live = [rec(user="u", expires=NOW + 1 + i) for i in range(4)]
    for r in [*dead, at_the_edge, *live]:
        store.save(r, expected=None, now=NOW - 1000)
    assert store.count(now=NOW) == 4
    assert store.purge_expired(now=NOW, batch_size=3) == 11
    assert store.count(now=NOW) == 4
    assert all(store.load(r.key) is None for r in dead)
    assert all(store.load(r.key) is not None for r in live)
    assert {r.key for r in store.user_records("u", now=NOW)} == {r.key for r in live}
    assert store.purge_expired(now=NOW) == 0


def test_purge_expired_takes_records_sharing_an_expiry_across_batches(store: Store) -> None:
    """Batches go on from the latest expiry the last one deleted: records that share it
    (a bulk import, a clock's coarse tick) are all deleted, however batches split them."""
    early = [rec(expires=NOW - 100) for _ in range(2)]
    tied = [rec(user="u", expires=NOW - 50) for _ in range(7)]
    late = [rec(expires=NOW - 10 + i) for i in range(3)]
    live = [rec(user="u", expires=NOW + 1) for _ in range(2)]
    for r in [*late, *tied, *live, *early]:
        store.save(r, expected=None, now=NOW - 1000)
    reports: list[int] = []
    assert store.purge_expired(now=NOW, batch_size=3, progress=reports.append) == 12
    assert sum(reports) == 12
    assert all(store.load(r.key) is None for r in [*early, *tied, *late])
    assert {r.key for r in store.user_records("u", now=NOW)} == {r.key for r in live}


def test_purge_expired_reports_progress_and_count_expired_is_exact_or_unknown(
    store: Store,
) -> None:
    dead = [rec(user="u", expires=NOW - 1 - i) for i in range(7)]
    live = [rec(user="u", expires=NOW + 1 + i) for i in range(3)]
    for r in [*dead, *live]:
        store.save(r, expected=None, now=NOW - 1000)
    counted = store.count_expired(now=NOW)
    assert counted is None or counted == 7
    assert store.count_expired(now=NOW - 1000) in (None, 0)
    reports: list[int] = []
    assert store.purge_expired(now=NOW, batch_size=2, progress=reports.append) == 7
    assert sum(reports) == 7
    assert all(0 < n <= 2 for n in reports), reports  # batch by batch, as it goes
    assert store.count_expired(now=NOW) in (None, 0)
    assert store.count(now=NOW) == 3
    nothing: list[int] = []
    assert store.purge_expired(now=NOW, progress=nothing.append) == 0
    assert sum(nothing) == 0


def test_count_counts_live_records(store: Store) -> None:
    assert store.count(now=NOW) == 0
    for i in range(3):
        store.save(rec(expires=NOW + 10 + i), expected=None, now=NOW)
    store.save(rec(expires=NOW - 5), expected=None, now=NOW - 10)
    assert store.count(now=NOW) == 3
    store.ping()


def test_conditional_writes_lose_no_update_under_contention(store: Store) -> None:
    """Threads increment one record with compare-and-set: every increment lands."""
    record = rec(payload=b"0")
    store.save(record, expected=None, now=NOW)
    threads, per_thread = 6, 15
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                while True:
                    current = store.load(record.key)
                    assert current is not None
                    value = int(current.payload) + 1
                    nxt = rec(record.key, version=current.version + 1, payload=b"%d" % value)
                    if store.save(nxt, expected=current.version, now=NOW):
                        break
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    final = store.load(record.key)
    assert final is not None
    assert int(final.payload) == threads * per_thread
    assert final.version == 1 + threads * per_thread


# -- the activity log ------------------------------------------------------------


def ev(at: float, kind: str = "login", user: str | None = "u", data: bytes = b"{}") -> EventRecord:
    return EventRecord(at, kind, user, data)


def test_events_round_trip_newest_first(logging_store: Store) -> None:
    logging_store.add_events([ev(NOW + i, data=bytes([i]) * 3) for i in range(5)])
    logging_store.add_events([])
    got = logging_store.events()
    assert [e.at for e in got] == [NOW + i for i in reversed(range(5))]
    assert got[0].data == b"\x04\x04\x04"
    assert got[0].kind == "login"
    assert got[0].user_id == "u"


def test_events_filters_and_paging(logging_store: Store) -> None:
    logging_store.add_events(
        [ev(NOW + i, kind="login" if i % 2 else "logout", user=f"u{i % 3}") for i in range(30)]
    )
    assert {e.user_id for e in logging_store.events(user_id="u1", limit=100)} == {"u1"}
    assert len(logging_store.events(user_id="u1", limit=100)) == 10
    assert {e.kind for e in logging_store.events(kinds=["logout"], limit=100)} == {"logout"}
    assert [e.at for e in logging_store.events(since=NOW + 27)] == [NOW + 29, NOW + 28, NOW + 27]
    page = logging_store.events(limit=4)
    older = logging_store.events(before=page[-1].at, limit=4)
    assert [e.at for e in page + older] == [NOW + 29 - i for i in range(8)]
    assert logging_store.events(user_id="nobody") == []


def test_events_across_days_and_pruning(logging_store: Store) -> None:
    day = 86400.0
    logging_store.add_events([ev(NOW - 3 * day), ev(NOW - 2 * day), ev(NOW - 1), ev(NOW)])
    assert len(logging_store.events(since=NOW - 2.5 * day)) == 3
    pruned = logging_store.prune_events(before=NOW - 1.5 * day)
    assert pruned >= 1  # whole-day stores may keep the boundary day
    remaining = [e.at for e in logging_store.events()]
    assert NOW - 3 * day not in remaining
    assert remaining[:2] == [NOW, NOW - 1]


def test_update_locked_lets_no_concurrent_change_in(store: Store) -> None:
    """Threads increment one record through update_locked alone: every increment lands."""
    record = rec(payload=b"0")
    store.save(record, expected=None, now=NOW)
    threads, per_thread = 6, 10
    errors: list[BaseException] = []

    def increment(current: Record | None) -> Record | None:
        assert current is not None
        return rec(
            record.key, version=current.version + 1, payload=b"%d" % (int(current.payload) + 1)
        )

    def work() -> None:
        try:
            for _ in range(per_thread):
                assert store.update_locked(record.key, increment, now=NOW) is not None
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    final = store.load(record.key)
    assert final is not None
    assert int(final.payload) == threads * per_thread


def test_update_locked_can_decline(store: Store) -> None:
    record = rec(payload=b"kept", user="u")
    store.save(record, expected=None, now=NOW)
    assert store.update_locked(record.key, lambda current: None, now=NOW) is None
    loaded = store.load(record.key)
    assert loaded is not None
    assert loaded.payload == b"kept"
    missing = secrets.token_hex(16)
    seen: list[Record | None] = []

    def look(current: Record | None) -> Record | None:
        seen.append(current)
        return None

    assert store.update_locked(missing, look, now=NOW) is None
    assert seen == [None]
    assert store.load(missing) is None
