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

After an attempt to connect fails (refused, or unanswered until the connect timeout),
the lane makes no other for a while (:class:`~flask_cloakroom.stores.base.ConnectRest`:
50 ms, doubling to 500 ms, never less than the failed attempt took), and its commands
fail at once with a ``ConnectionError`` saying so.  A Redis host that does not answer
would otherwise cost every request the whole connect timeout.  Connections already open
are used as before.

On a plain connection (redis-py's own TCP, TLS or Unix socket connection, over RESP2
or RESP3) the lane packs the commands and reads the replies itself, on the
connection's socket, with a reader of its own for each connection (hiredis's where
redis-py uses hiredis and hiredis is 3.2 or later, which tells a RESP3 push message
from a reply; else :mod:`~flask_cloakroom.stores.resp`).  The connection
still connects, authenticates, checks its health and follows its retry policy as for
redis-py's own commands, for 9 to 12 µs less CPU a command (docs/redis.md,
"Connections").  A socket error or timeout disconnects it and raises redis-py's
``ConnectionError`` or ``TimeoutError``; an error reply comes back as the exception
redis-py makes of it; anything but one reply per command (bytes that are not RESP, a
reply too many) raises ``InvalidResponse`` and disconnects it.  A RESP3 push message
(a server's maintenance notice) is not taken for a reply, and the connection is
dropped after it, so the next command connects afresh where redis-py's own reader
would have acted on the notice.  Other connections (a Sentinel's, which must see
``READONLY`` replies; any subclass) go through redis-py's own send and read.

On Linux, the lane's plain TCP and Unix sockets keep the connection's timeout in the
kernel (``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` on a blocking socket) rather than in
Python, which polls a socket with a timeout before every send and every receive: 2 to
3 µs less a round trip.  A send or receive that runs out of time still raises
redis-py's ``TimeoutError``; redis-py's own reads on such a connection (a health
check's ``PING``) would see the kernel's timeout as a dropped connection.

On those same blocking sockets a lane made with ``busy_poll`` > 0 waits for a reply by
asking the socket again and again (``recv`` with ``MSG_DONTWAIT``) for up to that many
seconds before it sleeps in a blocking ``recv``.  A nearby Redis answers within that
time, and the process never sleeps: it skips the cost of being put to sleep and woken
again, about 30 µs a round trip on the benchmark's virtual machine when the CPU goes
idle (docs/redis.md, "Busy polling").  A wait that runs out sleeps as before, and the
socket's next waits skip the polling: one wait after a first miss, then twice as many
after each further miss with no reply polled in between (up to 1,024), so a distant
Redis costs almost no CPU.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, NoReturn

from redis.connection import (
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE as HIREDIS_AVAILABLE

from . import resp
from .base import ConnectRest, PollBackoff

__all__ = ["Exchange", "Lane", "Resting", "lane_for"]

#: Connection classes whose socket the lane reads itself: redis-py's own, exactly.
_PLAIN: Final = frozenset({Connection, SSLConnection, UnixDomainSocketConnection})
#: Bytes asked of the socket at a time.
_RECV: Final = 65536
#: Whether a socket's timeout can be the kernel's (a ``struct timeval`` of two longs).
_KERNEL_TIMEOUTS: Final = sys.platform.startswith("linux")
#: The flag of a ``recv`` that never waits (0 where the platform has none: no polling).
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)


def _push_classes() -> tuple[type, ...]:
    """What the readers make of a RESP3 push message (hiredis's class, where installed)."""
    try:
        from hiredis import PushNotification
    except ImportError:
        return (resp.Push,)
    return (resp.Push, PushNotification)


_PUSHES: Final = _push_classes()
#: Whether hiredis tells a RESP3 push message from a reply (hiredis 3.2 and later).  An
#: earlier one gives a push as a plain list, which would be taken for the reply to a
#: command: the lane then reads with its own reader, where redis-py uses hiredis too.
_HIREDIS_KNOWS_PUSHES: Final = len(_PUSHES) > 1


class Resting(RedisConnectionError):
    """No connection is opened for now: the lane's last attempt to open one failed.

    A ``ConnectionError``, so that whatever handles a server that cannot be reached
    (the retry policy, a Cluster's fallback, the store's errors) handles it too."""


#: What makes a failed attempt to connect (start or lengthen the lane's rest).
_CONNECT_FAILURES: Final = (RedisConnectionError, RedisTimeoutError)


class Lane:
    """Commands on a stack of connections from ``pool``, replies never decoded."""

    __slots__ = (
        "_busy_poll",
        "_closes",
        "_direct",
        "_idle",
        "_pid",
        "_pool",
        "_reconnect",
        "_rest",
    )

    def __init__(self, pool: Any, *, busy_poll: float = 0.0) -> None:
        self._pool = pool
        #: Seconds to poll a blocking socket for a reply before sleeping (see the module).
        self._busy_poll = busy_poll if _DONTWAIT else 0.0
        self._idle: list[_Wire] = []
        #: How many times :meth:`close` ran: a wire taken before the last close is
        #: disconnected when it comes back, not kept.
        self._closes = 0
        self._pid = os.getpid()
        #: Whether commands go straight to the socket (see the module).
        self._direct = pool.connection_class in _PLAIN
        # redis-py 8 asks for a reconnect after a server's maintenance notice (RESP3);
        # on the socket, the lane reconnects after any such notice by itself.
        self._reconnect = not self._direct and hasattr(pool.connection_class, "should_reconnect")
        #: When the lane may next open a connection, after failed attempts.
        self._rest = ConnectRest(_server_of(pool), Resting)

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
        wire = self._take()
        in_step = False
        failed: list[BaseException] = []

        def fail(error: BaseException) -> None:
            if not isinstance(error, Resting):
                failed.append(error)
            wire.disconnect()

        try:
            if wire.pack is not None:
                packed = wire.pack(commands)
                trip = wire.round_trip
            else:
                packed = _redis_py_pack(wire.connection, commands)
                trip = wire.redis_py_round_trip
            try:
                replies: list[Any] = wire.connection.retry.call_with_retry(
                    lambda: trip(packed, len(commands)), fail
                )
            except Resting:
                if not failed:
                    raise
                # The retry found the lane resting after the failure it retried (a
                # refused connection): that failure is the answer, not the rest.
                error = failed[-1]
                raise error from error.__cause__
            in_step = True
            return replies
        finally:
            self._give_back(wire, in_step)

    def start(self, commands: Sequence[Sequence[Any]]) -> Exchange:
        """Send ``commands`` and return without waiting; :meth:`Exchange.finish` reads
        their replies.  For several servers in one round trip of wall time: start on
        each, then finish each.  No retry here: the caller sends again what failed.
        ``finish()`` must be called whatever happens, so the connection goes back."""
        wire = self._take()
        exchange = Exchange(self, wire, len(commands))
        try:
            if wire.pack is not None:
                wire.send(wire.pack(commands))
            else:
                wire.redis_py_send(_redis_py_pack(wire.connection, commands))
        except Exception as error:  # reported by finish(), with the other servers' replies
            exchange.error = error
        except BaseException:
            self._give_back(wire, in_step=False)
            raise
        return exchange

    def _take(self) -> _Wire:
        if self._pid != os.getpid():
            self._idle = []  # the parent's connections: not ours to use or close
            self._pid = os.getpid()
        try:
            return self._idle.pop()  # atomic: no lock needed between threads
        except IndexError:
            wire = _Wire(self._pool.make_connection(), self._direct, self._busy_poll, self._rest)
            wire.closes = self._closes
            return wire

    def _give_back(self, wire: _Wire, in_step: bool) -> None:
        if wire.closes != self._closes:
            # In use when the lane was closed (a Cluster node's client dropped by
            # redis-py while a command was on its way): closing now is the last chance.
            wire.disconnect()
            return
        if not in_step or (self._reconnect and wire.connection.should_reconnect()):
            wire.disconnect()
        self._idle.append(wire)

    def close(self) -> None:
        """Disconnect the lane's connections (a later command connects again).  A
        connection in use meanwhile is disconnected when its command is done."""
        self._closes += 1
        idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for wire in idle:
                wire.disconnect()

    def __len__(self) -> int:
        """Connections waiting on the stack."""
        return len(self._idle)


class Exchange:
    """Commands sent by :meth:`Lane.start`, whose replies :meth:`finish` reads."""

    __slots__ = ("_count", "_lane", "_wire", "error")

    def __init__(self, lane: Lane, wire: _Wire, count: int) -> None:
        self._lane = lane
        self._wire = wire
        self._count = count
        #: What went wrong while sending, raised by :meth:`finish`.
        self.error: Exception | None = None

    def finish(self) -> list[Any]:
        """The replies, as :meth:`Lane.execute_many` returns them; raises what the
        send or the read raised (the connection is then disconnected)."""
        in_step = False
        wire = self._wire
        try:
            if self.error is not None:
                raise self.error
            if wire.pack is not None:
                replies = wire.read(self._count)
            else:
                replies = wire.redis_py_read(self._count)
            in_step = True
            return replies
        finally:
            self._lane._give_back(wire, in_step)


class _Wire:
    """A connection of the lane's, with the lane's own packer of its commands and
    reader of its replies when the lane talks to its socket directly (both ``None``
    otherwise)."""

    __slots__ = (
        "busy_poll",
        "closes",
        "connection",
        "next_check",
        "pack",
        "pollable",
        "polling",
        "reader",
        "rest",
        "tuned",
    )

    def __init__(self, connection: Any, direct: bool, busy_poll: float, rest: ConnectRest) -> None:
        self.connection = connection
        #: The lane's rest between attempts to connect (shared by its wires).
        self.rest = rest
        #: The lane's count of closes when this wire was made (see :meth:`Lane.close`).
        self.closes = 0
        self.pack = _packer(connection) if direct else None
        self.reader: Any = _new_reader(connection) if direct else None
        #: The socket whose timeout was last looked at (see :func:`_kernel_timeout`).
        #: Held, even once closed, so that no new socket can take its identity.
        self.tuned: Any = None
        #: Seconds to poll for a reply before sleeping; whether ``tuned`` may be polled
        #: (a blocking plain socket); when to.
        self.busy_poll = busy_poll
        self.pollable = False
        self.polling = PollBackoff()
        #: When the connection's health check is next due, by ``time.monotonic``
        #: (0: before the first command, as redis-py checks a new connection).
        self.next_check = 0.0

    def disconnect(self) -> None:
        self.connection.disconnect()
        self.next_check = 0.0
        if self.reader is not None:
            self.reader = _new_reader(self.connection)  # nothing half-read carries over

    # -- straight to the socket ------------------------------------------------------

    def round_trip(self, packed: bytes, count: int) -> list[Any]:
        self.send(packed)
        return self.read(count)

    def send(self, packed: bytes) -> None:
        """Send ``packed``, connecting (and checking the connection's health, a
        ``PING`` when due) first, as redis-py's own send does."""
        connection = self.connection
        sock = connection._sock
        if sock is None:
            self.rest.attempt(connection.connect, _CONNECT_FAILURES)
            sock = connection._sock
        if sock is not self.tuned:  # a new socket: once per connection
            _kernel_timeout(sock, connection.socket_timeout)
            self.tuned = sock
            # Only a blocking socket can be polled: one with Python's timeout would wait
            # for that timeout first, and a TLS socket takes no flags.
            self.pollable = (
                self.busy_poll > 0
                and sock.gettimeout() is None
                and not isinstance(sock, ssl.SSLSocket)
            )
        if connection.health_check_interval and time.monotonic() > self.next_check:
            # Due by the lane's clock.  redis-py compares its own deadline with its own
            # clock (time.time before redis-py 6, time.monotonic since), which the
            # lane's reads do not move: make its check run now, whatever that clock.
            connection.next_health_check = 0
            connection.check_health()
        try:
            connection._sock.sendall(packed)
        except BaseException as error:
            self.disconnect()
            _raise_translated(error, "writing to", connection)

    def read(self, count: int) -> list[Any]:
        """The replies to ``count`` commands, an error reply as redis-py's exception
        for it, in its place."""
        connection = self.connection
        reader = self.reader
        replies: list[Any] = []
        # Whether to drop the connection once the replies are in: a server's notice
        # came with them, or bytes of something more are still arriving.
        drop = False
        try:
            sock = connection._sock
            if sock is None:
                raise RedisConnectionError("the connection was closed before its reply came")
            while len(replies) < count:
                reply = reader.gets()
                if reply is resp.NOT_YET:
                    data = None
                    if self.pollable:
                        data = self._poll(sock)
                    if data is None:
                        data = sock.recv(_RECV)
                    if not data:
                        raise RedisConnectionError("Redis closed the connection")
                    reader.feed(data)
                elif isinstance(reply, _PUSHES):
                    drop = True  # out of band (RESP3): not a reply to these commands
                else:
                    replies.append(reply)
            while reader.has_data():  # bytes after the last reply: only a notice may be
                extra = reader.gets()
                if extra is not resp.NOT_YET and not isinstance(extra, _PUSHES):
                    raise InvalidResponse(f"more replies than the {count} commands sent")
                drop = True
                if extra is resp.NOT_YET:  # still coming: the connection goes
                    break
        except BaseException as error:
            self.disconnect()  # whatever was left unread must never be read as a reply
            _raise_translated(error, "reading from", connection)
        if drop:
            # A server's notice (a maintenance, a move), which the lane does not act on
            # as redis-py's own reader would, or the start of one: the next command
            # connects afresh.
            self.disconnect()
        elif connection.health_check_interval:
            self.next_check = time.monotonic() + connection.health_check_interval
        return replies

    def _poll(self, sock: socket.socket) -> bytes | None:
        """What ``sock`` has, asked for until it comes or ``busy_poll`` runs out
        (``None``: sleep in ``recv`` instead)."""
        polling = self.polling
        if not polling.due():
            return None
        deadline = time.perf_counter() + self.busy_poll
        while True:
            try:
                data = sock.recv(_RECV, _DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() < deadline:
                    continue
                polling.miss()
                return None
            polling.hit()
            return data

    # -- through redis-py ------------------------------------------------------------

    def redis_py_round_trip(self, packed: Any, count: int) -> list[Any]:
        self.redis_py_send(packed)
        return self.redis_py_read(count)

    def redis_py_send(self, packed: Any) -> None:
        # Connected here, not left to the send: on Sentinel only connect() asks the
        # sentinels for the master.
        connection = self.connection
        if connection._sock is None:
            self.rest.attempt(connection.connect, _CONNECT_FAILURES)
        connection.send_packed_command(packed)

    def redis_py_read(self, count: int) -> list[Any]:
        replies = []
        for _ in range(count):
            try:
                replies.append(self.connection.read_response(disable_decoding=True))
            except ResponseError as error:  # read in full: the next reply is next
                replies.append(error)
        return replies


def _kernel_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Move ``sock``'s timeout into the kernel, where it costs no system call.

    Python keeps a socket's timeout by putting the socket in non-blocking mode and
    polling it before each send and receive.  With the same timeout set as
    ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` on a blocking socket, a send or receive waits
    at most as long, then fails with ``EAGAIN`` (a ``BlockingIOError``, which
    :func:`_raise_translated` raises as a timeout).  Only on Linux, for plain TCP and
    Unix sockets (not TLS: an ``SSLSocket`` needs Python's timeout), and only for a
    timeout the kernel can hold (at least a millisecond: zero would mean "never").
    """
    if (
        not _KERNEL_TIMEOUTS
        or timeout is None
        or timeout < 0.001
        or isinstance(sock, ssl.SSLSocket)
        or sock.gettimeout() != timeout
    ):
        return
    seconds, micros = divmod(round(timeout * 1_000_000), 1_000_000)
    limit = struct.pack("@ll", seconds, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    sock.settimeout(None)


def _new_reader(connection: Any) -> Any:
    def error(message: str) -> Exception:
        # The exception redis-py raises for an error reply, by the parser the
        # connection has when the reply comes: redis-py's Cluster client before 6
        # gives a node's connection the parser that knows MOVED and ASK only when it
        # connects, after the lane made its reader.
        made: Exception = connection._parser.parse_error(message)
        return made

    if HIREDIS_AVAILABLE and _HIREDIS_KNOWS_PUSHES:
        import hiredis

        return hiredis.Reader(
            protocolError=InvalidResponse, replyError=error, notEnoughData=resp.NOT_YET
        )
    return resp.Reader(error)


def _packer(connection: Any) -> Callable[[Sequence[Sequence[Any]]], bytes]:
    """How the lane packs commands for ``connection``: byte for byte as the
    connection's own packer does, so that a key is the same key on either path
    (redis-py's hiredis packer writes strings as UTF-8 whatever the client's
    encoding; its Python packer, in the client's encoding)."""
    if type(getattr(connection, "_command_packer", None)).__name__ == "HiredisRespSerializer":
        import hiredis  # there: redis-py packs with it

        return partial(_hiredis_pack, hiredis.pack_command)
    encoder = connection.encoder
    return partial(resp.pack, encoding=encoder.encoding, errors=encoder.encoding_errors)


def _hiredis_pack(
    pack_command: Callable[[tuple[Any, ...]], bytes], commands: Sequence[Sequence[Any]]
) -> bytes:
    try:
        if len(commands) == 1:
            return pack_command(tuple(commands[0]))
        return b"".join([pack_command(tuple(command)) for command in commands])
    except TypeError as error:
        raise DataError(str(error)) from error


def _redis_py_pack(connection: Any, commands: Sequence[Sequence[Any]]) -> Any:
    if len(commands) == 1:
        return connection.pack_command(*commands[0])
    return connection.pack_commands(commands)


def _raise_translated(error: BaseException, doing: str, connection: Any) -> NoReturn:
    """Raise what redis-py raises for a socket's ``error``: its ``TimeoutError`` or
    ``ConnectionError`` (those its retry policy retries); anything else as it is."""
    if isinstance(error, socket.timeout | BlockingIOError):  # Python's or the kernel's
        raise RedisTimeoutError(f"Timeout {doing} {_where(connection)}") from error
    if isinstance(error, OSError):
        raise RedisConnectionError(f"Error {doing} {_where(connection)}: {error}") from error
    if isinstance(error, ValueError):  # bytes that are not RESP
        raise InvalidResponse(f"Not a Redis reply from {_where(connection)}: {error}") from error
    raise error


def _server_of(pool: Any) -> str:
    """The server a pool connects to, for messages ("Redis at host:port")."""
    kwargs = getattr(pool, "connection_kwargs", {})
    if kwargs.get("path"):
        return f"Redis at {kwargs['path']}"
    if "host" in kwargs:
        return f"Redis at {kwargs['host']}:{kwargs.get('port', 6379)}"
    return "Redis"  # a Sentinel's pool: the master is found on connecting


def _where(connection: Any) -> str:
    path = getattr(connection, "path", None)
    if path:
        return str(path)
    return f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"


def lane_for(client: Any, *, busy_poll: float = 0.0) -> Lane | None:
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
    return Lane(pool, busy_poll=busy_poll)
