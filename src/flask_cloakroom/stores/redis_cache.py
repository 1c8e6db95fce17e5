"""Server-assisted client-side caching of session records, for the Redis store (opt-in).

A read-only request costs one Redis ``GET``.  With ``CLOAKROOM_REDIS_CLIENT_CACHE``
set, each worker process keeps the records it read, and Redis tells it when one
changes: the process holds one extra connection on which it has turned on
``CLIENT TRACKING ... BCAST PREFIX {prefix}s:``, so Redis sends it the name of every
record key that is written, deleted, expired or evicted (a revocation's ``DEL``, a
write by another worker, ``FLUSHALL``), as it happens.

The rules that keep it correct:

* **Nothing is served before what has arrived is read.**  Before a cached record is
  served, every invalidation already waiting on the tracking connection is read and
  applied (a non-blocking read: one system call when there is none).  So a record is
  never served from the cache after its invalidation has reached the process; the
  staleness window is the time the message takes from Redis to the process.
* **A read racing a write cannot cache the old value.**  A miss puts a placeholder
  in the cache before it sends its ``GET``; an invalidation removes it; the value
  is kept only if the placeholder is still there when the reply is back.
* **No word from Redis, no trust.**  The connection is pinged while the cache is in
  use.  Redis answers in order, so the answer to a ping means every invalidation
  sent before it has arrived; when no ping sent in the last ``LIVENESS`` seconds
  has been answered (a server or network gone silent), reads go to Redis.
  A broken tracking connection empties the cache; reads go to Redis until a new
  one is set up (tried again at most once a second).
* A process's own writes drop the record from its cache at once, and a forked
  process starts with an empty cache and a connection of its own.

It works with a standalone Redis 6.0 or later over RESP2 or RESP3; not with a
Cluster or Sentinel (the tracking connection would have to follow failovers and
slot moves).  The tracking connection speaks the protocol itself
(:mod:`~flask_cloakroom.stores.resp`), so that no message can be taken out of its
stream by a client library's own handling of push messages.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from . import resp

__all__ = ["RecordCache"]

logger = logging.getLogger("flask_cloakroom")

#: Seconds without a word from Redis after which the cache is not trusted.
LIVENESS: Final = 0.5
#: Seconds between pings while the cache is in use.
PING_EVERY: Final = 0.1
#: Seconds to wait before setting up a broken tracking connection again.
RETRY_EVERY: Final = 1.0
#: Pings left unanswered before no more are sent (a silent server: nothing piles up).
_MAX_UNANSWERED: Final = 10
_CHANNEL: Final = b"__redis__:invalidate"


class RecordCache:
    """Records read from Redis, kept until Redis says they changed (see the module)."""

    def __init__(self, client: Any, *, prefix: str, size: int, timeout: float) -> None:
        self._client = client
        self._prefix = prefix
        self._size = size
        self._timeout = timeout
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._tracker: _Tracker | None = None
        self._retry_at = 0.0
        self._failing = False
        #: Counters, for tests and benchmarks.
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_after_fork(reference))

    def get(self, name: str, fetch: Callable[[], bytes | None]) -> bytes | None:
        """The value of record key ``name``: from the cache if it is fresh, else ``fetch()``."""
        token: object | None = None
        with self._lock:
            if self._sync():
                value = self._entries.get(name)
                if type(value) is bytes:
                    self._entries.move_to_end(name)
                    self.hits += 1
                    return value
                if value is None:  # (a placeholder is another reader's: leave it)
                    token = object()
                    self._entries[name] = token
                    if len(self._entries) > self._size:
                        self._entries.popitem(last=False)
            self.misses += 1
        fetched = fetch()
        if token is not None:
            with self._lock:
                if self._entries.get(name) is token:
                    if fetched is None:
                        del self._entries[name]
                    else:
                        self._entries[name] = fetched
        return fetched

    def forget(self, names: Iterable[str]) -> None:
        """Drop records this process has just written (Redis will say so too, a bit later)."""
        with self._lock:
            for name in names:
                self._entries.pop(name, None)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None

    def heard(self) -> bool:
        """Whether the tracking connection is up and Redis answered it recently."""
        with self._lock:
            return self._sync()

    def __len__(self) -> int:
        """Records held (placeholders of reads in flight are not counted)."""
        with self._lock:
            return sum(1 for value in self._entries.values() if type(value) is bytes)

    # -- the tracking connection ----------------------------------------------------

    def _sync(self) -> bool:
        """Apply every invalidation that has arrived; return whether the cache is trusted.

        Called with the lock held.
        """
        now = time.monotonic()
        tracker = self._tracker
        if tracker is not None and tracker.pid != os.getpid():
            # Forked by a server that bypasses Python's fork hooks: not ours.
            tracker.abandon()
            tracker = self._tracker = None
            self._entries.clear()
        if tracker is None:
            if now < self._retry_at:
                return False
            self._entries.clear()
            try:
                tracker = self._tracker = _Tracker.open(self._client, self._prefix, self._timeout)
            except (RedisError, OSError, ValueError) as error:
                self._retry_at = now + RETRY_EVERY
                if not self._failing:
                    logger.warning("Redis client-side cache off for now: %s", error)
                    self._failing = True
                return False
            if self._failing:
                logger.warning("Redis client-side cache on again")
                self._failing = False
        try:
            for keys in tracker.invalidations(now):
                if keys is None:
                    self._entries.clear()
                else:
                    for key in keys:
                        if self._entries.pop(key, None) is not None:
                            self.invalidations += 1
        except (RedisError, OSError, ValueError) as error:
            logger.warning("Redis client-side cache: the tracking connection broke: %s", error)
            tracker.close()
            self._tracker = None
            self._entries.clear()
            self._retry_at = now + RETRY_EVERY
            return False
        return tracker.heard_within(now, LIVENESS)


def _forget_after_fork(reference: weakref.ref[RecordCache]) -> None:
    """In a forked child: the parent's tracking connection is not ours to use."""
    cache = reference()
    if cache is None:
        return
    cache._lock = threading.Lock()
    cache._entries.clear()
    if cache._tracker is not None:
        cache._tracker.abandon()
        cache._tracker = None
    cache._retry_at = 0.0


class _Tracker:
    """The connection Redis sends invalidations to, read without blocking."""

    def __init__(self, connection: Any, sock: socket.socket, resp3: bool) -> None:
        self._connection = connection
        self._sock = sock
        self._resp3 = resp3
        self._buffer = bytearray()
        #: When the last ping Redis has answered was sent: everything Redis sent
        #: before it has been read, so the cache is as fresh as that moment.
        self._heard = 0.0
        self._pinged = 0.0
        self._pings: deque[float] = deque()  # when each unanswered ping was sent
        self._timeout = sock.gettimeout()
        self.pid = os.getpid()

    @classmethod
    def open(cls, client: Any, prefix: str, timeout: float) -> _Tracker:
        """Connect like the client's pool does, and turn tracking on for record keys."""
        connection = client.connection_pool.make_connection()
        connection.connect()  # handshake: protocol, AUTH, SELECT, client name
        sock = connection._sock
        if sock is None:  # pragma: no cover - connect() either sets it or raises
            raise RedisConnectionError("the tracking connection did not open")
        sock.settimeout(timeout)
        tracker = cls(connection, sock, str(getattr(connection, "protocol", 2)) == "3")
        try:
            tracker._setup(f"{prefix}s:")
        except BaseException:
            tracker.close()
            raise
        return tracker

    def _setup(self, prefix: str) -> None:
        started = time.monotonic()
        if self._resp3:
            self._send("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", prefix)
            self._expect(b"OK")
        else:
            self._send("CLIENT", "ID")
            client_id = self._reply()
            self._send("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", prefix)
            self._expect(b"OK")
            self._send("SUBSCRIBE", _CHANNEL)
            reply = self._reply()
            if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                raise ResponseError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        self._sock.setblocking(False)
        self._heard = started

    def invalidations(self, now: float) -> Iterator[list[str] | None]:
        """The invalidations that have arrived (``None``: everything), and a ping when due.

        A message read now may have been sent long ago (by a server that has
        since gone silent), so only the answer to a ping tells how fresh the
        stream is: as fresh as the moment that ping was sent.
        """
        self._receive()
        for message in self._messages():
            if message == b"PONG" or (isinstance(message, list) and message[:1] == [b"pong"]):
                if self._pings:
                    self._heard = self._pings.popleft()
                continue
            keys = self._invalidated(message)
            if keys is not _NOT_AN_INVALIDATION:
                yield keys
        if now - self._pinged >= PING_EVERY and len(self._pings) < _MAX_UNANSWERED:
            self._pinged = now
            self._sock.settimeout(self._timeout)
            try:
                self._send("PING")
            finally:
                self._sock.setblocking(False)
            self._pings.append(now)

    def heard_within(self, now: float, seconds: float) -> bool:
        return now - self._heard <= seconds

    def close(self) -> None:
        try:
            self._connection.disconnect()
        except Exception as error:  # it is going away either way
            logger.debug("closing the tracking connection: %s", error)

    def abandon(self) -> None:
        """Let go of a connection inherited through fork, without shutting it down
        (the parent still uses it): only this process's descriptor is closed."""
        with suppress(OSError):
            self._sock.close()

    # -- the wire --------------------------------------------------------------------

    def _send(self, *args: Any) -> None:
        self._sock.sendall(b"".join(self._connection.pack_command(*args)))

    def _reply(self) -> Any:
        """Block (up to the socket timeout) for the next message; used during setup."""
        while True:
            for message in self._messages():
                return message
            data = self._sock.recv(65536)
            if not data:
                raise RedisConnectionError("Redis closed the tracking connection")
            self._buffer += data

    def _expect(self, wanted: bytes) -> None:
        reply = self._reply()
        if reply != wanted:
            raise ResponseError(f"unexpected reply from Redis: {reply!r}")

    def _receive(self) -> None:
        """Read whatever has arrived, without waiting.

        Until the socket would block: a short read does not mean there is no more
        (over TLS each read returns one record, and more may be waiting).
        """
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            if not data:
                raise RedisConnectionError("Redis closed the tracking connection")
            self._buffer += data

    def _messages(self) -> Iterator[Any]:
        """Complete messages in the buffer, consumed as they are yielded."""
        while self._buffer:
            try:
                message, end = resp.parse(self._buffer, 0)
            except resp.Incomplete:
                return
            del self._buffer[:end]
            if isinstance(message, ResponseError):
                raise message
            yield message

    @staticmethod
    def _invalidated(message: Any) -> Any:
        """The keys an invalidation names (``None`` for all), or _NOT_AN_INVALIDATION."""
        if isinstance(message, resp.Push):
            items = message.items
            if items[:1] == [b"invalidate"] and len(items) == 2:
                return _names(items[1])
            return _NOT_AN_INVALIDATION
        if (
            isinstance(message, list)
            and len(message) == 3
            and message[:2]
            == [
                b"message",
                _CHANNEL,
            ]
        ):
            return _names(message[2])
        return _NOT_AN_INVALIDATION  # a PONG, a subscription confirmation


_NOT_AN_INVALIDATION: Final = object()


def _names(keys: Any) -> list[str] | None:
    if keys is None:
        return None
    if not isinstance(keys, list):
        raise ValueError(f"an invalidation message with {keys!r} for keys")
    return [key.decode("utf-8", "surrogateescape") for key in keys]
