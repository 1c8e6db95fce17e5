"""Redis failures, for real: a restart, a hung server, a read-only replica, a Sentinel
failover, a Cluster master killed, replicas that do not acknowledge, a Cluster resharded
under the app. Every test drives a Flask app (or the store) against throwaway servers it
may stop, pause, kill or reshard.

What must hold: a clean 503 (never a 500, a hang or a silent logout), no half-written
session, and recovery without restarting the app.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from redis.exceptions import ReadOnlyError

from flask_cloakroom import Cloakroom, StoreUnavailable
from flask_cloakroom.stores import Record
from flask_cloakroom.stores.base import CONNECT_REST_MOST
from flask_cloakroom.stores.redis import RedisStore, open_redis_store
from flask_cloakroom.tokens import store_key

from .conftest import AppFactory, add_views
from .servers import (
    ControllableRedis,
    ControllableRedisCluster,
    ControllableRedisSentinel,
    ServerError,
    flush_prefix,
)
from .support import after_the_rest

# Each test bounds how long requests take: no collection of older garbage meanwhile.
pytestmark = pytest.mark.usefixtures("no_collector_pauses")

NOW = 2_000_000_000.0


def app_on(url: str, prefix: str, **config: Any) -> Flask:
    """An app configured as a user would: CLOAKROOM_STORE is the URL."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s" * 32,
        CLOAKROOM_STORE=url,
        CLOAKROOM_REDIS_PREFIX=prefix,
        CLOAKROOM_STORE_TIMEOUT=0.5,
        CLOAKROOM_RETRY_AFTER=3,
    )
    app.config.update(config)
    add_views(app, Cloakroom(app))
    return app


def timed(call: Any, limit: float = 2.0) -> Any:
    """Run ``call()``; it must not take longer than ``limit`` seconds."""
    started = time.monotonic()
    result = call()
    assert time.monotonic() - started < limit, f"took {time.monotonic() - started:.2f}s"
    return result


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert b"Traceback" not in response.data
    assert "Set-Cookie" not in response.headers  # nobody is logged out by an outage


def session_key(web: FlaskClient) -> str:
    import base64

    cookie = web.get_cookie("session")
    assert cookie is not None
    return store_key(base64.urlsafe_b64decode(cookie.value.split(".")[0] + "="))


@dataclass
class Keys:
    """A fresh key prefix, and the servers whose keys under it are deleted afterwards."""

    prefix: str = field(default_factory=lambda: f"t{secrets.token_hex(4)}:")
    targets: list[Any] = field(default_factory=list)

    def on(self, server: Any) -> str:
        if not self.targets:
            self.prefix = f"{server.prefix}{self.prefix}"
        self.targets.append(server)
        return self.prefix


@pytest.fixture
def keys() -> Iterator[Keys]:
    made = Keys()
    yield made
    for target in made.targets:
        try:
            target.ensure_healthy()  # a test that failed midway may have left it down
        except ServerError:
            continue  # the harness replaces it, keys and all, before the next test uses it
        flush_prefix(target, made.prefix)


def served_again(web: FlaskClient) -> None:
    """Wait until a read of the session is served again after an outage.

    After a failed attempt to connect, the store's lane makes no other for a while
    (``CONNECT_REST_MOST`` at most after a refused connection): a request in that time
    gets the store-error answer, one after it is served.
    """
    status = after_the_rest(
        lambda: web.get("/whoami").status_code, lambda s: s == 503, CONNECT_REST_MOST + 0.4
    )
    assert status == 200, status


def test_an_app_rides_out_a_redis_restart(
    controllable_redis: ControllableRedis, keys: Keys
) -> None:
    app = app_on(controllable_redis.url, keys.on(controllable_redis))
    web = app.test_client()
    web.post("/set/x", json="before")
    web.post("/login/alice")

    controllable_redis.stop()  # SHUTDOWN SAVE: the data comes back with the server
    assert web.get("/nothing").status_code == 200  # views that ignore the session work
    assert_unavailable(timed(lambda: web.get("/get/x")))
    assert_unavailable(timed(lambda: web.post("/set/x", json="during")))

    controllable_redis.start()  # no app restart: served again once the lane's rest is over
    served_again(web)
    assert web.get("/get/x").get_json() == {"value": "before"}
    assert web.get("/whoami").get_json() == {"user": "alice"}
    assert web.post("/set/x", json="after").status_code == 200
    assert web.get("/get/x").get_json() == {"value": "after"}


@pytest.mark.parametrize("path", ["/logout", "/login/alice"])
def test_login_and_logout_during_an_outage_answer_503(
    controllable_redis: ControllableRedis, keys: Keys, path: str
) -> None:
    """A logout that could not delete the record must not say it did; a login that
    could not be stored must not crash."""
    app = app_on(controllable_redis.url, keys.on(controllable_redis))
    web = app.test_client()
    web.post("/set/x", json="before")
    web.post("/login/alice")
    controllable_redis.stop()
    try:
        assert_unavailable(timed(lambda: web.post(path)))
    finally:
        controllable_redis.start()
    served_again(web)
    assert web.get("/whoami").get_json() == {"user": "alice"}


def test_a_redis_outage_logs_each_failed_attempt_not_each_request(
    controllable_redis: ControllableRedis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is down the store rests between attempts to connect: each attempt's
    failure is logged at ERROR with redis-py's own error (not the rest that the lane's
    retry of it met), the requests answered during a rest at DEBUG."""
    app = app_on(controllable_redis.url, keys.on(controllable_redis))
    web = app.test_client()
    web.post("/set/x", json="before")
    caplog.set_level(logging.DEBUG, logger="flask_cloakroom")
    controllable_redis.stop()
    statuses = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.45:  # rests of 50, 100 and 200 ms: 4 attempts
            statuses.append(web.get("/get/x").status_code)
            time.sleep(0.002)
    finally:
        controllable_redis.start()
    assert set(statuses) == {503}
    loading = [r for r in caplog.records if r.getMessage().startswith("session store unavailable")]
    assert len(loading) == len(statuses)
    errors = [r for r in loading if r.levelno == logging.ERROR]
    assert 3 <= len(errors) <= 6, [r.getMessage() for r in errors]
    assert all("ConnectionError" in r.getMessage() for r in errors), errors[0].getMessage()
    resting = [r for r in loading if r.levelno == logging.DEBUG]
    assert len(resting) == len(statuses) - len(errors) >= 20
    assert all("the last attempt to connect to Redis at" in r.getMessage() for r in resting)
    served_again(web)


def test_pooled_connections_survive_a_restart_nobody_saw(
    controllable_redis: ControllableRedis, keys: Keys
) -> None:
    """No request during the outage: the pool still holds the dead connections, and the
    first request after must not pay for them with a 503."""
    app = app_on(controllable_redis.url, keys.on(controllable_redis))
    web = app.test_client()
    web.post("/set/x", json="kept")
    controllable_redis.restart()
    assert web.get("/get/x").get_json() == {"value": "kept"}
    assert web.post("/set/x", json="new").status_code == 200


def test_cluster_connections_survive_a_node_restart_nobody_saw(
    make_app: AppFactory, controllable_redis_cluster: ControllableRedisCluster, keys: Keys
) -> None:
    cluster = controllable_redis_cluster
    store = open_redis_store(cluster.url, prefix=keys.on(cluster), timeout=0.5, wait_replicas=0)
    admin: Any = cluster.client()
    try:
        app, _, _ = make_app(store)
        visitors = []
        for i in range(12):
            web = app.test_client()
            web.post("/set/x", json=i)
            visitors.append(web)
        for index in range(3):  # every node restarts (SHUTDOWN SAVE: the data comes back)
            cluster.stop_node(index)
            cluster.start_node(index)
        for i, web in enumerate(visitors):
            assert web.get("/get/x").get_json() == {"value": i}
            assert web.post("/set/x", json=i + 100).status_code == 200
    finally:
        store.close()
        admin.close()


def test_a_hung_redis_times_out(controllable_redis: ControllableRedis, keys: Keys) -> None:
    app = app_on(controllable_redis.url, keys.on(controllable_redis), CLOAKROOM_STORE_TIMEOUT=0.3)
    web = app.test_client()
    web.post("/set/x", json="before")
    admin: Any = controllable_redis.client()
    try:
        paused_until = time.monotonic() + 1.5
        admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # the server stops answering
        assert_unavailable(timed(lambda: web.get("/get/x"), limit=1.0))
        assert_unavailable(timed(lambda: web.post("/set/x", json="during"), limit=1.0))
        time.sleep(max(0.0, paused_until - time.monotonic()) + 0.1)
        assert web.get("/get/x").get_json() == {"value": "before"}
    finally:
        admin.close()


def test_writes_to_a_read_only_replica_are_unavailable(
    make_app: AppFactory, controllable_redis_sentinel: ControllableRedisSentinel, keys: Keys
) -> None:
    """What a client still connected to a demoted master sees during a failover."""
    master = controllable_redis_sentinel.master_address()
    (replica,) = [a for a in controllable_redis_sentinel.node_addresses if a != master]
    client = redis.Redis(host=replica[0], port=replica[1], socket_timeout=1)
    store = RedisStore(client, prefix=keys.on(controllable_redis_sentinel))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.save(
                Record(secrets.token_hex(16), "u", NOW + 60, 1, b"x"), expected=None, now=NOW
            )
        assert isinstance(caught.value.__cause__, ReadOnlyError)
        app, _, _ = make_app(store, CLOAKROOM_RETRY_AFTER=3)
        assert_unavailable(app.test_client().post("/set/x", json=1))
    finally:
        store.close()  # its lane's connections: the client does not know them
        client.close()


def test_wait_for_replicas(
    controllable_redis_sentinel: ControllableRedisSentinel,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """WAIT 1: when save() returns, the replica has the record. WAIT 2 with one replica:
    the write still succeeds, after half the timeout, with a warning."""
    group = controllable_redis_sentinel
    prefix = keys.on(group)
    master = group.master_address()
    (replica_address,) = [a for a in group.node_addresses if a != master]
    replica = redis.Redis(host=replica_address[0], port=replica_address[1])
    one = open_redis_store(group.url, prefix=prefix, timeout=1.0, wait_replicas=1)
    two = open_redis_store(group.url, prefix=prefix, timeout=0.4, wait_replicas=2)
    assert isinstance(one, RedisStore)
    warm: Any = group.master_client()
    try:
        # A replica that has just synced acknowledges its first offset only after a
        # moment: wait for that once, so what follows measures the store, not the boot.
        warm.set(f"{prefix}warm-up", 1)
        assert warm.execute_command("WAIT", 1, 10_000) == 1
        caplog.set_level(logging.WARNING, logger="flask_cloakroom")
        for _ in range(20):
            record = Record(secrets.token_hex(16), "u", NOW + 60, 1, b"x")
            assert one.save(record, expected=None, now=NOW)
            assert replica.exists(one.record_name(record.key)) == 1
        assert not caplog.records
        record = Record(secrets.token_hex(16), "u", NOW + 60, 1, b"x")
        started = time.monotonic()
        assert two.save(record, expected=None, now=NOW)
        assert 0.15 < time.monotonic() - started < 0.4
        assert "only 1 of 2 replicas acknowledged" in caplog.text
    finally:
        one.close()
        two.close()
        replica.close()
        warm.close()


@pytest.mark.slow
def test_sessions_acknowledged_before_a_failover_survive_it(
    controllable_redis_sentinel: ControllableRedisSentinel,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With CLOAKROOM_REDIS_WAIT_REPLICAS=1, a write the app acknowledged is on the replica
    before the response: the replica the sentinel promotes has every session."""
    group = controllable_redis_sentinel
    warm: Any = group.master_client()
    warm.set(f"{keys.on(group)}warm-up", 1)  # see test_wait_for_replicas
    assert warm.execute_command("WAIT", 1, 10_000) == 1
    warm.close()
    caplog.set_level(logging.WARNING, logger="flask_cloakroom")
    app = app_on(
        group.url, keys.on(group), CLOAKROOM_REDIS_WAIT_REPLICAS=1, CLOAKROOM_STORE_TIMEOUT=1.0
    )
    users = []
    for i in range(20):
        web = app.test_client()
        assert web.post("/set/x", json=i).status_code == 200
        assert web.post(f"/login/user{i}").status_code == 200
        users.append(web)
    assert "replicas acknowledged" not in caplog.text  # every write was acknowledged

    killed = group.kill_master()
    # While the sentinel has not promoted the replica yet: a fast, clean 503.
    assert_unavailable(timed(lambda: users[0].get("/get/x"), limit=3))
    assert_unavailable(timed(lambda: users[1].post("/set/x", json="lost?"), limit=3))
    promoted = group.wait_for_failover(timeout=30)
    assert promoted != killed

    # No restart of the app: every session acknowledged before the kill is there.
    for i, web in enumerate(users):
        assert web.get("/get/x").get_json() == {"value": i}
        assert web.get("/whoami").get_json() == {"user": f"user{i}"}
    assert users[0].post("/set/x", json="after").status_code == 200
    assert users[0].get("/get/x").get_json() == {"value": "after"}
    late = app.test_client()
    late.post("/set/x", json="new")
    late.post("/login/late")
    assert late.get("/whoami").get_json() == {"user": "late"}


@dataclass
class Shards:
    """Sessions made through an app on a Cluster, each with whether its record is on
    master 0, the one the test takes down."""

    prefix: str
    store: RedisStore
    node_of: Callable[[str], str]
    dead_name: str
    #: (browser, the value it set, whether its record is on master 0)
    visitors: list[tuple[FlaskClient, int, bool]]
    #: A client of each node, masters first.
    nodes: list[Any]


def cluster_view(cluster: ControllableRedisCluster, index: int) -> str:
    """``CLUSTER NODES`` and ``CLUSTER INFO`` as one node sees them (for a failure's
    message: which node it takes for the master of the slots, and since when)."""
    client: Any = cluster.node_client(index, socket_timeout=2.0)
    try:
        nodes = client.execute_command("CLUSTER NODES")
        info = client.execute_command("CLUSTER INFO")
        return f"{nodes}\n{info}"
    except redis.RedisError as error:
        return f"(node {index} did not answer: {error})"
    finally:
        client.close()


@contextlib.contextmanager
def sessions_across_shards(
    make_app: AppFactory, cluster: ControllableRedisCluster, keys: Keys, count: int
) -> Iterator[Shards]:
    """``count`` sessions, each with ``x`` set, some of them on master 0 and some not; the
    shards left serve while one has no master.  Undone afterwards (a node the test hung
    is woken; a dead one is left to the harness)."""
    prefix = keys.on(cluster)
    nodes = [cluster.node_client(i) for i in range(len(cluster.nodes))]
    for node in nodes:  # let the other shards serve while one has no master
        node.config_set("cluster-require-full-coverage", "no")
    admin: Any = cluster.client()
    store = open_redis_store(cluster.url, prefix=prefix, timeout=0.5, wait_replicas=0)
    assert isinstance(store, RedisStore)
    try:
        app, _, _ = make_app(store, CLOAKROOM_RETRY_AFTER=3)
        dead = cluster.nodes[0]
        dead_name = f"{dead[0]}:{dead[1]}"

        def node_of(key: str) -> str:
            return str(admin.get_node_from_key(key).name)

        visitors: list[tuple[FlaskClient, int, bool]] = []
        # Session ids are random: go on past ``count`` until both kinds are there (12
        # all on one side or the other happens about once in 130 runs).
        kinds: set[bool] = set()
        while len(visitors) < count or len(kinds) < 2:
            assert len(visitors) < 20 * count, "every session lands on one side"
            i = len(visitors)
            web = app.test_client()
            assert web.post("/set/x", json=i).status_code == 200
            on_dead = node_of(store.record_name(session_key(web))) == dead_name
            visitors.append((web, i, on_dead))
            kinds.add(on_dead)
        yield Shards(prefix, store, node_of, dead_name, visitors, nodes)
    finally:
        store.close()
        admin.close()
        cluster.resume_node(0)  # a master the test hung answers again (as a replica)
        for node in nodes:
            try:
                with contextlib.suppress(redis.ConnectionError):  # a node left dead
                    node.config_set("cluster-require-full-coverage", "yes")
            finally:
                node.close()


@pytest.mark.slow
def test_a_dead_cluster_master_fails_only_its_own_sessions(
    make_app: AppFactory, controllable_redis_cluster: ControllableRedisCluster, keys: Keys
) -> None:
    cluster = controllable_redis_cluster
    with sessions_across_shards(make_app, cluster, keys, 24) as shards:
        cluster.kill_node(0)
        for phase in ("just killed", "marked failed by the cluster"):
            for web, i, on_dead in shards.visitors:
                response = timed(lambda web=web: web.get("/get/x"))
                if on_dead:
                    assert_unavailable(response)
                else:
                    assert response.get_json() == {"value": i}, phase
                    assert timed(lambda web=web, i=i: web.post("/set/x", json=i)).status_code == 200
            time.sleep(cluster.node_timeout_ms / 1000 * 2)

        # A new session whose record lands on a live shard but whose user index is on the
        # dead one: the write fails, and the record is taken back rather than left unindexed.
        user = next(
            u
            for u in (f"user{n}" for n in range(1000))
            if shards.node_of(shards.store.index_key(u)) == shards.dead_name
        )
        key = next(
            k
            for k in (secrets.token_hex(16) for _ in range(1000))
            if shards.node_of(shards.store.record_name(k)) != shards.dead_name
        )
        with pytest.raises(StoreUnavailable):
            shards.store.save(
                Record(key, user, time.time() + 60, 1, b"x"), expected=None, now=time.time()
            )
        assert shards.store.load(key) is None

        cluster.start_node(0)  # back (empty: it had no replica and no persistence)
        for web, i, on_dead in shards.visitors:
            response = web.get("/get/x")
            assert response.status_code == 200
            if not on_dead:
                assert response.get_json() == {"value": i}


def test_a_frozen_cluster_master_costs_the_timeout_only_to_the_attempts(
    make_app: AppFactory, controllable_redis_cluster: ControllableRedisCluster, keys: Keys
) -> None:
    """A frozen master (SIGSTOP) of a Cluster without replicas: its sessions' requests
    fail, at once but for the node lane's attempts to connect (each a hand-shake that
    times out, then a rest at least as long).  The Cluster client is not asked to try
    the same node again while the lane rests: each request waited the timeout before.
    The other shards serve as before."""
    cluster = controllable_redis_cluster
    with sessions_across_shards(make_app, cluster, keys, 12) as shards:
        on_dead = next(web for web, _, dead in shards.visitors if dead)
        alive, value = next((web, i) for web, i, dead in shards.visitors if not dead)
        cluster.pause_node(0)
        try:
            answers: list[tuple[int, float]] = []
            started = time.monotonic()
            while time.monotonic() - started < 2.5:
                began = time.monotonic()
                status = on_dead.get("/get/x").status_code
                answers.append((status, time.monotonic() - began))
            spent = time.monotonic() - started
            assert timed(lambda: alive.get("/get/x")).get_json() == {"value": value}
        finally:
            cluster.resume_node(0)
        assert {status for status, _ in answers} == {503}
        slow = [seconds for _, seconds in answers if seconds > 0.25]  # the timeout: 0.5 s
        assert len(answers) - len(slow) >= 20, (len(answers), slow)
        assert len(slow) <= spent / (2 * 0.5) + 2, (slow, spent)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_cluster_failover_to_a_replica_keeps_the_sessions(
    make_app: AppFactory,
    controllable_redis_cluster_replicated: ControllableRedisCluster,
    keys: Keys,
    failure: str,
) -> None:
    """A master with a replica is killed (connections refused: the store retries through
    the Cluster client) or hangs (SIGSTOP: commands time out and the store re-reads the
    slot table): its sessions answer 503 until the cluster has promoted the replica, then
    work again with their data, without restarting the app or the store; the other
    shards' sessions work throughout."""
    cluster = controllable_redis_cluster_replicated
    with sessions_across_shards(make_app, cluster, keys, 12) as shards:
        # WAIT counts the writes of its own connection: write on master 0, after the
        # sessions, and wait until the replica has it (and so everything before it).
        fence = next(
            k
            for k in (f"{shards.prefix}fence{n}" for n in range(1000))
            if shards.node_of(k) == shards.dead_name
        )
        master: Any = shards.nodes[0]
        master.set(fence, 1)
        assert master.execute_command("WAIT", 1, 5000) == 1

        if failure == "killed":
            cluster.kill_node(0)
        else:
            cluster.pause_node(0)
        pending = {i: web for web, i, on_dead in shards.visitors if on_dead}
        unavailable = 0
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for i, web in list(pending.items()):
                response = timed(lambda web=web: web.get("/get/x"), limit=3.0)
                if response.status_code == 200:  # promoted: the replicated data is there
                    assert response.get_json() == {"value": i}
                    del pending[i]
                else:
                    assert_unavailable(response)
                    unavailable += 1
            for web, i, on_dead in shards.visitors:
                if not on_dead:
                    response = timed(lambda web=web: web.get("/get/x"), limit=3.0)
                    assert response.status_code == 200
                    assert response.get_json() == {"value": i}
            time.sleep(0.1)
        assert not pending, (
            f"sessions {sorted(pending)} still unavailable after 20 s; "
            f"the cluster as node 1 sees it:\n{cluster_view(cluster, 1)}"
        )
        assert unavailable  # the outage was seen: the promotion is not instant
        assert cluster.running[0] is (failure == "hung")  # not restarted: the replica serves

        for web, i, _ in shards.visitors:
            assert web.get("/get/x").get_json() == {"value": i}
            assert web.post("/set/x", json=i + 100).status_code == 200
            assert web.get("/get/x").get_json() == {"value": i + 100}


@dataclass
class Resharding:
    """Moves slots between the masters of a Cluster as ``redis-cli --cluster reshard``
    does, one step at a time, so that a test can look halfway; remembers each slot's
    first owner, to give it back."""

    cluster: ControllableRedisCluster
    #: A client of each master.
    masters: list[Any]
    #: slot -> (the master it was on, the master it was moved to)
    moved: dict[int, tuple[int, int]] = field(default_factory=dict)

    def keys(self, master: int, slot: int) -> list[str]:
        """The keys that ``master`` holds in ``slot``."""
        return list(self.masters[master].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000))

    def owner(self, slot: int, *, asking: int) -> int:
        """The master that serves ``slot``, as master ``asking`` sees it."""
        ports = [port for _, port in self.cluster.nodes]
        for start, end, master, *_ in self.masters[asking].execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return ports.index(int(master[1]))
        raise AssertionError(f"no master serves slot {slot}")

    def move(self, slot: int, source: int, target: int, *, only: list[str] | None = None) -> None:
        """Move ``slot`` from master ``source`` to master ``target``: the target imports
        it, the source migrates it, MIGRATE takes its keys across, then every master is
        told the new owner.  With ``only``, just those keys go and the slot is left
        half-moved: the source answers ASK for the keys it no longer has.  Moving it
        again without ``only`` finishes the move."""
        self.moved.setdefault(slot, (source, target))
        ids = [str(master.execute_command("CLUSTER", "MYID")) for master in self.masters]
        self.masters[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        self.masters[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        host, port = self.cluster.nodes[target]
        if only is not None:
            if only:
                self.masters[source].execute_command(
                    "MIGRATE", host, port, "", 0, 5000, "KEYS", *only
                )
            return
        while batch := self.keys(source, slot):
            self.masters[source].execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *batch)
        others = [m for m in range(len(self.masters)) if m not in (source, target)]
        for master in (target, source, *others):
            self.masters[master].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])

    def undo(self) -> None:
        """Give every slot moved back to its first owner, with its keys."""
        for slot, (source, target) in list(self.moved.items()):
            if self.owner(slot, asking=source) == source:  # left half-moved
                self.move(slot, source, target)
            self.move(slot, target, source)


@contextlib.contextmanager
def resharding(cluster: ControllableRedisCluster) -> Iterator[Resharding]:
    """A :class:`Resharding` of ``cluster``; afterwards its slots are put back."""
    masters = [cluster.node_client(i) for i in range(cluster.masters)]
    reshard = Resharding(cluster, masters)
    try:
        yield reshard
    finally:
        try:
            reshard.undo()
        finally:
            for master in masters:
                master.close()


def test_a_cluster_resharding_keeps_the_sessions(
    make_app: AppFactory, controllable_redis_cluster: ControllableRedisCluster, keys: Keys
) -> None:
    """An operator reshards a Cluster (``redis-cli --cluster reshard``, or adding a
    master): slot by slot, the new master imports the slot, the old one migrates it and
    MIGRATE moves its keys across, then every master is told the new owner.  Halfway, the
    old master answers ASK for a key it no longer has; afterwards the app's slot table is
    stale, and the old master answers MOVED.  The store hands such a command to the
    Cluster client, which follows it and fixes its table.  Through both phases, without
    restarting the app, every session is read and written with its data, the user's
    session list finds them all, and logout and revocation still end them."""
    cluster = controllable_redis_cluster
    store = open_redis_store(cluster.url, prefix=keys.on(cluster), timeout=0.5, wait_replicas=0)
    assert isinstance(store, RedisStore)
    try:
        app, cloak, _ = make_app(store)
        visitors: dict[str, tuple[FlaskClient, int]] = {}
        for i in range(9):
            web = app.test_client()
            assert web.post("/login/alice").status_code == 200
            assert web.post("/set/x", json=i).status_code == 200
            visitors[session_key(web)] = (web, i)
        ports = [port for _, port in cluster.nodes]

        def master_of(key: str) -> int:
            """The master that the app's slot table names for a session's record."""
            return ports.index(store.client.get_node_from_key(store.record_name(key)).port)

        def slot_of(key: str) -> int:
            return int(store.client.keyslot(store.record_name(key)))

        def listed() -> set[str]:
            return {s["handle"] for s in app.test_client().get("/sessions/alice").get_json()}

        # Two sessions of the master with the most (three at least), in two slots: the
        # record of one is moved first, the other's stays on the old master until the end.
        source = max(range(cluster.masters), key=lambda m: sum(master_of(k) == m for k in visitors))
        target = (source + 1) % cluster.masters
        moved, *others = [k for k in visitors if master_of(k) == source]
        staying = next(k for k in others if slot_of(k) != slot_of(moved))
        # A record key of a new session in the moved record's slot.
        fresh = next(
            k for k in iter(lambda: secrets.token_hex(16), "") if slot_of(k) == slot_of(moved)
        )

        with resharding(cluster) as reshard:
            reshard.move(slot_of(moved), source, target, only=[store.record_name(moved)])
            reshard.move(slot_of(staying), source, target, only=[])
            assert store.record_name(moved) in reshard.keys(target, slot_of(moved))
            assert store.record_name(moved) not in reshard.keys(source, slot_of(moved))
            assert store.record_name(staying) in reshard.keys(source, slot_of(staying))

            # Halfway: the moved record is reached through ASK, the other one directly.
            for key in (moved, staying):
                web, i = visitors[key]
                assert web.get("/get/x").get_json() == {"value": i}
                assert web.post("/set/x", json=i + 100).status_code == 200
                assert web.get("/get/x").get_json() == {"value": i + 100}
                assert web.get("/whoami").get_json() == {"user": "alice"}
            assert listed() == set(visitors)
            # A new session in the half-moved slot is created on the new master.
            now = time.time()
            assert store.save(Record(fresh, None, now + 60, 1, b"new"), expected=None, now=now)
            assert store.record_name(fresh) in reshard.keys(target, slot_of(moved))

            # A merge's write lock (one script on the record and its lock, a key the
            # old master does not have) gets TRYAGAIN while the slot is half-moved, for
            # longer than the Cluster client tries (about 0.4 s): it waits, within the
            # store timeout, until the slot has moved.
            before = store.load(moved)
            assert before is not None
            patient = open_redis_store(
                cluster.url, prefix=keys.on(cluster), timeout=5, wait_replicas=0
            )
            merged: list[Record | BaseException | None] = []

            def merge() -> None:
                try:
                    merged.append(
                        patient.update_locked(
                            moved,
                            lambda r: None if r is None else r._replace(version=r.version + 1),
                            now=time.time(),
                        )
                    )
                except BaseException as error:
                    merged.append(error)

            merger = threading.Thread(target=merge)
            merger.start()
            try:
                merger.join(1.0)
                assert merged == [], "the merge went through a half-moved slot"
                reshard.move(slot_of(moved), source, target)
                merger.join(10)
                assert merged == [before._replace(version=before.version + 1)]
                assert patient.load(moved) == merged[0]  # (the app's store learns below)
            finally:
                if merger.is_alive():
                    reshard.move(slot_of(moved), source, target)
                    merger.join(10)
                patient.close()

            reshard.move(slot_of(staying), source, target)
            assert reshard.keys(source, slot_of(moved)) == []
            assert reshard.keys(source, slot_of(staying)) == []
            assert store.record_name(staying) in reshard.keys(target, slot_of(staying))

            # Done: the app's table still names the old master, which answers MOVED.
            assert [master_of(moved), master_of(staying)] == [source, source]
            for key in (moved, staying):
                web, i = visitors[key]
                assert web.get("/get/x").get_json() == {"value": i + 100}
                assert web.post("/set/x", json=i + 200).status_code == 200
                assert web.get("/get/x").get_json() == {"value": i + 200}
            assert [master_of(moved), master_of(staying)] == [target, target]  # learnt
            loaded = store.load(fresh)
            assert loaded is not None
            assert loaded.payload == b"new"
            assert listed() == set(visitors)

            # Logout and revocation end the sessions on their new master.
            assert visitors[moved][0].post("/logout").status_code == 200
            with app.app_context():
                assert cloak.revoke(staying)
            for key in (moved, staying):
                web, _ = visitors[key]
                assert web.get("/whoami").get_json() == {"user": None}
                assert web.get("/get/x").get_json() == {"value": None}
                assert store.load(key) is None
                assert store.record_name(key) not in reshard.keys(target, slot_of(key))
            assert listed() == set(visitors) - {moved, staying}
    finally:
        store.close()
