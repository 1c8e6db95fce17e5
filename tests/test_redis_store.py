"""The Redis store beyond the shared contract: key layout, TTLs, the user index and its
pruning, Cluster slots, URLs (TCP, TLS, unix socket, Sentinel, Cluster), ready clients,
script reloading, prefixes, and memory per session. Real servers only (tests/servers.py).

The contract suite (tests/test_store_contract.py) and the end-to-end tests already run
on standalone Redis, Sentinel and Cluster through ``STORE_KINDS``; the failure tests are
in tests/test_redis_failures.py and the command counts in tests/test_redis_round_trips.py.
"""

from __future__ import annotations

import base64
import ctypes
import datetime as dt
import hashlib
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flask_cloakroom import Cloakroom, ConfigError, StoreError, StoreUnavailable, generate_key
from flask_cloakroom.stores import Record, open_store, wrap_client
from flask_cloakroom.stores.redis import RedisStore, open_redis_store
from flask_cloakroom.tokens import store_key

from .conftest import AppFactory, add_views, build_store
from .servers import (
    ControllableRedis,
    ControllableRedisCluster,
    ControllableRedisSentinel,
    RedisServer,
    flush_prefix,
    free_port,
)
from .support import FakeClock

KINDS = ["redis", "redis_cluster", "redis_sentinel"]
NOW = 2_000_000_000.0


def rec(
    key: str | None = None,
    *,
    user: str | None = None,
    expires: float = NOW + 600,
    version: int = 1,
    payload: bytes = b'{"v":1}',
) -> Record:
    return Record(key or secrets.token_hex(16), user, expires, version, payload)


def documented_name(store: RedisStore, key: str, kind: str = "s") -> str:
    """A record's (``s``) or its lock's (``l``) Redis key, as docs/redis.md describes it:
    the 32-hex record key as 22 characters of base64url, in braces."""
    short = base64.urlsafe_b64encode(bytes.fromhex(key)).decode()[:22]
    return f"{store.prefix}{kind}:{{{short}}}"


def index_entry(store: RedisStore, user: str, key: str) -> tuple[str, bytes]:
    """The bucket and member of a user's session in the index, as docs/redis.md describes
    them: SHA-256 of a tag and the user id; its first 4 bytes pick one of 16,384 buckets,
    the next 6 start the member, the record key's 16 bytes end it."""
    digest = hashlib.sha256(b"flask-cloakroom/redis-user/v1:" + user.encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 16384
    return f"{store.prefix}i:{{{bucket:04x}}}", digest[4:10] + bytes.fromhex(key)


@pytest.fixture(params=KINDS)
def rstore(request: pytest.FixtureRequest, tmp_path: Path) -> RedisStore:
    """An empty Redis store under a unique prefix, once per deployment kind."""
    store = build_store(request.param, request, tmp_path)
    assert isinstance(store, RedisStore)
    return store


@pytest.fixture
def standalone(request: pytest.FixtureRequest, tmp_path: Path) -> RedisStore:
    store = build_store("redis", request, tmp_path)
    assert isinstance(store, RedisStore)
    return store


@pytest.fixture
def clustered(request: pytest.FixtureRequest, tmp_path: Path) -> RedisStore:
    store = build_store("redis_cluster", request, tmp_path)
    assert isinstance(store, RedisStore)
    return store


def node_clients(store: RedisStore) -> list[Any]:
    """A client per node holding data: the server itself, or each Cluster primary."""
    client = store.client
    if store.cluster:
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def raw_dump(store: RedisStore) -> dict[bytes, bytes]:
    """Every key under the store's prefix and everything it holds, read raw."""
    out: dict[bytes, bytes] = {}
    pattern = re.sub(r"([\\*?\[\]])", r"\\\1", store.prefix) + "*"
    for node in node_clients(store):
        for name in node.scan_iter(match=pattern, count=500):
            kind = node.type(name)
            if kind == b"string":
                out[name] = node.get(name)
            elif kind == b"zset":
                pairs = node.zrange(name, 0, -1, withscores=True)
                out[name] = b"".join(m + repr(s).encode() for m, s in pairs)
            else:  # pragma: no cover - the store writes nothing else
                out[name] = kind
    return out


def unique_prefix(base: str) -> str:
    return f"{base}{secrets.token_hex(4)}:"


# -- what is stored, and where -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keys_hold_only_hashes_and_values_hold_no_plaintext(
    kind: str, make_app: AppFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With encryption and hashed user ids on, a dump of every key and value under the
    prefix holds no session id (in any spelling), no user id and no session data."""
    store = build_store(kind, request, tmp_path)
    assert isinstance(store, RedisStore)
    app, _, _ = make_app(
        store, CLOAKROOM_ENCRYPTION_KEYS=[generate_key()], CLOAKROOM_HASH_USER_IDS=True
    )
    marker = "plaintext-marker-" + secrets.token_hex(4)
    client = app.test_client()
    client.post("/set/secret", json=marker)
    client.post("/login/alice@example.com")
    assert client.get("/get/secret").get_json() == {"value": marker}
    cookie = client.get_cookie("session")
    assert cookie is not None
    text_id = cookie.value.split(".")[0]
    raw_id = base64.urlsafe_b64decode(text_id + "=")

    dump = raw_dump(store)
    names = list(dump)
    assert any(b":s:{" in name for name in names) and any(b":i:{" in name for name in names)
    layout = re.compile(
        re.escape(store.prefix).encode()
        + rb"(s:\{[A-Za-z0-9_-]{22}\}|i:\{[0-9a-f]{4}\}|e:\{\d{8}\}|e:days)"
    )
    assert all(layout.fullmatch(name) for name in names), names
    assert documented_name(store, store_key(raw_id)).encode() in dump
    assert store.record_name(store_key(raw_id)) == documented_name(store, store_key(raw_id))
    everything = b"".join(names) + b"".join(dump.values())
    for needle in (marker.encode(), b"alice@example.com", raw_id, text_id.encode()):
        assert needle not in everything
    assert raw_id.hex().encode() not in everything


def test_the_user_index_is_a_hash_of_the_user(standalone: RedisStore) -> None:
    record = rec(user="bob@example.com")
    assert standalone.save(record, expected=None, now=NOW)
    bucket, member = index_entry(standalone, "bob@example.com", record.key)
    (name,) = [n for n in raw_dump(standalone) if b":i:" in n]
    assert name == bucket.encode() == standalone.index_key("bob@example.com").encode()
    assert standalone.client.zrange(bucket, 0, -1) == [member]
    assert b"bob" not in name + member


def users_sharing_a_bucket(store: RedisStore, count: int) -> list[str]:
    """The first ``count`` users ("user<n>") whose index entries share a bucket."""
    by_bucket: dict[str, list[str]] = {}
    for n in range(20000):  # 16,384 buckets: a pair shares one long before 5,000 users
        user = f"user{n}"
        users = by_bucket.setdefault(store.index_key(user), [])
        users.append(user)
        if len(users) == count:
            return users
    raise AssertionError(f"no {count} users share a bucket")


def test_users_sharing_a_bucket_see_only_their_own_sessions(rstore: RedisStore) -> None:
    first, second = users_sharing_a_bucket(rstore, 2)
    bucket = rstore.index_key(first)
    mine = [rec(user=first) for _ in range(3)]
    theirs = [rec(user=second) for _ in range(2)]
    for record in mine + theirs:
        assert rstore.save(record, expected=None, now=NOW)
    assert rstore.client.zcard(bucket) == 5
    assert {r.key for r in rstore.user_records(first, now=NOW)} == {r.key for r in mine}
    assert {r.key for r in rstore.user_records(second, now=NOW)} == {r.key for r in theirs}
    assert rstore.client.zcard(bucket) == 5  # nobody's entry was taken for stale
    assert rstore.client.object("encoding", bucket) in (b"listpack", b"ziplist")


def test_users_sharing_a_bucket_whose_sessions_expire_at_different_times(
    rstore: RedisStore,
) -> None:
    """The index's scores are the sessions' expiries, so in a shared bucket one user's
    entries lie between another's: each user must still get every session."""
    users = users_sharing_a_bucket(rstore, 3)
    bucket = rstore.index_key(users[0])
    sessions: dict[str, set[str]] = {user: set() for user in users}
    for turn in range(12):  # the users' sessions interleaved in expiry order
        user = users[turn % 3]
        record = rec(user=user, expires=NOW + 600 + 10 * turn)
        assert rstore.save(record, expected=None, now=NOW)
        sessions[user].add(record.key)
    assert rstore.client.zcard(bucket) == 12
    for user in users:
        assert {r.key for r in rstore.user_records(user, now=NOW)} == sessions[user], user
    assert rstore.client.zcard(bucket) == 12


def test_listing_a_user_never_drops_the_entry_of_another_in_the_bucket(
    rstore: RedisStore,
) -> None:
    """A bucket member of another user, between two of this user's in expiry order and
    lexically inside their range, is not taken for this user's (nor dropped as stale),
    so the other user's session stays listable and revocable."""
    pair = users_sharing_a_bucket(rstore, 2)
    tags = {user: index_entry(rstore, user, "0" * 32)[1][:6] for user in pair}
    high, low = sorted(pair, key=tags.__getitem__, reverse=True)
    mine = [rec(user=high, expires=NOW + 600), rec(user=high, expires=NOW + 620)]
    theirs = rec(user=low, expires=NOW + 610)
    for record in (mine[0], theirs, mine[1]):
        assert rstore.save(record, expected=None, now=NOW)
    bucket = rstore.index_key(high)
    assert {r.key for r in rstore.user_records(high, now=NOW)} == {r.key for r in mine}
    assert rstore.client.zcard(bucket) == 3
    assert rstore.user_records(low, now=NOW) == [theirs]


def test_revoking_a_user_ends_every_session_in_a_shared_bucket(
    rstore: RedisStore, make_app: AppFactory, clock: FakeClock
) -> None:
    """Log out everywhere, as a user would see it: two users in one bucket sign in
    from three browsers each, in turns, so their sessions' expiries interleave; ending
    one user's sessions ends all of them and none of the other's."""
    ann, ben = users_sharing_a_bucket(rstore, 2)
    app, cloak, _ = make_app(rstore)
    browsers: dict[str, list[Any]] = {ann: [], ben: []}
    for turn in range(6):
        user = (ann, ben)[turn % 2]
        web = app.test_client()
        assert web.post(f"/login/{user}").status_code == 200
        browsers[user].append(web)
        clock.advance(minutes=1)
    assert len(web.get(f"/sessions/{ann}").get_json()) == 3
    with app.test_request_context():
        assert cloak.revoke_user(ann) == 3
    assert [web.get("/whoami").get_json()["user"] for web in browsers[ann]] == [None] * 3
    assert [web.get("/whoami").get_json()["user"] for web in browsers[ben]] == [ben] * 3


class _OneEntryForAll(RedisStore):
    """Every user gets the same bucket and member start: a hash collision, on purpose."""

    def _index_entry(self, user_id: str) -> tuple[str, bytes]:
        return f"{self.prefix}i:{{0000}}", b"\x00" * 6


def test_users_whose_hashes_collide_keep_each_others_entries(standalone: RedisStore) -> None:
    store = _OneEntryForAll(standalone.client, prefix=standalone.prefix)
    ann, ben = rec(user="ann"), rec(user="ben")
    for record in (ann, ben):
        assert store.save(record, expected=None, now=NOW)
    assert store.user_records("ann", now=NOW) == [ann]
    assert store.user_records("ben", now=NOW) == [ben]
    assert store.client.zcard(store.index_key("ann")) == 2


def test_record_ttl_is_the_remaining_life_and_the_index_outlives_it(rstore: RedisStore) -> None:
    now = time.time()
    record = rec(user="alice", expires=now + 600)
    assert rstore.save(record, expected=None, now=now)
    client = rstore.client
    record_ttl = client.pttl(rstore.record_name(record.key))
    assert 598_000 < record_ttl <= 600_000
    index, member = index_entry(rstore, "alice", record.key)
    assert client.pttl(index) >= record_ttl - 50
    assert client.zscore(index, member) >= record.expires_at
    # A touch that brings the expiry forward keeps the index score: it never goes down.
    sooner = rec(record.key, user="alice", expires=now + 60, version=2)
    assert rstore.save(sooner, expected=1, now=now)
    assert 58_000 < client.pttl(rstore.record_name(record.key)) <= 60_000
    assert client.zscore(index, member) >= record.expires_at


def test_redis_expires_records_and_indexes_by_itself(rstore: RedisStore) -> None:
    now = time.time()
    record = rec(user="shortlived", expires=now + 0.3)
    assert rstore.save(record, expected=None, now=now)
    assert rstore.load(record.key) is not None
    time.sleep(0.45)
    assert rstore.load(record.key) is None
    assert rstore.client.exists(rstore.index_key("shortlived")) == 0
    assert raw_dump(rstore) == {}


def test_saving_an_already_dead_record_deletes_it(rstore: RedisStore) -> None:
    record = rec(user="alice", expires=NOW + 60)
    assert rstore.save(record, expected=None, now=NOW)
    dead = rec(record.key, user="alice", expires=NOW - 1, version=2)
    assert rstore.save(dead, expected=1, now=NOW) is True
    assert rstore.load(record.key) is None
    assert rstore.client.zscore(*index_entry(rstore, "alice", record.key)) is None


def test_expired_index_entries_are_pruned_by_the_next_write(rstore: RedisStore) -> None:
    client = rstore.client
    index = rstore.index_key("carol")
    for _ in range(50):
        assert rstore.save(rec(user="carol", expires=NOW + 60), expected=None, now=NOW)
    assert client.zcard(index) == 50
    later = NOW + 120  # all 50 are dead by now; Redis's own TTLs have not run yet
    assert rstore.save(rec(user="carol", expires=later + 60), expected=None, now=later)
    assert client.zcard(index) == 1


def test_the_index_is_pruned_when_it_grows_not_on_every_update(rstore: RedisStore) -> None:
    """Only an added entry can grow a bucket, so only then are its expired entries
    removed: an update of a listed session (the usual write) is spared the prune,
    and what it leaves is never listed."""
    client = rstore.client
    index = rstore.index_key("cora")
    live = rec(user="cora", expires=NOW + 600)
    assert rstore.save(live, expected=None, now=NOW)
    for _ in range(20):
        assert rstore.save(rec(user="cora", expires=NOW + 60), expected=None, now=NOW)
    later = NOW + 120  # the 20 are dead by now; Redis's own TTLs have not run yet
    touched = live._replace(version=2, expires_at=later + 600)
    assert rstore.save(touched, expected=1, now=later)
    assert client.zcard(index) == 21  # an update adds nothing, so it prunes nothing
    assert client.zscore(*index_entry(rstore, "cora", live.key)) == math.ceil(later + 600)
    moved = touched._replace(key=secrets.token_hex(16), version=3)
    assert rstore.rotate(live.key, moved, expected=2, now=later)  # a login adds an entry
    assert client.zcard(index) == 1
    assert [r.key for r in rstore.user_records("cora", now=later)] == [moved.key]


def test_entries_of_deleted_sessions_are_dropped_when_the_index_is_read(
    rstore: RedisStore,
) -> None:
    client = rstore.client
    index = rstore.index_key("dave")
    keep = rec(user="dave")
    assert rstore.save(keep, expected=None, now=NOW)
    for _ in range(30):  # 30 logins and logouts
        gone = rec(user="dave")
        assert rstore.save(gone, expected=None, now=NOW)
        assert rstore.delete(gone.key)
    assert client.zcard(index) == 31  # delete() is one DEL; the index heals on its next read
    assert [r.key for r in rstore.user_records("dave", now=NOW)] == [keep.key]
    assert client.zcard(index) == 1


def test_an_index_entry_pointing_at_another_users_record_is_ignored(rstore: RedisStore) -> None:
    """The index is only a hint: a forged or stale entry never lists a foreign session."""
    record = rec(user="erin")
    assert rstore.save(record, expected=None, now=NOW)
    bucket, planted = index_entry(rstore, "mallory", record.key)
    rstore.client.zadd(bucket, {planted: NOW + 600})
    assert rstore.user_records("mallory", now=NOW) == []
    assert rstore.client.zscore(bucket, planted) is None
    assert rstore.client.zscore(*index_entry(rstore, "erin", record.key)) is not None


def test_a_users_sessions_in_different_cluster_slots(clustered: RedisStore) -> None:
    client: Any = clustered.client

    def name(record: Record) -> str:
        return clustered.record_name(record.key)

    # Twenty sessions in twenty different slots, on all three nodes (random keys could
    # share a slot now and then: pick them so that the test does not depend on luck).
    records: list[Record] = []
    slots: set[int] = set()
    while len(records) < 20 or len({client.get_node_from_key(name(r)).name for r in records}) < 3:
        record = rec(user="frank")
        if client.keyslot(name(record)) not in slots:
            slots.add(client.keyslot(name(record)))
            records.append(record)
        if len(records) > 20:
            slots.discard(client.keyslot(name(records.pop(0))))
    for record in records:
        assert clustered.save(record, expected=None, now=NOW)
    listed = clustered.user_records("frank", now=NOW)
    assert {r.key for r in listed} == {r.key for r in records}
    assert clustered.delete_many([r.key for r in records]) == 20
    assert clustered.user_records("frank", now=NOW) == []


def test_rotation_moves_the_index_entry(rstore: RedisStore) -> None:
    old = rec(user="gina")
    assert rstore.save(old, expected=None, now=NOW)
    new = rec(user="gina", payload=b"new")
    assert rstore.rotate(old.key, new, expected=1, now=NOW)
    bucket, member = index_entry(rstore, "gina", new.key)
    assert rstore.client.zrange(bucket, 0, -1) == [member]


def test_a_create_sent_twice_is_acknowledged_twice(rstore: RedisStore) -> None:
    """A create re-sent after its reply was lost (a dropped connection) succeeds, so the
    retry does not leave an orphan; any other value under the key is a clash."""
    record = rec(user="hank")
    assert rstore.save(record, expected=None, now=NOW)
    assert rstore.save(record, expected=None, now=NOW)
    assert not rstore.save(rec(record.key, user="hank", payload=b"other"), expected=None, now=NOW)


def lock_name(store: RedisStore, key: str) -> str:
    """The documented name of a record's write lock (docs/redis.md, key layout)."""
    return documented_name(store, key, "l")


def test_update_locked_takes_and_frees_a_lock_in_the_records_slot(rstore: RedisStore) -> None:
    record = rec(user="ivan")
    assert rstore.save(record, expected=None, now=NOW)
    seen: list[int] = []

    def change(current: Record | None) -> Record | None:
        assert current is not None
        ttl = rstore.client.pttl(lock_name(rstore, record.key))
        seen.append(ttl)
        return rec(record.key, user="ivan", version=current.version + 1, payload=b"locked")

    stored = rstore.update_locked(record.key, change, now=NOW)
    assert stored is not None and stored.payload == b"locked"
    assert rstore.load(record.key) == stored
    # Held while the change ran, with a life bounded by the store timeout (2 s here)...
    assert len(seen) == 1 and 0 < seen[0] <= 2000
    # ...and gone afterwards: nothing but the record and its index is left.
    assert not [name for name in raw_dump(rstore) if b"l:{" in name]
    if rstore.cluster:
        slot = rstore.client.keyslot
        assert slot(lock_name(rstore, record.key)) == slot(rstore.record_name(record.key))


def test_update_locked_waits_out_a_dead_holder_and_refuses_a_live_one(
    rstore: RedisStore,
) -> None:
    record = rec(user="jane")
    assert rstore.save(record, expected=None, now=NOW)
    newer = rec(record.key, user="jane", version=2, payload=b"after")
    lock = lock_name(rstore, record.key)
    # A writer that died holding the lock: it expires and the next writer goes on.
    rstore.client.set(lock, "dead-writer", px=300)
    started = time.monotonic()
    assert rstore.update_locked(record.key, lambda current: newer, now=NOW) == newer
    assert 0.25 <= time.monotonic() - started < 2.0
    # A holder that keeps it past the store timeout (2 s): refused, bounded, unchanged.
    rstore.client.set(lock, "busy-writer", px=60_000)
    newest = rec(record.key, user="jane", version=3, payload=b"never")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="held its lock"):
        rstore.update_locked(record.key, lambda current: newest, now=NOW)
    assert 1.9 <= time.monotonic() - started < 3.0
    assert rstore.load(record.key) == newer
    assert rstore.client.get(lock) == b"busy-writer"  # another writer's lock is not freed
    rstore.client.delete(lock)


def test_update_locked_retries_when_a_writer_that_does_not_lock_comes_in(
    rstore: RedisStore,
) -> None:
    """The lock does not carry correctness: a conditional save made without it (a
    request's optimistic first write) makes the locked writer re-read and re-apply."""
    record = rec(user="kim")
    assert rstore.save(record, expected=None, now=NOW)
    calls: list[int] = []

    def change(current: Record | None) -> Record | None:
        assert current is not None
        calls.append(current.version)
        if len(calls) == 1:  # meanwhile, an optimistic writer lands version 2
            sneaky = rec(record.key, user="kim", version=2, payload=b"sneaky")
            assert rstore.save(sneaky, expected=1, now=NOW)
        return rec(record.key, user="kim", version=current.version + 1, payload=b"merged")

    stored = rstore.update_locked(record.key, change, now=NOW)
    assert calls == [1, 2]
    assert stored is not None and stored.version == 3
    assert rstore.load(record.key) == stored


def test_scan_cursors_are_opaque_and_checked(rstore: RedisStore) -> None:
    keys = {rec().key for _ in range(7)}
    for key in keys:
        rstore.save(rec(key), expected=None, now=NOW)
    seen: set[str] = set()
    cursor: str | None = None
    while True:
        page, cursor = rstore.scan(cursor=cursor, limit=2)
        seen.update(r.key for r in page)
        if cursor is None:
            break
        assert re.fullmatch(r"\d+:\d+", cursor)
    assert seen == keys
    with pytest.raises(ValueError, match="cursor"):
        rstore.scan(cursor="not-a-cursor")
    with pytest.raises(ValueError, match="node"):
        rstore.scan(cursor="99:0")


def test_keys_under_the_record_prefix_that_are_not_record_names_are_passed_over(
    rstore: RedisStore,
) -> None:
    """Junk planted under ``{prefix}s:`` (or a name of the earlier 32-hex layout) is not a
    record: scan, count and purge go past it and leave it alone."""
    record = rec(user="olga")
    assert rstore.save(record, expected=None, now=NOW)
    planted = {
        f"{rstore.prefix}s:{{{record.key}}}": rstore._encode(record),  # the earlier layout
        f"{rstore.prefix}s:{{not base64url!!!!!!!}}": b"1:9999999999999:-:x",
        f"{rstore.prefix}s:{{AAAAAAAAAAAAAAAAAAAAA}}": b"junk",  # 21 characters
        f"{rstore.prefix}s:": b"junk",
    }
    for name, value in planted.items():
        rstore.client.set(name, value)
    records, cursor = rstore.scan(limit=100)
    while cursor is not None:
        more, cursor = rstore.scan(cursor=cursor, limit=100)
        records += more
    assert records == [record]
    assert rstore.count(now=NOW) == 1
    assert rstore.purge_expired(now=NOW + 10**9) == 1
    assert rstore.load(record.key) is None
    for name, value in planted.items():
        assert rstore.client.get(name) == value


def test_a_record_key_must_be_32_hex_digits(rstore: RedisStore) -> None:
    for bad in ("", "abc", "g" * 32, "0" * 31, "0" * 33, "00 " * 10 + "00"):
        with pytest.raises(ValueError, match="32 hex digits"):
            rstore.load(bad)
    assert rstore.load("0" * 32) is None


def test_prefixes_keep_apps_apart(redis_server: RedisServer) -> None:
    base = unique_prefix(redis_server.prefix)
    shop = open_redis_store(
        redis_server.url, prefix=base + "shop*[1]?:", timeout=2, wait_replicas=0
    )
    blog = open_redis_store(redis_server.url, prefix=base + "shop:", timeout=2, wait_replicas=0)
    try:
        shop.save(rec(user="ivy"), expected=None, now=NOW)
        blog.save(rec(user="ivy"), expected=None, now=NOW)
        blog.save(rec(), expected=None, now=NOW)
        assert shop.count(now=NOW) == 1
        assert blog.count(now=NOW) == 2
        assert len(shop.scan(limit=100)[0]) == 1
        assert len(shop.user_records("ivy", now=NOW)) == 1
        assert shop.purge_expired(now=NOW + 3600) == 1
        assert blog.count(now=NOW) == 2
    finally:
        shop.close()
        blog.close()
        flush_prefix(redis_server.url, base)


def test_store_from_settings_and_describe(redis_server: RedisServer) -> None:
    prefix = unique_prefix(redis_server.prefix)
    store = open_store(redis_server.url, redis_prefix=prefix, timeout=0.5)
    try:
        assert isinstance(store, RedisStore)
        assert store.name == "redis"
        assert prefix in store.describe()
        store.ping()
    finally:
        store.close()


# -- ready clients ---------------------------------------------------------------------------


def test_a_ready_client_that_decodes_responses(
    make_app: AppFactory, controllable_redis: ControllableRedis
) -> None:
    client = controllable_redis.client()  # decode_responses=True
    prefix = unique_prefix(controllable_redis.prefix)
    try:
        store = wrap_client(client, redis_prefix=prefix)
        assert isinstance(store, RedisStore)
        payload = bytes(range(256))
        assert store.save(rec(user="jo", payload=payload), expected=None, now=NOW)
        (loaded,) = store.user_records("jo", now=NOW)
        assert loaded.payload == payload
        assert store.scan()[0][0].payload == payload
        assert store.count(now=NOW) == 1
        store.close()
        assert client.ping()  # a client the app passed in stays open
    finally:
        flush_prefix(client, prefix)
        client.close()


def test_ready_clients_as_cloakroom_store(
    controllable_redis_cluster: ControllableRedisCluster,
    controllable_redis_sentinel: ControllableRedisSentinel,
) -> None:
    from flask import Flask

    clients: list[tuple[Any, str]] = [
        (controllable_redis_cluster.client(), "redis-cluster"),
        (controllable_redis_sentinel.master_client(), "redis-sentinel"),
    ]
    for client, name in clients:
        prefix = unique_prefix(controllable_redis_cluster.prefix)
        app = Flask(__name__)
        app.config.update(
            SECRET_KEY="s" * 32, CLOAKROOM_STORE=client, CLOAKROOM_REDIS_PREFIX=prefix
        )
        cloak = Cloakroom(app)
        add_views(app, cloak)
        try:
            web = app.test_client()
            web.post("/set/x", json="kept")
            web.post("/login/kim")
            assert web.get("/get/x").get_json() == {"value": "kept"}
            assert web.get("/whoami").get_json() == {"user": "kim"}
            assert len(web.get("/sessions/kim").get_json()) == 1
            with app.app_context():
                assert cloak.store.name == name
        finally:
            flush_prefix(client, prefix)
            client.close()


def test_a_client_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="RedisStore needs"):
        RedisStore(object())


def test_scripts_come_back_after_script_flush(rstore: RedisStore) -> None:
    """A restarted or flushed server has forgotten the scripts: they are sent again."""
    record = rec(user="lee")
    assert rstore.save(record, expected=None, now=NOW)
    for node in node_clients(rstore):
        node.script_flush()
    assert rstore.save(rec(record.key, user="lee", version=2), expected=1, now=NOW)
    for node in node_clients(rstore):
        node.script_flush()
    new = rec(user="lee")
    assert rstore.rotate(record.key, new, expected=2, now=NOW)
    assert [r.key for r in rstore.user_records("lee", now=NOW)] == [new.key]


# -- URLs --------------------------------------------------------------------------------------


def _no_orphans() -> None:  # runs in the child: die with the test process
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


@pytest.fixture
def spawn_redis(
    controllable_redis: ControllableRedis, tmp_path: Path
) -> Iterator[Callable[..., None]]:
    """Start an extra redis-server with some arguments (a unix socket, TLS)."""
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, ready: Callable[[], Any]) -> None:
        log = open(tmp_path / f"redis-{len(processes)}.log", "wb")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                [str(controllable_redis.program.path), "--save", "", "--appendonly", "no", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                preexec_fn=_no_orphans if os.uname().sysname == "Linux" else None,
            )
        )
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                ready()
                return
            except (RedisConnectionError, OSError):
                if time.monotonic() > deadline or processes[-1].poll() is not None:
                    raise
                time.sleep(0.05)

    yield spawn
    for process in processes:
        process.kill()
        process.wait()


def test_unix_socket_url(spawn_redis: Callable[..., None], tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    probe = redis.Redis(unix_socket_path=str(socket_path))
    spawn_redis("--port", "0", "--unixsocket", str(socket_path), ready=probe.ping)
    probe.close()
    store = open_redis_store(f"unix://{socket_path}?db=2", prefix="p:", timeout=1, wait_replicas=0)
    assert isinstance(store, RedisStore)
    try:
        record = rec(user="mo")
        assert store.save(record, expected=None, now=NOW)
        assert store.load(record.key) == record
        assert f"unix://{socket_path}" in store.describe()
        direct = redis.Redis(unix_socket_path=str(socket_path), db=2)
        assert direct.exists(store.record_name(record.key)) == 1
        direct.close()
        # The store timeout holds on a Unix socket too (on Linux, kept by the kernel).
        assert store._lane is not None
        if sys.platform.startswith("linux"):
            assert all(wire.connection._sock.gettimeout() is None for wire in store._lane._idle)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            store._lane.execute("BLPOP", "p:empty", 3)
        assert 0.9 <= time.monotonic() - started < 3
    finally:
        store.close()


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("cloakroom test CA"))
        .issuer_name(name("cloakroom test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        # Python 3.13's stricter verification wants a proper CA: key ids and usage.
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def test_tls_url(spawn_redis: Callable[..., None], tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca))
    spawn_redis(
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
        ready=probe.ping,
    )
    probe.close()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    store = open_redis_store(url, prefix="tls:", timeout=1, wait_replicas=0)
    try:
        record = rec(user="nia")
        assert store.save(record, expected=None, now=NOW)
        assert store.user_records("nia", now=NOW) == [record]
        # The lane reads the TLS socket itself: a value of many TLS records comes whole.
        large = rec(user="nia", payload=secrets.token_bytes(300_000))
        assert store.save(large, expected=None, now=NOW)
        assert store.load(large.key) == large
        assert isinstance(store, RedisStore) and store._lane is not None
        assert all(wire.reader is not None for wire in store._lane._idle)
        # A TLS socket keeps Python's timeout (not the kernel's, as plain sockets do),
        # and is never polled for a reply (an SSL socket's recv takes no flags).
        assert all(wire.connection._sock.gettimeout() == 1 for wire in store._lane._idle)
        assert all(wire.busy_poll > 0 for wire in store._lane._idle)
        assert not any(wire.pollable for wire in store._lane._idle)
    finally:
        store.close()
    # Client-side caching over TLS: its tracking connection reads TLS without blocking.
    cached = open_redis_store(url, prefix="tls:", timeout=1, wait_replicas=0, client_cache=10)
    writer = open_redis_store(url, prefix="tls:", timeout=1, wait_replicas=0)
    try:
        assert isinstance(cached, RedisStore) and cached._cache is not None
        assert cached.load(record.key) == record
        assert cached.load(record.key) == record
        assert (cached._cache.misses, cached._cache.hits) == (1, 1)
        newer = rec(record.key, user="nia", version=2, payload=b"newer")
        assert writer.save(newer, expected=1, now=NOW)
        time.sleep(0.05)
        assert cached.load(record.key) == newer
        assert cached._cache.invalidations == 1
    finally:
        cached.close()
        writer.close()
    # The same server refuses a client that does not trust its certificate.
    untrusting = open_redis_store(
        f"rediss://127.0.0.1:{port}/0", prefix="tls:", timeout=1, wait_replicas=0
    )
    try:
        with pytest.raises(StoreUnavailable):
            untrusting.load(record.key)
    finally:
        untrusting.close()


def test_sentinel_url_with_a_database(
    controllable_redis_sentinel: ControllableRedisSentinel,
) -> None:
    prefix = unique_prefix(controllable_redis_sentinel.prefix)
    url = controllable_redis_sentinel.url + "?db=3&client_name=cloakroom-test"
    store = open_redis_store(url, prefix=prefix, timeout=1, wait_replicas=0)
    assert isinstance(store, RedisStore)
    master = controllable_redis_sentinel.master_client(db=3)
    try:
        record = rec()
        assert store.save(record, expected=None, now=NOW)
        assert master.exists(store.record_name(record.key)) == 1
        assert store.name == "redis-sentinel"
        assert "service mymaster via sentinels" in store.describe()
    finally:
        store.close()
        master.delete(store.record_name(record.key))
        master.close()


def test_acl_credentials_in_the_url(controllable_redis: ControllableRedis) -> None:
    admin = controllable_redis.client()
    user, password = "cr-" + secrets.token_hex(3), secrets.token_hex(12)
    admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"]
    )
    host, port = controllable_redis.host, controllable_redis.port
    good = open_redis_store(
        f"redis://{user}:{password}@{host}:{port}/0", prefix="acl:", timeout=1, wait_replicas=0
    )
    bad = open_redis_store(
        f"redis://{user}:wrong-{password}@{host}:{port}/0",
        prefix="acl:",
        timeout=1,
        wait_replicas=0,
    )
    try:
        record = rec()
        assert good.save(record, expected=None, now=NOW)
        assert password not in good.describe()
        with pytest.raises(StoreUnavailable) as caught:
            bad.load(record.key)
        assert password not in str(caught.value)
        assert password not in bad.describe()
    finally:
        good.close()
        bad.close()
        admin.acl_deluser(user)
        flush_prefix(admin, "acl:")
        admin.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+sentinel://127.0.0.1:26379", "names its service"),
        ("redis+sentinel://127.0.0.1:26379/a/b", "names its service"),
        ("redis+sentinel://127.0.0.1:26379/m?dbb=1", "unknown option"),
        ("redis+sentinel://127.0.0.1:26379/m?db=x", "db must be a number"),
        ("redis+sentinel:///mymaster", "no host:port"),
        ("redis+cluster://127.0.0.1:abc", "not host:port"),
        ("redis+cluster://127.0.0.1:7000/1", "only database 0"),
        ("redis+cluster://127.0.0.1:7000?ssl=1&tls=1", "unknown option"),
        ("redis://127.0.0.1:notaport/0", "not a usable Redis URL"),
    ],
)
def test_bad_urls_fail_at_start_up(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        open_redis_store(url, prefix="x:", timeout=1, wait_replicas=0)


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:hunter2@127.0.0.1:{port}/0",
        "rediss://:hunter2@127.0.0.1:{port}/0",
        "redis+sentinel://app:hunter2@127.0.0.1:{port}/mymaster?sentinel_password=hunter2",
        "redis+cluster://app:hunter2@127.0.0.1:{port},127.0.0.1:{port}",
    ],
)
def test_no_password_in_descriptions_or_errors(url: str) -> None:
    """Nothing listens on the port: every kind fails fast, clearly, and says no password."""
    store = open_redis_store(
        url.format(port=free_port()), prefix="x:", timeout=0.5, wait_replicas=0
    )
    try:
        assert "hunter2" not in store.describe()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.load("0" * 32)
        assert time.monotonic() - started < 3
        assert "hunter2" not in str(caught.value)
        assert caught.value.__cause__ is not None
        assert caught.value.store == store.name
    finally:
        store.close()


def test_a_bad_prefix_is_refused(controllable_redis: ControllableRedis) -> None:
    with pytest.raises(ConfigError, match="braces"):
        open_redis_store(controllable_redis.url, prefix="{app}:", timeout=1, wait_replicas=0)


# -- memory --------------------------------------------------------------------------------


def test_memory_per_session(
    make_app: AppFactory,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MEMORY USAGE of a small session (docs/redis.md quotes these numbers)."""
    caplog.set_level(logging.WARNING)
    store = build_store("redis", request, tmp_path)
    assert isinstance(store, RedisStore)
    app, cloak, _ = make_app(store)
    client = store.client

    web = app.test_client()
    web.environ_base.update(HTTP_USER_AGENT="TestBrowser/1.0", REMOTE_ADDR="203.0.113.7")
    web.post("/set/cart", json=["book"])
    (anonymous,) = [n for n in raw_dump(store) if b":s:" in n]
    anonymous_bytes = client.memory_usage(anonymous, samples=0)
    anonymous_value = client.strlen(anonymous)
    web.post("/login/alice")
    (logged_in,) = [n for n in raw_dump(store) if b":s:" in n]
    record_bytes = client.memory_usage(logged_in, samples=0)
    with app.app_context():
        index = store.index_key(cloak._manager().user_index("alice"))
    one_entry = client.memory_usage(index, samples=0)
    for _ in range(9):
        other = app.test_client()
        other.post("/set/cart", json=["book"])
        other.post("/login/alice")
    assert client.zcard(index) == 10
    per_entry = (client.memory_usage(index, samples=0) - one_entry) / 9
    print(  # shown with pytest -s; quoted in docs/redis.md
        f"\nvalues {anonymous_value} B and {client.strlen(logged_in)} B; "
        f"anonymous record {anonymous_bytes} B, logged-in record {record_bytes} B, "
        f"index key with one entry {one_entry} B, each further entry {per_entry:.0f} B"
    )
    assert anonymous_bytes <= 300
    assert per_entry <= 40  # a shared bucket: no key of its own per user
    assert record_bytes + per_entry <= 450


#: The least-privilege ACL rule docs/redis.md recommends (commands run by the scripts
#: are checked too).
ACL_COMMANDS = (
    "+ping +get +mget +getrange +set +del +unlink +exists +evalsha +eval +script|load "
    "+zadd +zrem +zscore +zcard +zrange +zrangebyscore +zrevrangebyscore +zremrangebyscore "
    "+pttl +pexpire +scan +wait"
)


def test_the_documented_acl_is_enough(controllable_redis: ControllableRedis) -> None:
    admin: Any = controllable_redis.client()  # redis-py leaves execute_command untyped
    user, password = "cr-" + secrets.token_hex(3), secrets.token_hex(12)
    prefix = unique_prefix("acl-app:")
    admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}*", *ACL_COMMANDS.split()
    )
    url = f"redis://{user}:{password}@{controllable_redis.host}:{controllable_redis.port}/0"
    store = open_redis_store(url, prefix=prefix, timeout=1, wait_replicas=0)
    try:
        assert isinstance(store, RedisStore)
        admin.script_flush()  # the first writes load the scripts themselves
        old = rec(user="olga", expires=NOW + 60)
        assert store.save(old, expected=None, now=NOW)
        assert store.save(rec(old.key, user="olga", version=2), expected=1, now=NOW)
        new = rec(user="olga")
        assert store.rotate(old.key, new, expected=2, now=NOW)
        assert store.load(new.key) == new
        assert store.user_records("olga", now=NOW) == [new]
        assert store.scan()[0] == [new]
        assert store.count(now=NOW) == 1
        assert store.purge_expired(now=NOW + 3600) == 1
        assert store.delete_many([new.key]) == 0
        from flask_cloakroom.stores.base import EventRecord

        store.add_events([EventRecord(NOW, "login", "olga", b"{}")])
        assert len(store.events(user_id="olga")) == 1
        assert store.prune_events(before=NOW + 86400 * 2) == 1
        store.preload_scripts()
        store.ping()
        # WAIT blocks for half the timeout (no replica answers); the other half is the
        # reply's margin, which 0.1 s was not on a busy 2-core machine.
        waiting = open_redis_store(url, prefix=prefix, timeout=1.0, wait_replicas=1)
        assert waiting.save(rec(), expected=None, now=NOW)  # WAIT: no replica, a warning
        waiting.close()
        outside = open_redis_store(url, prefix="other:", timeout=1, wait_replicas=0)
        with pytest.raises(StoreError, match="NoPermission") as caught:  # a setup mistake,
            outside.load("0" * 32)
        assert not isinstance(caught.value, StoreUnavailable)  # not an outage
        outside.close()
    finally:
        store.close()
        admin.acl_deluser(user)
        flush_prefix(admin, prefix)
        admin.close()


#: What CLOAKROOM_REDIS_CLIENT_CACHE needs on top (docs/redis.md, Security notes).
ACL_CACHE = "+client|id +client|tracking +subscribe &__redis__:invalidate"


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_documented_acl_is_enough_for_the_client_cache(
    controllable_redis: ControllableRedis, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    admin: Any = controllable_redis.client()
    user, password = "cr-" + secrets.token_hex(3), secrets.token_hex(12)
    prefix = unique_prefix("acl-cache:")
    rules = [f"~{prefix}*", *ACL_COMMANDS.split()]
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules)
    url = f"redis://{user}:{password}@{controllable_redis.host}:{controllable_redis.port}/0"

    def cached() -> RedisStore:
        client = redis.Redis.from_url(url, protocol=protocol, socket_timeout=1)
        return RedisStore(client, prefix=prefix, client_cache=10)

    try:
        record = rec(user="pia")
        # Without the extra permissions: no cache (logged), reads still work.
        store = cached()
        assert store.save(record, expected=None, now=NOW)
        with caplog.at_level(logging.WARNING, logger="flask_cloakroom"):
            assert store.load(record.key) == record
            assert store.load(record.key) == record
        assert "client-side cache off" in caplog.text
        assert store.cache_stats() == {"hits": 0, "misses": 2, "invalidations": 0, "records": 0}
        store.close()
        # With them: cached reads.
        admin.execute_command("ACL", "SETUSER", user, *ACL_CACHE.split())
        store = cached()
        assert store.load(record.key) == record
        assert store.load(record.key) == record
        stats = store.cache_stats()
        assert stats is not None and stats["hits"] == 1
        store.close()
    finally:
        admin.acl_deluser(user)
        flush_prefix(admin, prefix)
        admin.close()


def test_waiting_for_replicas_on_a_cluster_asks_each_node_that_was_written(
    clustered: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """WAIT goes to the record's node (and, for a login, also the index's); the
    test Cluster has no replicas, so every write stands and a warning says so."""
    waiting = RedisStore(
        clustered.client, prefix=clustered.prefix, wait_replicas=1, wait_timeout=0.2
    )
    try:
        old = rec(user="wanda")
        with caplog.at_level(logging.WARNING, logger="flask_cloakroom"):
            assert waiting.save(old, expected=None, now=NOW)
            new = rec(user="wanda", payload=b'{"v":2}')
            assert waiting.rotate(old.key, new, expected=1, now=NOW)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings and all("only 0 of 1 replicas acknowledged" in w for w in warnings)
        assert clustered.load(old.key) is None
        assert clustered.load(new.key) == new
        assert clustered.user_records("wanda", now=NOW) == [new]
    finally:
        waiting.close()


def test_a_node_lane_closes_its_sockets_when_redis_py_drops_the_nodes_client(
    standalone: RedisStore, redis_server: RedisServer
) -> None:
    """A Cluster's topology changes (a failover): redis-py replaces a node's client, and
    the store's lane for the old one closes its connections when the lane of the new
    one is made, not at some GC, and is forgotten.  Nothing waits for the dropped client
    in a clean-up callback: such a callback's lane led, through its pool, back to the
    Cluster client and so to the node client, and held them all for good."""
    import gc

    node_client: Any = redis.Redis.from_url(redis_server.url)
    other: Any = redis.Redis.from_url(redis_server.url)
    try:
        lane = standalone._node_lane(node_client)
        assert standalone._node_lane(node_client) is lane
        assert lane.execute("PING") == b"PONG"
        (wire,) = lane._idle
        sock = wire.connection._sock
        assert sock is not None and sock.fileno() >= 0
        node_client.close()
        del node_client
        gc.collect()
        fresh = standalone._node_lane(other)
        assert fresh is not lane
        assert wire.connection._sock is None
        assert sock.fileno() == -1  # closed by the lane, so no ResourceWarning later
        assert [held for _, held in standalone._node_lanes.values()] == [fresh]
        assert fresh.execute("PING") == b"PONG"
    finally:
        other.close()
