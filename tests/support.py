"""Test helpers shared by the test modules (and benchmarks/redis_round_trips.py): a
settable clock, a counting store, a redis-py connection class that counts traffic, and
a wait for a store's rest after an outage."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from redis.connection import Connection
from sqlalchemy import text

from flask_cloakroom.stores.base import PURGE_BATCH_SIZE
from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.memory import MemoryStore
from flask_cloakroom.stores.sql import SQLStore

_A = TypeVar("_A")


def after_the_rest(ask: Callable[[], _A], resting: Callable[[_A], bool], within: float) -> _A:
    """The first answer of ``ask()`` that ``resting`` does not call the store-error
    answer, asking again for up to ``within`` seconds (the last answer if none).

    After a failed attempt to connect, a store makes no other for a while
    (:class:`~flask_cloakroom.stores.base.ConnectRest`): the first requests after an
    outage may still get the 503, and one after the rest is served.
    """
    deadline = time.monotonic() + within
    answer = ask()
    while resting(answer) and time.monotonic() < deadline:
        time.sleep(0.01)
        answer = ask()
    return answer


class FakeClock:
    """A clock for tests: starts at a fixed time and moves only when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **kwargs: float) -> None:
        self.now += timedelta(seconds=seconds, **kwargs)

    def timestamp(self) -> float:
        return self.now.timestamp()


#: Counts store operations (one call = one round trip for the built-in stores).
CountingStore = InstrumentedStore


class TrafficSink(Protocol):
    """What :func:`counting_connection` reports to.  ``quiet`` > 0 while a connection
    is being set up (HELLO, CLIENT SETINFO): that is not per-request traffic."""

    quiet: int

    def command(self, name: str) -> None: ...

    def send(self, port: int) -> None: ...

    def read(self) -> None: ...


def counting_connection(traffic: TrafficSink) -> type[Connection]:
    """A redis-py connection class that reports every command packed, every write to
    the network and every read to ``traffic`` (so a round trip is a write after a read:
    a Cluster pipeline that writes to two nodes before reading either is one)."""

    class CountingConnection(Connection):
        def on_connect_check_health(self, check_health: bool = True) -> None:
            traffic.quiet += 1
            try:
                super().on_connect_check_health(check_health=check_health)
            finally:
                traffic.quiet -= 1

        def on_connect(self) -> None:  # redis-py 5 sets connections up here
            traffic.quiet += 1
            try:
                base: Any = super()  # redis-py leaves it untyped
                base.on_connect()
            finally:
                traffic.quiet -= 1

        def send_command(self, *args: Any, **kwargs: Any) -> None:
            traffic.command(str(args[0]))
            base: Any = super()  # redis-py leaves these untyped
            base.send_command(*args, **kwargs)

        def pack_command(self, *args: Any) -> Any:  # the store's lane packs one by one
            traffic.command(str(args[0]))
            base: Any = super()
            return base.pack_command(*args)

        def pack_commands(self, commands: Any) -> Any:
            commands = list(commands)
            for command in commands:
                traffic.command(str(command[0]))
            base: Any = super()
            return base.pack_commands(commands)

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            traffic.send(self.port)
            base: Any = super()
            base.send_packed_command(command, check_health)

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            traffic.read()
            return super().read_response(*args, **kwargs)

    return CountingConnection


class SlowBatch(MemoryStore):
    """A memory store whose purge deletes nothing in one batch that takes 20 ms, and
    keeps how long the purge's progress callback (its rest) took, None without one."""

    def __init__(self) -> None:
        super().__init__()
        self.rests: list[float | None] = []

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        if progress is None:
            self.rests.append(None)
            return 0
        time.sleep(0.02)
        started = time.monotonic()
        progress(0)
        self.rests.append(time.monotonic() - started)
        return 0


def drop_tables(store: SQLStore) -> None:
    """Drop a test store's tables (its sessions and its activity log).

    Through the store's engine, whose connections give each statement the store
    timeout, but with up to 30 s for this one on PostgreSQL: a ``DROP TABLE`` waits
    for the table's lock behind autovacuum, which PostgreSQL cancels only after its
    ``deadlock_timeout`` (1 s), so on a busy server the drop could time out first."""
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL statement_timeout = '30s'"))
        for table in (store.table, store.events_table):
            table.drop(conn, checkfirst=True)
