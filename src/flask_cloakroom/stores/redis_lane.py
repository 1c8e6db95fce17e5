"""Redis commands with little Python around them: the Redis store's hot path.

A session request sends the store one command: a ``GET``, or a write script.  redis-py's
``Redis.execute_command`` wraps every command in connection-pool bookkeeping, metrics
hooks, event dispatch and retry closures.  With redis-py 8 that is 60 to 80 µs of
Python a command on the benchmark machine, about as long as a quiet loopback round trip
(``benchmarks/redis_round_trips.py`` prints both).
A :class:`Lane` does the part of that work a single command needs, with the client's
own connection objects:

* Its connections are made by the client's pool (``make_connection``).  So they have
  the client's address, credentials, TLS, protocol, timeouts, health checks and retry
  policy, count against the pool's ``max_connections``, and on Sentinel they find the
  master the way the client's own connections do.
* A command, or a few in one round trip, is packed, sent and its replies read under
  the connection's retry policy.  The connection is disconnected before a retry, as
  redis-py does.
* :meth:`Lane.start` and :meth:`Exchange.finish` split a round trip in two, so that
  commands for several servers (a Cluster's nodes) are all sent before any reply is
  read.
* A connection goes back on the lane's stack only in step: after its reply was read
  in full (a value or an error reply), or disconnected.  No later command can read a
  reply meant for an earlier one.
* The stack belongs to one process.  A forked child starts with none and never uses
  the parent's sockets.

A lane holds as many connections as the process ever had commands in flight on it
at once: one per thread that uses the store at the same moment.  :meth:`Lane.close`
disconnects them; the client's own ``close()`` does not know about them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from redis.connection import BlockingConnectionPool
from redis.exceptions import ResponseError

__all__ = ["Exchange", "Lane", "lane_for"]


class Lane:
    """Commands on a stack of connections from ``pool``, replies never decoded."""

    __slots__ = ("_idle", "_pid", "_pool", "_reconnect")

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._pid = os.getpid()
        # redis-py 8 asks for a reconnect after a server's maintenance notice.
        self._reconnect = hasattr(pool.connection_class, "should_reconnect")

    def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (bytes as they came).

        Raises what redis-py raises: a ``ResponseError`` for an error reply, a
        ``ConnectionError`` or ``TimeoutError`` when the retry policy gives up.
        """
        (reply,) = self.execute_many((args,))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one round trip (a pipeline, no ``MULTI``) and return
        their replies in order, an error reply as its ``ResponseError`` in its place.

        After a dropped connection the retry policy may send them all again, as
        redis-py's own pipelines do.
        """
        connection = self._take()
        in_step = False
        try:
            packed = self._pack(connection, commands)
            replies: list[Any] = connection.retry.call_with_retry(
                lambda: self._round_trip(connection, packed, len(commands)),
                lambda _error: connection.disconnect(),
            )
            in_step = True
            return replies
        finally:
            self._give_back(connection, in_step)

    def start(self, commands: Sequence[Sequence[Any]]) -> Exchange:
        """Send ``commands`` and return without waiting; :meth:`Exchange.finish` reads
        their replies.  For several servers in one round trip of wall time: start on
        each, then finish each.  No retry here: the caller sends again what failed.
        ``finish()`` must be called whatever happens, so the connection goes back."""
        connection = self._take()
        exchange = Exchange(self, connection, len(commands))
        try:
            connection.connect()
            connection.send_packed_command(self._pack(connection, commands))
        except Exception as error:  # reported by finish(), with the other servers' replies
            exchange.error = error
        except BaseException:
            self._give_back(connection, in_step=False)
            raise
        return exchange

    def _take(self) -> Any:
        if self._pid != os.getpid():
            self._idle = []  # the parent's connections: not ours to use or close
            self._pid = os.getpid()
        try:
            return self._idle.pop()  # atomic: no lock needed between threads
        except IndexError:
            return self._pool.make_connection()

    def _give_back(self, connection: Any, in_step: bool) -> None:
        if not in_step or (self._reconnect and connection.should_reconnect()):
            connection.disconnect()
        self._idle.append(connection)

    @staticmethod
    def _pack(connection: Any, commands: Sequence[Sequence[Any]]) -> Any:
        if len(commands) == 1:
            return connection.pack_command(*commands[0])
        return connection.pack_commands(commands)

    @classmethod
    def _round_trip(cls, connection: Any, packed: Any, count: int) -> list[Any]:
        # connect() returns at once when connected.  Called here, not left to the
        # send: on Sentinel only connect() asks the sentinels for the master.
        connection.connect()
        connection.send_packed_command(packed)
        return cls._read(connection, count)

    @staticmethod
    def _read(connection: Any, count: int) -> list[Any]:
        replies = []
        for _ in range(count):
            try:
                replies.append(connection.read_response(disable_decoding=True))
            except ResponseError as error:  # read in full: the next reply is next
                replies.append(error)
        return replies

    def close(self) -> None:
        """Disconnect the lane's connections (a later command connects again)."""
        idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for connection in idle:
                connection.disconnect()

    def __len__(self) -> int:
        """Connections waiting on the stack."""
        return len(self._idle)


class Exchange:
    """Commands sent by :meth:`Lane.start`, whose replies :meth:`finish` reads."""

    __slots__ = ("_connection", "_count", "_lane", "error")

    def __init__(self, lane: Lane, connection: Any, count: int) -> None:
        self._lane = lane
        self._connection = connection
        self._count = count
        #: What went wrong while sending, raised by :meth:`finish`.
        self.error: Exception | None = None

    def finish(self) -> list[Any]:
        """The replies, as :meth:`Lane.execute_many` returns them; raises what the
        send or the read raised (the connection is then disconnected)."""
        in_step = False
        try:
            if self.error is not None:
                raise self.error
            replies = Lane._read(self._connection, self._count)
            in_step = True
            return replies
        finally:
            self._lane._give_back(self._connection, in_step)


def lane_for(client: Any) -> Lane | None:
    """A lane for a ``redis.Redis`` client, or ``None`` where one must not be used.

    Not for a client pinned to one connection (``single_connection_client``), nor
    for one using redis-py's own client-side cache, whose connections must see
    every command, nor for a ``BlockingConnectionPool``, whose cap on connections
    counts only those it hands out itself.
    """
    if getattr(client, "connection", None) is not None:
        return None
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(pool, "cache", None) is not None:
        return None
    if isinstance(pool, BlockingConnectionPool):
        return None
    return Lane(pool)
