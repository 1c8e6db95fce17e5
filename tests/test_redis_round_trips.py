"""Redis commands and round trips per request, counted on the wire, through a real app.

A redis-py connection class counts every command the client sends and every round
trip: a write to the network after a read (so a Cluster pipeline that writes to two
nodes before reading both is one round trip). Each store operation's share is taken
with an :class:`InstrumentedStore` observer. The read path is also checked on the
server, with ``INFO commandstats``.

Connection set-up (HELLO, CLIENT SETINFO) is not counted: connections are pooled.
Scripts are loaded beforehand (``preload_scripts``), as after the first request of a
process; without that, the first write of each kind costs one more round trip.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.redis import RedisStore

from .conftest import AppFactory
from .servers import ControllableRedis, ControllableRedisCluster, flush_prefix
from .support import FakeClock, counting_connection


@dataclass
class Op:
    """The traffic of one store operation."""

    name: str
    commands: list[str] = field(default_factory=list)
    round_trips: int = 0
    nodes: set[int] = field(default_factory=set)


class Traffic:
    """What the client sent, attributed to store operations."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.current = Op("(outside any store operation)")
        self.sending = False  # the last network action was a write
        self.quiet = 0  # >0 while a connection is being set up

    def command(self, name: str) -> None:
        if not self.quiet:
            self.current.commands.append(name.upper())

    def send(self, port: int) -> None:
        if self.quiet:
            return
        if not self.sending:
            self.current.round_trips += 1
        self.sending = True
        self.current.nodes.add(port)

    def read(self) -> None:
        if not self.quiet:
            self.sending = False

    def finish(self, name: str, seconds: float, failed: bool) -> None:
        """InstrumentedStore observer: what was sent since the last op was this op."""
        self.current.name = name
        self.ops.append(self.current)
        self.current = Op("(outside any store operation)")

    def reset(self) -> None:
        self.ops = []
        self.current = Op("(outside any store operation)")

    def take(self) -> list[Op]:
        ops, self.ops = self.ops, []
        assert not self.current.commands, f"traffic outside store operations: {self.current}"
        return ops


@dataclass
class Metered:
    store: RedisStore
    traffic: Traffic
    instrumented: InstrumentedStore


@pytest.fixture(params=["standalone", "cluster"])
def metered(request: pytest.FixtureRequest) -> Iterator[Metered]:
    """A Redis store whose client counts its traffic (throwaway servers)."""
    traffic = Traffic()
    connection_class = counting_connection(traffic)
    client: Any
    if request.param == "standalone":
        server: Any = request.getfixturevalue("controllable_redis")
        assert isinstance(server, ControllableRedis)
        pool = redis.ConnectionPool(
            host=server.host, port=server.port, connection_class=connection_class
        )
        client = redis.Redis(connection_pool=pool)
    else:
        server = request.getfixturevalue("controllable_redis_cluster")
        assert isinstance(server, ControllableRedisCluster)
        host, port = server.nodes[0]
        client = RedisCluster.from_url(f"redis://{host}:{port}", connection_class=connection_class)
    prefix = f"{server.prefix}{secrets.token_hex(4)}:"
    store = RedisStore(client, prefix=prefix)
    store.preload_scripts()
    traffic.reset()
    yield Metered(store, traffic, InstrumentedStore(store, traffic.finish))
    flush_prefix(client, prefix)
    store.close()  # its lanes' connections: the client does not know them
    client.close()


def single(ops: list[Op], name: str) -> Op:
    (op,) = [op for op in ops if op.name == name]
    return op


def test_commands_and_round_trips_per_request(
    make_app: AppFactory, metered: Metered, clock: FakeClock
) -> None:
    app, _, _ = make_app(metered.instrumented, CLOAKROOM_TOUCH_INTERVAL=60)
    web = app.test_client()
    traffic = metered.traffic
    cluster = metered.store.cluster

    web.get("/nothing")  # no cookie: no traffic at all
    assert traffic.take() == []

    web.post("/set/x", json=1)  # a new anonymous session: one write, one command
    (create,) = traffic.take()
    assert (create.name, create.commands, create.round_trips) == ("save", ["EVALSHA"], 1)

    assert web.get("/get/x").get_json() == {"value": 1}  # read-only: exactly one command
    (load,) = traffic.take()
    assert (load.name, load.commands, load.round_trips) == ("load", ["GET"], 1)

    web.post("/set/x", json=2)  # modifying: one read, one write round trip
    ops = traffic.take()
    assert [(op.name, op.commands, op.round_trips) for op in ops] == [
        ("load", ["GET"], 1),
        ("save", ["EVALSHA"], 1),
    ]

    web.post("/login/alice")  # login: the id rotates
    ops = traffic.take()
    rotate = single(ops, "rotate")
    if cluster:  # old and new keys in two slots: claim the old, then create the new + index
        assert rotate.commands == ["EVALSHA", "EVALSHA", "EVALSHA"]
        assert rotate.round_trips == 2
    else:  # one script: check, create, delete, index
        assert (rotate.commands, rotate.round_trips) == (["EVALSHA"], 1)
    assert single(ops, "load").round_trips == 1
    for op in ops:  # whatever else login does (listing the user's sessions, logging it)
        assert op.round_trips <= 2, op

    web.post("/set/x", json=3)  # a logged-in session: record, TTL and index together
    ops = traffic.take()
    save = single(ops, "save")
    assert [op.name for op in ops] == ["load", "save"]
    assert save.round_trips == 1
    if cluster:  # the record script and the index script, sent to their two nodes at once
        assert save.commands == ["EVALSHA", "EVALSHA"]
    else:
        assert save.commands == ["EVALSHA"]

    for _ in range(3):  # read-only, touch not due: one command each
        clock.advance(seconds=10)
        assert web.get("/get/x").get_json() == {"value": 3}
        assert [(op.name, op.commands) for op in traffic.take()] == [("load", ["GET"])]

    clock.advance(seconds=31)  # read-only, touch due: the one write records activity
    assert web.get("/whoami").get_json() == {"user": "alice"}
    ops = traffic.take()
    assert [(op.name, op.round_trips) for op in ops] == [("load", 1), ("save", 1)]

    web.post("/logout")  # one read, one DEL
    ops = traffic.take()
    assert [(op.name, op.commands, op.round_trips) for op in ops if op.name != "add_events"] == [
        ("load", ["GET"], 1),
        ("delete", ["DEL"], 1),
    ]


def test_the_read_path_seen_by_the_server(
    make_app: AppFactory, controllable_redis: ControllableRedis
) -> None:
    """INFO commandstats: a read-only request runs exactly one command on the server."""
    admin = controllable_redis.client()
    prefix = f"{controllable_redis.prefix}{secrets.token_hex(4)}:"
    store = RedisStore(
        redis.Redis(host=controllable_redis.host, port=controllable_redis.port), prefix=prefix
    )
    try:
        app, _, _ = make_app(store)
        web = app.test_client()
        web.post("/set/x", json="here")
        web.post("/login/alice")
        for path in ("/get/x", "/whoami", "/nothing"):
            admin.config_resetstat()
            assert web.get(path).status_code == 200
            stats = admin.info("commandstats")
            calls = {
                name.removeprefix("cmdstat_"): value["calls"]
                for name, value in stats.items()
                if name not in ("cmdstat_info", "cmdstat_config|resetstat")
            }
            assert calls == {"get": 1}, (path, calls)
    finally:
        flush_prefix(admin, prefix)
        admin.close()
        store.close()
        store.client.close()
