"""Server-assisted client-side caching of session records (CLOAKROOM_REDIS_CLIENT_CACHE).

What must hold (see ``flask_cloakroom/stores/redis_cache.py``): repeated reads cost no
Redis command; a record written, deleted or flushed by anybody is not served from the
cache once Redis's invalidation has reached the process, proven here under load with
the staleness window measured; a broken, restarted or silent tracking connection never
leaves stale records in use; a forked process does not share the parent's connection.
The contract suite and the end-to-end tests also run on a cached store ("redis_cached"
in ``STORE_KINDS``). Real Redis servers only, over RESP2 and RESP3.
"""

from __future__ import annotations

import multiprocessing
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from flask_cloakroom import Cloakroom, ConfigError, StoreUnavailable
from flask_cloakroom.stores import Record, open_store
from flask_cloakroom.stores.redis import RedisStore
from flask_cloakroom.stores.redis_cache import RecordCache

from .conftest import add_views
from .servers import ControllableRedis, RedisServer, flush_prefix
from .test_store_outages import freeze

NOW = time.time()


def rec(key: str | None = None, *, version: int = 1, payload: bytes = b'{"v":1}') -> Record:
    expires = float(int(time.time()) + 600)  # whole seconds: Redis keeps milliseconds
    return Record(key or secrets.token_hex(16), "ursula", expires, version, payload)


def cached_store(url: str, prefix: str, *, protocol: int | None = None) -> RedisStore:
    options: dict[str, Any] = {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        # As open_store configures it: one retry for a connection that died idle.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    }
    if protocol is not None:
        options["protocol"] = protocol
    return RedisStore(
        redis.Redis.from_url(url, **options), prefix=prefix, client_cache=100, wait_timeout=1.0
    )


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def cached(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[RedisStore]:
    """A cached store on the shared test server, under a prefix of its own."""
    prefix = f"{redis_server.prefix}cache{secrets.token_hex(4)}:"
    store = cached_store(redis_server.url, prefix, protocol=request.param)
    yield store
    store.close()
    store.client.close()
    flush_prefix(redis_server.url, prefix)


@pytest.fixture
def other(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Another client: another worker, an operator, a revocation from elsewhere."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def settle() -> None:
    """Long enough for a message on loopback (the tests below assert no more than that)."""
    time.sleep(0.02)


def saved(store: RedisStore) -> tuple[Record, RecordCache]:
    """A new record, saved through ``store``; and the store's cache."""
    record = rec()
    assert store.save(record, expected=None, now=NOW)
    assert store._cache is not None
    return record, store._cache


def test_repeated_reads_cost_no_command_until_the_record_changes(
    cached: RedisStore, other: redis.Redis
) -> None:
    record, cache = saved(cached)
    for _ in range(20):
        assert cached.load(record.key) == record
    assert (cache.misses, cache.hits) == (1, 19)  # one GET, then the cache
    # Another worker writes a new version: the next read has it.
    newer = rec(record.key, version=2, payload=b'{"v":2}')
    with closing(RedisStore(other, prefix=cached.prefix)) as writer:
        assert writer.save(newer, expected=1, now=NOW)
    settle()
    assert cached.load(record.key) == newer
    # This process's own write is visible at once, before Redis's message arrives.
    newest = rec(record.key, version=3, payload=b'{"v":3}')
    assert cached.save(newest, expected=2, now=NOW)
    assert cached.load(record.key) == newest
    # A revocation from elsewhere (a plain DEL) ends it.
    other.delete(cached.record_name(record.key))
    settle()
    assert cached.load(record.key) is None
    assert cached._cache is not None and cached._cache.invalidations >= 2


def test_a_read_racing_a_write_does_not_cache_the_old_value(
    cached: RedisStore, other: redis.Redis
) -> None:
    """The write lands after the miss's GET was answered but before its value is kept."""
    record, cache = saved(cached)
    newer = rec(record.key, version=2, payload=b'{"v":2}')
    name = cached.record_name(record.key)

    def fetch_then_write() -> bytes | None:
        value = other.get(name)
        assert value is None or isinstance(value, bytes)
        with closing(RedisStore(other, prefix=cached.prefix)) as writer:
            assert writer.save(newer, expected=1, now=NOW)
        settle()
        with cache._lock:  # another request takes the invalidation in meanwhile
            cache._sync()
        return value

    with cache._lock:
        cache._entries.clear()
    raw = cache.get(name, fetch_then_write)
    assert raw is not None and raw.startswith(b"1:")  # this read saw version 1...
    assert cached.load(record.key) == newer  # ...but did not keep it


@pytest.fixture
def flushable(controllable_redis: ControllableRedis) -> Iterator[RedisStore]:
    """A cached store on a server of its own, which the test may flush and restart."""
    controllable_redis.ensure_healthy()
    store = cached_store(controllable_redis.url, "flushable:")
    yield store
    store.close()
    store.client.close()
    controllable_redis.ensure_healthy()
    flush_prefix(controllable_redis.url, "flushable:")


def test_a_flush_a_restart_and_a_killed_connection_empty_the_cache(
    flushable: RedisStore, controllable_redis: ControllableRedis
) -> None:
    admin = controllable_redis.client(decode_responses=False)
    try:
        record = rec()
        assert flushable.save(record, expected=None, now=NOW)
        assert flushable.load(record.key) == record
        admin.flushall()  # an invalidation of everything
        settle()
        assert flushable.load(record.key) is None

        # The tracking connection killed: a change made meanwhile is seen (the cache
        # was dropped, not trusted), and tracking comes back by itself.
        assert flushable.save(record, expected=None, now=NOW)
        assert flushable.load(record.key) == record
        trackers = [c for c in admin.client_list() if "t" in str(c.get("flags", ""))]
        assert len(trackers) == 1
        admin.client_kill_filter(_id=trackers[0]["id"])
        changed = rec(record.key, version=2, payload=b"changed")
        with closing(RedisStore(admin, prefix="flushable:")) as writer:
            assert writer.save(changed, expected=1, now=NOW)
        assert flushable.load(record.key) == changed
        time.sleep(1.1)  # RETRY_EVERY
        assert flushable.load(record.key) == changed
        assert flushable.load(record.key) == changed
        assert any("t" in str(c.get("flags", "")) for c in admin.client_list())

        # A restart (the data is saved and loaded back): nothing stale either.
        controllable_redis.restart()
        assert flushable.load(record.key) == changed
        later = rec(record.key, version=3, payload=b"later")
        admin2 = controllable_redis.client(decode_responses=False)
        with closing(RedisStore(admin2, prefix="flushable:")) as writer:
            assert writer.save(later, expected=2, now=NOW)
        admin2.close()
        time.sleep(1.1)
        assert flushable.load(record.key) == later
    finally:
        admin.close()


def test_a_silent_server_is_not_trusted(
    flushable: RedisStore, controllable_redis: ControllableRedis
) -> None:
    """A server that stops answering (a network that drops packets): within LIVENESS
    the cache stops serving, and the read goes to Redis and fails cleanly."""
    record = rec()
    assert flushable.save(record, expected=None, now=NOW)
    assert flushable.load(record.key) == record
    admin = controllable_redis.client()
    pid = int(admin.info("server")["process_id"])
    admin.close()
    thaw = freeze(pid)
    try:
        time.sleep(0.7)  # past LIVENESS (0.5 s)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            flushable.load(record.key)
        assert time.monotonic() - started < 3.0
    finally:
        thaw()
    time.sleep(0.2)
    assert flushable.load(record.key) == record


def test_a_forked_process_has_a_cache_and_a_connection_of_its_own(
    cached: RedisStore, other: redis.Redis, redis_server: RedisServer
) -> None:
    record = rec()
    assert cached.save(record, expected=None, now=NOW)
    assert cached.load(record.key) == record  # the parent's tracker is up
    context = multiprocessing.get_context("fork")
    out = context.Queue()

    cache = cached._cache
    assert cache is not None
    misses_before = cache.misses

    def child() -> None:  # the parent's cache, inherited: it must start empty
        found = cached.load(record.key)
        tracking = cache._tracker is not None and cache.heard()
        out.put((found == record, cache.misses - misses_before, cache.hits, tracking))

    hits_before = cache.hits
    process = context.Process(target=child)
    process.start()
    process.join(20)
    assert process.exitcode == 0
    found, misses, hits, tracking = out.get(timeout=5)
    assert found and misses == 1 and hits == hits_before  # a miss: the cache started empty
    assert tracking  # and the child set up a tracking connection of its own
    # A fork that Python's hooks did not see (some servers fork from C) is caught by
    # the process id: the tracker is set up again and the cache starts empty.
    assert cached.load(record.key) == record
    tracker = cache._tracker
    assert tracker is not None
    hits = cache.hits
    tracker.pid = -1
    assert cached.load(record.key) == record
    assert cache.hits == hits and cache._tracker is not tracker
    tracker.close()
    # The parent's tracking connection is still its own and still works.
    other.delete(cached.record_name(record.key))
    settle()
    assert cached.load(record.key) is None


def test_a_revocation_under_load_is_never_served_after_its_invalidation(
    redis_server: RedisServer,
) -> None:
    """Readers hammer a session through a Flask app with the cache while another app
    (another worker, no cache) revokes it, a hundred times.  No read that started 1 ms
    after the revocation was acknowledged may see the session; the staleness window
    (last stale read's start after the acknowledgement) is measured and printed."""
    prefix = f"{redis_server.prefix}revoke{secrets.token_hex(4)}:"

    def app(cache: int) -> tuple[Flask, Cloakroom]:
        flask_app = Flask(__name__)
        flask_app.config.update(
            SECRET_KEY="cache-secret-" + "c" * 24,
            CLOAKROOM_STORE=redis_server.url,
            CLOAKROOM_REDIS_PREFIX=prefix,
            CLOAKROOM_REDIS_CLIENT_CACHE=cache,
        )
        cloak = Cloakroom(flask_app)
        add_views(flask_app, cloak)
        return flask_app, cloak

    reader_app, _ = app(1000)
    admin_app, admin = app(0)
    trials, readers = 100, 3
    windows: list[float] = []
    late_stale = 0
    reads = live_reads = 0
    try:
        for trial in range(trials):
            owner = admin_app.test_client()
            assert owner.post(f"/login/u{trial}").status_code == 200
            cookie = owner.get_cookie("session")
            assert cookie is not None
            with admin_app.test_request_context("/"):
                (info,) = admin.sessions(f"u{trial}")
            log: list[tuple[float, bool]] = []
            stop = threading.Event()

            def read(
                client: FlaskClient,
                log: list[tuple[float, bool]] = log,
                stop: threading.Event = stop,
            ) -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    user = client.get("/whoami").get_json()["user"]
                    log.append((started, user is not None))

            clients = []
            for _ in range(readers):
                client = reader_app.test_client()
                client.set_cookie("session", cookie.value)
                assert client.get("/whoami").get_json()["user"] == f"u{trial}"  # now cached
                clients.append(client)
            threads = [threading.Thread(target=read, args=(c,)) for c in clients]
            for thread in threads:
                thread.start()
            time.sleep(0.01 + (trial % 5) * 0.002)
            with admin_app.test_request_context("/"):
                assert admin.revoke(info.handle)
            acknowledged = time.monotonic()
            time.sleep(0.03)
            stop.set()
            for thread in threads:
                thread.join(10)
            reads += len(log)
            live_reads += sum(1 for _, seen in log if seen)
            stale = [started - acknowledged for started, seen in log if seen]
            late = [delay for delay in stale if delay > 0]
            windows.append(max(late, default=0.0))
            late_stale += sum(1 for delay in late if delay > 0.001)
            assert any(not seen for _, seen in log), "the revocation was never seen"
    finally:
        flush_prefix(redis_server.url, prefix)
    reader_store = reader_app.extensions["cloakroom"].store
    assert isinstance(reader_store, RedisStore) and reader_store._cache is not None
    hits = reader_store._cache.hits
    # The reads that found the session were served from the cache (bar a few misses).
    assert hits >= 0.8 * live_reads, (hits, live_reads)
    windows.sort()
    print(
        f"\nclient cache, {trials} revocations under {readers} reading threads, "
        f"{reads} reads ({live_reads} before the revocation, {hits} cache hits): "
        f"stale reads started >1 ms after the acknowledgement: {late_stale}; "
        f"staleness window p50 {windows[len(windows) // 2] * 1e6:.0f} µs, "
        f"max {windows[-1] * 1e6:.0f} µs"
    )
    assert late_stale == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000",
        "redis+sentinel://127.0.0.1:26379/mymaster",
    ],
)
def test_the_cache_is_refused_where_it_cannot_be_kept_correct(url: str) -> None:
    with pytest.raises(ConfigError, match=r"CLOAKROOM_REDIS_CLIENT_CACHE.*standalone"):
        open_store(url, redis_client_cache=10)


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_a_bad_cache_size_fails_at_start_up(value: Any) -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s" * 32,
        CLOAKROOM_STORE="redis://127.0.0.1:1/0",
        CLOAKROOM_REDIS_CLIENT_CACHE=value,
    )
    with pytest.raises(ConfigError, match="CLOAKROOM_REDIS_CLIENT_CACHE"):
        Cloakroom(app)


def test_off_by_default(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, redis_prefix=f"{redis_server.prefix}plain:")
    assert isinstance(store, RedisStore) and store._cache is None
    store.close()


def test_metrics_count_hits_misses_and_invalidations(
    redis_server: RedisServer, other: redis.Redis
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY

    prefix = f"{redis_server.prefix}metrics{secrets.token_hex(4)}:"
    app = Flask(f"cache_metrics_{secrets.token_hex(4)}")
    app.config.update(
        SECRET_KEY="metrics-secret-" + "m" * 24,
        CLOAKROOM_STORE=redis_server.url,
        CLOAKROOM_REDIS_PREFIX=prefix,
        CLOAKROOM_REDIS_CLIENT_CACHE=100,
        CLOAKROOM_METRICS=True,
    )
    cloak = Cloakroom(app)
    add_views(app, cloak)

    def value(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, {"app": app.name, **labels}) or 0.0

    try:
        client = app.test_client()
        assert client.post("/login/mia").status_code == 200
        for _ in range(5):
            assert client.get("/whoami").get_json()["user"] == "mia"
        assert value("cloakroom_redis_cache_lookups_total", result="miss") == 1
        assert value("cloakroom_redis_cache_lookups_total", result="hit") == 4
        assert value("cloakroom_redis_cache_records") == 1
        # Revoked from elsewhere: one invalidation, and the next read misses.
        for name in other.scan_iter(match=f"{prefix}s:*"):
            other.delete(name)
        settle()
        assert client.get("/whoami").get_json()["user"] is None
        assert value("cloakroom_redis_cache_invalidations_total") == 1
        assert value("cloakroom_redis_cache_lookups_total", result="miss") == 2
    finally:
        flush_prefix(redis_server.url, prefix)
