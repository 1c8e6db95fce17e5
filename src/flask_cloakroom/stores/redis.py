"""A store in Redis: standalone, Sentinel or Cluster, through redis-py.

Key layout (``prefix`` is ``CLOAKROOM_REDIS_PREFIX``, ``cloakroom:`` by default)::

    {prefix}s:{<name>}     one string per session, with a TTL; <name> is the record key
                           (a hash of the session id: 32 hex digits) as 22 characters of
                           base64url, in braces: its own Cluster slot
    {prefix}l:{<name>}     a record's short-lived write lock (only while a busy session's
                           conflicting writes are merged: see update_locked)
    {prefix}i:{<bucket>}   the user index: 16,384 shared sorted sets ("buckets", 4 hex
                           digits), picked by a SHA-256 of the user id.  Member = 6 more
                           bytes of that hash + the 16 bytes of the record key, score =
                           the record's expiry; never the user id itself
    {prefix}e:{<YYYYMMDD>} the activity log: one sorted set per UTC day, and
    {prefix}e:days         the list of days that have events

A record's value is ``<version>:<expires>:<user length or ->:<user><payload>``
(``<expires>``: milliseconds since the epoch in hexadecimal, 11 digits until
the year 2527), so a load is one ``GET`` parsed in Python.  Writes are Lua scripts (``EVALSHA``,
falling back to ``EVAL`` after a ``NOSCRIPT``) that compare the version and
write the record with ``PX`` = the session's remaining life, so Redis expires
records by itself.  On a single node the same script updates the user's index;
on a Cluster the index update goes in the same pipeline (one round trip, at
most two nodes).  Every script declares every key it touches.

The user index is a hint: :meth:`RedisStore.user_records` reads the user's
entries from their bucket (a lexicographic range: the members start with the
user's hash), loads what they name, keeps only live records of that user, and
removes the entries it finds stale; each write prunes its bucket's expired
entries, and a bucket expires with its longest-lived session.  Buckets rather
than one sorted set per user keep the index at about 35 bytes a session: a
small sorted set is a compact listpack, but each key costs about 150 bytes of
its own, which a user with one session would pay alone.  See docs/redis.md for
round trips, failure behaviour, Sentinel/``WAIT`` guarantees and memory use.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import random
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ..errors import ConfigError, StoreError, StoreResting, StoreUnavailable
from ..tokens import is_store_key
from .base import (
    BUSY_POLL_US,
    PURGE_BATCH_SIZE,
    EventRecord,
    Record,
    Store,
    Translated,
    busy_poll_seconds,
)
from .redis_cache import RecordCache
from .redis_lane import Lane, Resting, lane_for
from .turns import Turns

__all__ = ["RedisStore", "open_redis_store"]

logger = logging.getLogger("flask_cloakroom")

_KEY: Final = "CLOAKROOM_STORE"
_CACHE_KEY: Final = "CLOAKROOM_REDIS_CLIENT_CACHE"
#: How many keys one MGET / DEL / pipeline carries.
_CHUNK: Final = 500
#: How many SCAN calls one :meth:`RedisStore.scan` page may make to fill itself.
_SCAN_CALLS_PER_PAGE: Final = 10
#: Health check of idle pooled connections (seconds): a PING before reuse.
_HEALTH_CHECK_INTERVAL: Final = 30
#: Domain separation of the user index hash.
_USER_HASH_TAG: Final = b"flask-cloakroom/redis-user/v1:"
#: How many sorted sets ("buckets") hold the user index.  Each stays a compact
#: listpack while it holds at most ``zset-max-listpack-entries`` (128 by default)
#: entries: up to about 1.5 million sessions per prefix (docs/redis.md).
INDEX_BUCKETS: Final = 16384
#: Bytes of the user hash that start each index member (after the bucket's own bits).
_USER_TAG_BYTES: Final = 6
#: Replies that mean "the store cannot serve this now" rather than "this is wrong".
_UNAVAILABLE_REPLIES: Final = (
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
    "BUSY",
    "OOM",
    "NOAUTH",
    "WRONGPASS",
)
_NEVER_DECODE: Final = {"NEVER_DECODE": True}
_NO_CACHE: Final = nullcontext()
# redis-py leaves these untyped.
_Sentinel: Any = Sentinel
_ClusterNode: Any = ClusterNode
_HEADER: Final = re.compile(rb"^(\d+):([0-9a-f]+):")
#: Replies of a Cluster node that the Cluster client knows how to deal with: a
#: redirection, "try again", or a slot without a master (it re-reads the topology).
_ELSEWHERE: Final = (MovedError, AskError, TryAgainError, ClusterDownError)


# -- Lua ------------------------------------------------------------------------

# The index update, shared by the scripts: the score only goes up (so a slow
# writer can never lower it below a live record's expiry), expired entries are
# pruned whenever an entry is added (only then can the index grow: an update of a
# listed session is spared the prune), and the index key lives as long as its
# longest-lived session.
_INDEX_FUNCTION = """
local function update_index(index, member, score, now, ttl, old_member)
  if old_member ~= '' and old_member ~= member then
    redis.call('ZREM', index, old_member)
  end
  local current = redis.call('ZSCORE', index, member)
  if not current then
    redis.call('ZADD', index, score, member)
    redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  elseif tonumber(current) < tonumber(score) then
    redis.call('ZADD', index, score, member)
  end
  local left = redis.call('PTTL', index)
  if left ~= -2 and left < ttl then
    redis.call('PEXPIRE', index, ttl)
  end
end
"""

# KEYS: record [, index].  ARGV: expected ('' = create), value, ttl ms, member,
# score, now.  Returns 1 if written, 0 on a conflict.  A create finding this very
# value under its key returns 1: record keys are fresh random hashes, so that can
# only be this create, re-sent by the client after its reply was lost.  (Updates
# have no such shortcut: two writers may well compute the same bytes.)
_SAVE = (
    _INDEX_FUNCTION
    + """
local value = ARGV[2]
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current == value then return 1 end
  if current then return 0 end
elseif not current or string.match(current, '^(%d+):') ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', ttl)
  if KEYS[2] then update_index(KEYS[2], ARGV[4], ARGV[5], ARGV[6], ttl, '') end
else
  redis.call('DEL', KEYS[1])
  if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[4]) end
end
return 1
"""
)

# KEYS: old record, new record [, index].  ARGV: expected, value, ttl ms, new
# member, score, now, old member.  One step on one node: check the old version,
# create the new record, delete the old one, move the index entry.  As for a
# create, finding this very value under the new (random) key means "done already".
_ROTATE = (
    _INDEX_FUNCTION
    + """
local value = ARGV[2]
local fresh = redis.call('GET', KEYS[2])
if fresh then
  if fresh == value then return 1 end
  return 0
end
local old = redis.call('GET', KEYS[1])
if not old or string.match(old, '^(%d+):') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[2], value, 'PX', ttl)
  if KEYS[3] then update_index(KEYS[3], ARGV[4], ARGV[5], ARGV[6], ttl, ARGV[7]) end
elseif KEYS[3] then
  redis.call('ZREM', KEYS[3], ARGV[7])
end
return 1
"""
)

# KEYS: index.  ARGV: member, score, now, ttl ms, old member ('' for none).
_INDEX = (
    _INDEX_FUNCTION
    + """
update_index(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5])
return 1
"""
)

# KEYS: record.  ARGV: expected.  Deletes the record if its version is expected
# (Cluster rotation: the old and new keys live in different slots).
_CLAIM = """
local old = redis.call('GET', KEYS[1])
if not old or string.match(old, '^(%d+):') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: record.  ARGV: now in ms.  Deletes the record if it has expired by then.
_PURGE = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local expires = tonumber(string.match(value, '^%d+:(%x+):') or '', 16)
if expires and expires <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# KEYS: lock, record.  ARGV: token, lock ttl ms.  Takes the record's write lock if
# it is free and returns {1, value} ({1} when there is no record), else {0}.
_LOCK = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local value = redis.call('GET', KEYS[2])
if value then return {1, value} end
return {1}
"""

# KEYS: lock.  ARGV: token.  Frees the lock if this writer still holds it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        digest = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        return cls(source, digest)


_SAVE_SCRIPT: Final = _Script.of(_SAVE)
_ROTATE_SCRIPT: Final = _Script.of(_ROTATE)
_INDEX_SCRIPT: Final = _Script.of(_INDEX)
_CLAIM_SCRIPT: Final = _Script.of(_CLAIM)
_PURGE_SCRIPT: Final = _Script.of(_PURGE)
_LOCK_SCRIPT: Final = _Script.of(_LOCK)
_UNLOCK_SCRIPT: Final = _Script.of(_UNLOCK)
_SCRIPTS: Final = (
    _SAVE_SCRIPT,
    _ROTATE_SCRIPT,
    _INDEX_SCRIPT,
    _CLAIM_SCRIPT,
    _PURGE_SCRIPT,
    _LOCK_SCRIPT,
    _UNLOCK_SCRIPT,
)
#: In-process locks for :meth:`RedisStore.update_locked`, picked by record key.
_LOCAL_STRIPES: Final = 64


@dataclass(frozen=True, slots=True)
class _Op:
    """One command of a write: a script call, or a plain command."""

    script: _Script | None
    args: tuple[Any, ...]  # for a script: keys then arguments; else the command
    numkeys: int = 0

    @property
    def key(self) -> Any:
        """The (first) key the op touches: where a Cluster must send it."""
        return self.args[0] if self.script is not None else self.args[1]

    def command(self, *, by_sha: bool = True) -> tuple[Any, ...]:
        if self.script is None:
            return self.args
        head = ("EVALSHA", self.script.sha) if by_sha else ("EVAL", self.script.source)
        return (*head, self.numkeys, *self.args)


def _call(*args: Any) -> _Op:
    return _Op(None, args)


def _script(script: _Script, keys: Sequence[str], args: Sequence[Any]) -> _Op:
    return _Op(script, (*keys, *args), len(keys))


# -- the store --------------------------------------------------------------------


class RedisStore(Store):
    """Keeps sessions in Redis: a standalone server, a Sentinel-managed master, or a Cluster.

    Pass a ready redis-py client (``redis.Redis``, one made by
    ``redis.sentinel.Sentinel.master_for``, or ``redis.cluster.RedisCluster``),
    or let :func:`open_redis_store` make one from a URL.  A client you pass keeps
    its own timeouts and retries and is not closed by :meth:`close`; it may
    decode responses or not.  ``prefix`` starts every key (no braces);
    ``wait_replicas`` > 0 sends ``WAIT`` after each write, waiting up to half of
    ``wait_timeout`` seconds (so the reply comes back within a socket timeout of
    ``wait_timeout``), and logs a warning when fewer replicas acknowledged.
    ``wait_timeout`` also bounds how long :meth:`update_locked` waits for a
    record's write lock (:func:`open_redis_store` passes the store timeout).
    ``client_cache`` > 0 keeps up to that many records in the process, invalidated
    by Redis (server-assisted client-side caching, standalone Redis only: see
    :mod:`~flask_cloakroom.stores.redis_cache`).

    Single commands and one-node pipelines go through a lane
    (:mod:`~flask_cloakroom.stores.redis_lane`): connections made by the client's pool,
    one per thread using the store at once, closed by :meth:`close`.  The lane waits
    for a reply by polling its socket for up to ``busy_poll_us`` microseconds before
    it sleeps (0: it sleeps at once; see docs/redis.md, "Busy polling").
    """

    _cache: RecordCache | None
    _lane: Lane | None

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "cloakroom:",
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        client_cache: int = 0,
        busy_poll_us: int = BUSY_POLL_US,
    ) -> None:
        self._setup(
            client=client,
            factory=None,
            prefix=prefix,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            busy_poll_us=busy_poll_us,
            cluster=isinstance(client, RedisCluster),
            where=_where(client),
        )
        if not self.cluster:
            if not isinstance(client, redis.Redis):
                raise TypeError(
                    f"RedisStore needs a redis.Redis or redis.cluster.RedisCluster client, "
                    f"got {type(client).__name__}"
                )
            self._lane = lane_for(client, busy_poll=self._busy_poll)
        if not isinstance(client_cache, int) or client_cache < 0:
            raise ConfigError(_CACHE_KEY, f"expected 0 (off) or more, got {client_cache!r}")
        if client_cache:
            if self.cluster or isinstance(client.connection_pool, SentinelConnectionPool):
                raise ConfigError(
                    _CACHE_KEY,
                    "works with a standalone Redis (redis://, rediss://, unix://) only, "
                    "not with a Cluster or Sentinel: set it to 0 for this store",
                )
            self._cache = RecordCache(
                client, prefix=prefix, size=client_cache, timeout=wait_timeout
            )

    @classmethod
    def _lazy_cluster(
        cls,
        factory: Callable[[], RedisCluster],
        *,
        where: str,
        prefix: str,
        wait_replicas: int,
        wait_timeout: float,
        busy_poll_us: int,
    ) -> RedisStore:
        """A Cluster store whose client is made on first use (a down cluster must not
        stop the app from starting)."""
        store = cls.__new__(cls)
        store._setup(
            client=None,
            factory=factory,
            prefix=prefix,
            wait_replicas=wait_replicas,
            wait_timeout=wait_timeout,
            busy_poll_us=busy_poll_us,
            cluster=True,
            where=where,
        )
        store._owns_client = True
        return store

    def _setup(
        self,
        *,
        client: Any,
        factory: Callable[[], RedisCluster] | None,
        prefix: str,
        wait_replicas: int,
        wait_timeout: float,
        busy_poll_us: int,
        cluster: bool,
        where: str,
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigError(
                "CLOAKROOM_REDIS_PREFIX",
                f"expected a text without braces (braces pick Cluster slots), got {prefix!r}",
            )
        if not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ConfigError(
                "CLOAKROOM_REDIS_WAIT_REPLICAS", f"expected 0 or more, got {wait_replicas!r}"
            )
        self._client = client
        self._factory = factory
        self._translated = Translated((RedisError, RedisClusterException), self._translate)
        self._lock = threading.Lock()
        self._event_sequence = 0
        self._owns_client = False
        self._sentinel: Sentinel | None = None
        self.prefix = prefix
        self.cluster = cluster
        self.wait_replicas = wait_replicas
        self.wait_millis = max(1, int(wait_timeout * 500))
        self._busy_poll = busy_poll_seconds(busy_poll_us)
        self._lock_timeout = wait_timeout
        self._cache = None
        self._lane = None
        # A Cluster's lanes, one per node client, by the client's id (see _node_lane).
        self._node_lanes: dict[int, tuple[weakref.ref[Any], Lane]] = {}
        self._turns = [Turns() for _ in range(_LOCAL_STRIPES)]
        self.name = "redis-cluster" if cluster else _standalone_name(client)
        self._where = where
        self._record_prefix = f"{prefix}s:"
        self._record_pattern = _glob_escape(prefix) + "s:*"
        self._index_pattern = _glob_escape(prefix) + "i:*"

    def describe(self) -> str:
        return f"{self.name} ({self._where}, prefix {self.prefix!r})"

    # -- plumbing --------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The redis-py client (a Cluster client is created on first use)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    assert self._factory is not None
                    self._client = self._factory()
                client = self._client
        return client

    def _errors(self) -> Translated:
        """Translates redis-py's errors into StoreError (StoreUnavailable where it is down)."""
        return self._translated

    def _translate(self, error: BaseException) -> StoreError:
        text = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, Resting):  # its message says it all
            return StoreResting(text, store=self.name)
        message = f"{type(error).__name__}: {text}" if text else type(error).__name__
        unavailable = isinstance(
            error,
            RedisConnectionError
            | RedisTimeoutError
            | ClusterError
            | ReadOnlyError
            | TryAgainError
            | RedisClusterException,
        ) or (
            isinstance(error, ResponseError)
            and any(reply in text for reply in _UNAVAILABLE_REPLIES)
        )
        cls = StoreUnavailable if unavailable else StoreError
        return cls(message, store=self.name)

    def record_name(self, key: str) -> str:
        """The Redis key of the record under ``key`` (32 hex digits, as
        :func:`~flask_cloakroom.tokens.store_key` makes them)."""
        return f"{self._record_prefix}{{{_short(key)}}}"

    def _lock_name(self, key: str) -> str:
        return f"{self.prefix}l:{{{_short(key)}}}"

    def _key_of(self, name: Any) -> str | None:
        """The record key back from a record's Redis key (``None`` if it is not one)."""
        text = name.decode() if isinstance(name, bytes) else str(name)
        braced = text[len(self._record_prefix) :]
        if len(braced) != 24 or braced[0] != "{" or braced[-1] != "}":
            return None
        try:
            return base64.urlsafe_b64decode(braced[1:-1] + "==").hex()
        except ValueError:  # binascii.Error
            return None

    def index_key(self, user_id: str) -> str:
        """The Redis key of the index bucket that holds ``user_id``'s entries.

        The bucket is picked by a hash of the user id, never the id itself; it
        holds other users' entries too.
        """
        return self._index_entry(user_id)[0]

    def _index_entry(self, user_id: str) -> tuple[str, bytes]:
        """(bucket, tag): the user's index bucket, and the bytes that start their members."""
        digest = hashlib.sha256(_USER_HASH_TAG + user_id.encode("utf-8")).digest()
        bucket = int.from_bytes(digest[:4], "big") % INDEX_BUCKETS
        return f"{self.prefix}i:{{{bucket:04x}}}", digest[4 : 4 + _USER_TAG_BYTES]

    def _run(self, op: _Op) -> Any:
        """One command: one round trip (two only the first time a script is seen)."""
        raw = op.script is not None
        try:
            return self._command(op.key, *op.command(), raw=raw)
        except NoScriptError:
            return self._command(op.key, *op.command(by_sha=False), raw=raw)

    def _command(self, key: str, *args: Any, raw: bool = False) -> Any:
        """Send one command about ``key``; with ``raw``, its reply is never decoded.

        A raw command goes through a :class:`~.redis_lane.Lane`: the client's own
        connections with a fraction of the Python of ``execute_command`` (the hot
        path of every request).  On a Cluster it goes straight to the node that
        serves the key's slot, by redis-py's slot table: half the client-side cost
        of the Cluster client's routing.  A redirection (the slots moved) is handed
        to the Cluster client, which follows it and updates the table; a node that
        cannot be reached makes the client re-read the topology for next time.
        """
        client = self.client
        options = _NEVER_DECODE if raw else {}
        if not self.cluster:
            lane = self._lane
            if raw and lane is not None:
                return lane.execute(*args)
            return client.execute_command(*args, **options)
        node = client.get_node_from_key(key)
        connection = node.redis_connection
        if connection is None:
            return client.execute_command(*args, **options)
        try:
            if raw:
                return self._node_lane(connection).execute(*args)
            return connection.execute_command(*args, **options)
        except (MovedError, AskError, TryAgainError):
            return client.execute_command(*args, **options)
        except Resting:
            # The node's lane failed to connect moments ago: the Cluster client would
            # try the same node again.  Its next attempt, after the rest, re-reads the
            # topology if it times out (below), and falls back if it is refused.
            raise
        except RedisConnectionError:
            # A connection that died in the pool (the node restarted), or a node that
            # is gone: once more through the Cluster client, which reconnects, or
            # re-reads the topology and fails fast.  Timeouts are not retried.
            return client.execute_command(*args, **options)
        except (RedisTimeoutError, ClusterDownError):
            self._refresh_topology(client, node.name)
            raise

    def _node_lane(self, node_client: Any) -> Lane:
        entry = self._node_lanes.get(id(node_client))
        if entry is not None and entry[0]() is node_client:
            return entry[1]
        return self._new_node_lane(node_client)

    def _new_node_lane(self, node_client: Any) -> Lane:
        """The lane of a node client met for the first time.  The lanes of node clients
        redis-py has dropped since (the topology changed: a failover, a node removed)
        are closed and forgotten here, rather than left to the garbage collector.

        The node clients are held weakly, and no clean-up callback waits for them to
        go: a lane leads, through its connection pool, to the Cluster client and so to
        every node client, so such a callback kept them all (and the store's sockets)
        for the life of the process."""
        with self._lock:
            lanes = self._node_lanes
            for ident, (ref, gone) in list(lanes.items()):
                if ref() is None:
                    del lanes[ident]
                    gone.close()
            entry = lanes.get(id(node_client))
            if entry is None or entry[0]() is not node_client:
                lane = Lane(node_client.connection_pool, busy_poll=self._busy_poll)
                entry = lanes[id(node_client)] = (weakref.ref(node_client), lane)
            return entry[1]

    def _refresh_topology(self, client: Any, failed: str) -> None:
        """Have the Cluster client re-read the slot table (after a failover, say)."""
        manager = client.nodes_manager
        try:
            try:
                manager.initialize(last_failed_node_name=failed)
            except TypeError:  # redis-py before 6
                manager.initialize()
        except (RedisError, RedisClusterException) as error:
            logger.debug("%s: could not re-read the cluster topology: %s", self.name, error)

    def _pipeline(self, ops: Sequence[_Op], *, wait_keys: Iterable[str] = ()) -> list[Any]:
        """Send ``ops`` (and ``WAIT`` where the writes went) in one round trip.

        On a Cluster the commands go to their nodes in parallel: one round trip of
        wall time.  Raises the first error.
        """
        results = self._pipeline_results(ops, wait_keys=wait_keys)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _pipeline_results(self, ops: Sequence[_Op], *, wait_keys: Iterable[str] = ()) -> list[Any]:
        """Like :meth:`_pipeline`, but each op's error is returned in its place.

        A ``NOSCRIPT`` (a server that has not seen a script yet, or was restarted)
        is answered by sending the scripts concerned once more, in full.
        """
        client = self.client
        waits = self._wait_targets(client, wait_keys)
        if len(ops) == 1 and not waits:
            return [self._run(ops[0])]
        results = self._send(client, ops, waits)
        retry = [i for i, r in enumerate(results[: len(ops)]) if isinstance(r, NoScriptError)]
        if retry:
            again = self._send(client, [ops[i] for i in retry], waits, by_sha=False)
            for i, result in zip(retry, again, strict=False):
                results[i] = result
            results[len(ops) :] = again[len(retry) :]
        for acknowledged in results[len(ops) :]:
            if isinstance(acknowledged, Exception):
                raise acknowledged  # the writes' node went away: their fate is unknown
            if int(acknowledged) < self.wait_replicas:
                logger.warning(
                    "%s: only %s of %d replicas acknowledged a session write within %d ms",
                    self.name,
                    acknowledged,
                    self.wait_replicas,
                    self.wait_millis,
                )
        ops_results: list[Any] = results[: len(ops)]
        return ops_results

    def _together(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands about keys of one slot, in one round trip; their raw replies.
        Raises the first error."""
        lane = self._lane
        if lane is not None:
            replies = lane.execute_many(commands)
        else:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command, **_NEVER_DECODE)
            replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    def _wait_targets(self, client: Any, keys: Iterable[str]) -> list[Any]:
        if not self.wait_replicas:
            return []
        keys = list(keys)
        if not keys:
            return []
        if not self.cluster:
            return [None]
        nodes: dict[str, Any] = {}
        for key in keys:
            node = client.get_node_from_key(key)
            nodes.setdefault(node.name, node)
        return list(nodes.values())

    def _send(
        self, client: Any, ops: Sequence[_Op], waits: Sequence[Any], *, by_sha: bool = True
    ) -> Any:
        lane = self._lane
        if lane is not None:
            commands = [op.command(by_sha=by_sha) for op in ops]
            commands.extend(("WAIT", self.wait_replicas, self.wait_millis) for _ in waits)
            return lane.execute_many(commands)
        if self.cluster:
            return self._send_on_nodes(client, ops, waits, by_sha=by_sha)
        return self._send_pipeline(client, ops, waits, by_sha=by_sha)

    def _send_on_nodes(
        self, client: Any, ops: Sequence[_Op], waits: Sequence[Any], *, by_sha: bool
    ) -> list[Any]:
        """A Cluster's commands on their nodes' lanes: each node's share is sent, then
        every reply read, so the nodes work at once (one round trip of wall time).

        What a node could not take (its connection failed, or it answered with a
        redirection: the slots moved) goes once more through the Cluster client's
        pipeline, which reconnects and follows redirections; every write is safe to
        send twice.  Timeouts are not sent again, nor what a node's lane refused while
        it rests after a failed attempt to connect.
        """
        groups: dict[str, tuple[Lane, list[int], list[tuple[Any, ...]]]] = {}
        targets = [client.get_node_from_key(op.key) for op in ops] + list(waits)
        for index, node in enumerate(targets):
            if node.redis_connection is None:  # a node without a client yet: rare
                return self._send_pipeline(client, ops, waits, by_sha=by_sha)
            group = groups.get(node.name)
            if group is None:
                group = groups[node.name] = (self._node_lane(node.redis_connection), [], [])
            group[1].append(index)
            if index < len(ops):
                group[2].append(ops[index].command(by_sha=by_sha))
            else:
                group[2].append(("WAIT", self.wait_replicas, self.wait_millis))
        exchanges = [(indexes, lane.start(commands)) for lane, indexes, commands in groups.values()]
        results: list[Any] = [None] * len(targets)
        again: list[int] = []
        waits_again = False
        for indexes, exchange in exchanges:  # every one finished: its connection goes back
            try:
                replies = exchange.finish()
            except Resting as error:  # the node's lane rests: in its ops' places
                replies = [error] * len(indexes)
            except RedisConnectionError:
                again.extend(i for i in indexes if i < len(ops))
                waits_again = waits_again or indexes[-1] >= len(ops)
                replies = [None] * len(indexes)
            except Exception as error:  # a timeout (never sent again): in its ops' places
                replies = [error] * len(indexes)
            for index, reply in zip(indexes, replies, strict=True):
                results[index] = reply
                if isinstance(reply, _ELSEWHERE) and index < len(ops):
                    again.append(index)
        if again or waits_again:
            try:
                resent = self._send_pipeline(client, [ops[i] for i in again], waits, by_sha=by_sha)
            except (RedisError, RedisClusterException) as error:  # in place, like the rest
                resent = [error] * (len(again) + len(waits))
            for index, reply in zip(again, resent, strict=False):
                results[index] = reply
            results[len(ops) :] = resent[len(again) :]
        return results

    def _send_pipeline(
        self, client: Any, ops: Sequence[_Op], waits: Sequence[Any], *, by_sha: bool
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for op in ops:
            options: dict[str, Any] = dict(_NEVER_DECODE)
            if self.cluster:
                # Route by the op's key ourselves: left alone, redis-py asks the
                # server (COMMAND GETKEYS, a round trip) where a script goes.
                options["target_nodes"] = client.get_node_from_key(op.key)
            pipe.execute_command(*op.command(by_sha=by_sha), **options)
        for node in waits:
            wait = ("WAIT", self.wait_replicas, self.wait_millis)
            if node is None:
                pipe.execute_command(*wait)
            else:
                pipe.execute_command(*wait, target_nodes=node)
        return list(pipe.execute(raise_on_error=False))

    def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (``None`` where missing), in order."""
        client = self.client
        values: list[bytes | None] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            if self.cluster:
                pipe = client.pipeline(transaction=False)
                for key in chunk:
                    pipe.execute_command("GET", key, **_NEVER_DECODE)
                replies = pipe.execute()
            else:
                replies = self._command(chunk[0], "MGET", *chunk, raw=True)
            values.extend(replies)
        return values

    def _encode(self, record: Record) -> bytes:
        expires = round(record.expires_at * 1000)
        if record.user_id is None:
            return b"%d:%x:-:%s" % (record.version, expires, record.payload)
        user = record.user_id.encode("utf-8")
        return b"%d:%x:%d:%s%s" % (record.version, expires, len(user), user, record.payload)

    def _decode(self, key: str, value: bytes | None) -> Record | None:
        if value is None:
            return None
        try:
            version, expires, size, rest = value.split(b":", 3)
            if size == b"-":
                user = None
                payload = rest
            else:
                length = int(size)
                if length > len(rest):
                    raise ValueError("truncated user id")
                user = rest[:length].decode("utf-8")
                payload = rest[length:]
            return Record(key, user, int(expires, 16) / 1000, int(version), payload)
        except ValueError as error:  # UnicodeDecodeError is a ValueError
            logger.warning(
                "%s: the value under %s is not a session record and is ignored: %s",
                self.name,
                self.record_name(key),
                error,
            )
            return None

    @staticmethod
    def _ttl(record: Record, now: float) -> int:
        return math.ceil((record.expires_at - now) * 1000)

    # -- the contract ----------------------------------------------------------

    def load(self, key: str) -> Record | None:
        name = self.record_name(key)
        with self._errors():
            if self._cache is None:
                value = self._command(name, "GET", name, raw=True)
            else:
                value = self._cache.get(name, lambda: self._command(name, "GET", name, raw=True))
        return self._decode(key, value)

    def cache_stats(self) -> dict[str, int] | None:
        """This process's client-side cache: ``hits``, ``misses``, ``invalidations``
        and ``records`` held; ``None`` without ``client_cache``."""
        cache = self._cache
        if cache is None:
            return None
        return {
            "hits": cache.hits,
            "misses": cache.misses,
            "invalidations": cache.invalidations,
            "records": len(cache),
        }

    def _writing(self, *names: str) -> AbstractContextManager[None]:
        """Drop the records a write touches from this process's cache, once it is sent."""
        if self._cache is None:
            return _NO_CACHE  # nothing to drop: no generator on every write
        return self._forgetting(self._cache, names)

    @staticmethod
    @contextmanager
    def _forgetting(cache: RecordCache, names: tuple[str, ...]) -> Iterator[None]:
        try:
            yield
        finally:
            cache.forget(names)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        ops = self._save_ops(record, expected=expected, now=now)
        key = ops[0].key  # the record's name
        with self._errors(), self._writing(key):
            if not self.cluster:
                (written,) = self._pipeline(ops, wait_keys=[key])
                return bool(written)
            return self._cluster_write(ops, key, created=expected is None)

    def _save_ops(self, record: Record, *, expected: int | None, now: float) -> list[_Op]:
        """The commands of :meth:`save`: one script on a single node; on a Cluster, the
        record's script and the index update (their keys live in different slots)."""
        key = self.record_name(record.key)
        expected_arg = "" if expected is None else str(expected)
        value = self._encode(record)
        ttl = self._ttl(record, now)
        if record.user_id is None:
            return [_script(_SAVE_SCRIPT, [key], [expected_arg, value, ttl])]
        index, user = self._index_entry(record.user_id)
        member = user + bytes.fromhex(record.key)
        if not self.cluster:
            score = math.ceil(record.expires_at)
            args = [expected_arg, value, ttl, member, score, repr(now)]
            return [_script(_SAVE_SCRIPT, [key, index], args)]
        return [
            _script(_SAVE_SCRIPT, [key], [expected_arg, value, ttl]),
            self._index_op(index, member, record, ttl, now, old_member=b""),
        ]

    @staticmethod
    def _index_op(
        index: str, member: bytes, record: Record, ttl: int, now: float, old_member: bytes
    ) -> _Op:
        if ttl <= 0:
            return _call("ZREM", index, member)
        args = [member, math.ceil(record.expires_at), repr(now), ttl, old_member]
        return _script(_INDEX_SCRIPT, [index], args)

    def _cluster_write(self, ops: list[_Op], key: str, *, created: bool) -> bool:
        """The record script and its index update, sent together to their two nodes.

        If a new record was written but its index update failed (the index's node
        is down), the record is deleted again, so that no session exists that
        :meth:`user_records` cannot find; the error is raised either way.
        """
        results = self._pipeline_results(ops, wait_keys=[key])
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            if created and results[0] == 1:
                self._undo_create(key)
            raise failed[0]
        return bool(results[0])

    def _undo_create(self, key: str) -> None:
        try:
            self.client.execute_command("DEL", key)
        except (RedisError, RedisClusterException) as error:  # pragma: no cover - both down
            logger.warning("%s: could not undo a half-made session %s: %s", self.name, key, error)

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        old = self.record_name(old_key)
        new = self.record_name(record.key)
        value = self._encode(record)
        ttl = self._ttl(record, now)
        score = math.ceil(record.expires_at)
        index, user = (None, b"") if record.user_id is None else self._index_entry(record.user_id)
        member = user + bytes.fromhex(record.key)
        old_member = user + bytes.fromhex(old_key)
        with self._errors(), self._writing(old, new):
            if not self.cluster:
                keys = [old, new] if index is None else [old, new, index]
                args = [str(expected), value, ttl, member, score, repr(now), old_member]
                (moved,) = self._pipeline([_script(_ROTATE_SCRIPT, keys, args)], wait_keys=[new])
                return bool(moved)
            # Two slots: claim the old record first, then create the new one. A crash
            # in between loses this one session (a logout), and resurrects nothing.
            if not self._run(_script(_CLAIM_SCRIPT, [old], [str(expected)])):
                return False
            ops = [_script(_SAVE_SCRIPT, [new], ["", value, ttl])]
            if index is not None:
                ops.append(self._index_op(index, member, record, ttl, now, old_member))
            return self._cluster_write(ops, new, created=True)

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        """Read, change and write one record under a short write lock in Redis.

        The lock is a key next to the record (same Cluster slot), taken with
        ``SET NX PX`` in the script that also reads the record, and freed by a
        compare-and-delete: three round trips when free.  Writers of one process
        first queue in arrival order (:class:`~.turns.Turns`), so that only one
        of them polls Redis and none is passed over.
        Waiting is bounded by the store timeout (``wait_timeout``), and so is the
        lock's life, so a writer that died holding it blocks nobody for longer.
        Correctness does not rest on the lock: the write stays conditional on the
        version, so a writer that does not take the lock (an optimistic first
        save) or a lock that expired costs a retry, never an update.
        """
        deadline = time.monotonic() + self._lock_timeout
        turn = self._turns[hash(key) % _LOCAL_STRIPES]
        if not turn.acquire(timeout=self._lock_timeout):
            raise StoreUnavailable(
                f"record {key}: this process's other writes held it for {self._lock_timeout:g} s",
                store=self.name,
            )
        try:
            return self._update_under_lock(key, change, now=now, deadline=deadline)
        finally:
            turn.release()

    def _update_under_lock(
        self,
        key: str,
        change: Callable[[Record | None], Record | None],
        *,
        now: float,
        deadline: float,
    ) -> Record | None:
        name = self.record_name(key)
        lock = self._lock_name(key)
        token = secrets.token_hex(8)
        ttl = max(1, round(self._lock_timeout * 1000))
        attempt = 0
        while True:
            with self._errors():
                try:
                    reply = self._run(_script(_LOCK_SCRIPT, [lock, name], [token, ttl]))
                except (TryAgainError, ClusterError) as error:
                    # A resharding is moving the slot of the record and its lock, and
                    # one of the two has gone across: a script on both is refused
                    # (TRYAGAIN; the Cluster client gives up after a few tries with
                    # "TTL exhausted") until the slot has moved.  Wait for that as for
                    # a lock that is taken.  A slot without a master fails at once.
                    if isinstance(error, ClusterDownError) or time.monotonic() >= deadline:
                        raise
                    reply = (0,)
            if int(reply[0]):
                break
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"record {key}: other writers held its lock for {self._lock_timeout:g} s",
                    store=self.name,
                )
            time.sleep(random.uniform(0.5, 1.0) * min(0.01, 0.0005 * (1 << min(attempt, 5))))
            attempt += 1
        try:
            current = self._decode(key, reply[1] if len(reply) > 1 else None)
            while True:
                settled, stored = self._change_once(current, change, now=now)
                if settled:
                    return stored
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"record {key}: kept changing under its lock for {self._lock_timeout:g} s",
                        store=self.name,
                    )
                current = self.load(key)  # a writer that does not lock came in between
        finally:
            try:
                with self._errors():
                    self._run(_script(_UNLOCK_SCRIPT, [lock], [token]))
            except StoreError as error:  # it expires by itself
                logger.warning("%s: could not free the lock of %s: %s", self.name, key, error)

    def delete(self, key: str) -> bool:
        # The user's index entry is left to heal itself (see user_records): finding
        # the user would cost a second round trip, or a script touching a key it
        # did not declare.
        name = self.record_name(key)
        with self._errors(), self._writing(name):
            (deleted,) = self._pipeline([_call("DEL", name)], wait_keys=[name])
        return bool(deleted)

    def delete_many(self, keys: Iterable[str]) -> int:
        names = [self.record_name(key) for key in keys]
        deleted = 0
        with self._errors(), self._writing(*names):
            for start in range(0, len(names), _CHUNK):
                chunk = names[start : start + _CHUNK]
                if self.cluster:
                    ops = [_call("DEL", name) for name in chunk]
                else:
                    ops = [_call("DEL", *chunk)]
                deleted += sum(int(n) for n in self._pipeline(ops, wait_keys=chunk))
        return deleted

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        entry = self._index_entry(user_id)
        index, user = entry
        with self._errors():
            # The whole bucket: its scores are expiries, so one user's members are
            # not together in it (a ZRANGEBYLEX over theirs would stop at another
            # user's member between them, and miss sessions).
            _, members = self._together(
                [("ZREMRANGEBYSCORE", index, "-inf", repr(now)), ("ZRANGE", index, 0, -1)]
            )
            size = len(user) + 16
            members = [m for m in members if len(m) == size and m.startswith(user)]
            keys = [m[len(user) :].hex() for m in members]
            values = self._get_many([self.record_name(k) for k in keys]) if keys else []
            live: list[Record] = []
            stale: list[bytes] = []
            for member, key, value in zip(members, keys, values, strict=True):
                record = self._decode(key, value)
                if record is not None and record.user_id == user_id:
                    if record.expires_at > now:
                        live.append(record)
                elif record is None or record.user_id is None:
                    stale.append(member)
                elif self._index_entry(record.user_id) != entry:
                    stale.append(member)  # the record has another user now
                # else: the entry of another user whose hash starts the same way: kept
            if stale:
                self.client.execute_command("ZREM", index, *stale)
        return live

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        node, position = _parse_cursor(cursor)
        names: list[Any] = []
        with self._errors():
            nodes = self._node_clients()
            if node >= len(nodes):
                raise ValueError(f"scan cursor {cursor!r} names a node this store does not have")
            for _ in range(_SCAN_CALLS_PER_PAGE):
                position, batch = nodes[node].scan(
                    position, match=self._record_pattern, count=max(1, limit)
                )
                names.extend(batch)
                if position == 0:
                    node += 1
                    if node == len(nodes):
                        break
                if len(names) >= limit:
                    break
            keys = [key for key in map(self._key_of, names) if key is not None]
            values = self._get_many([self.record_name(k) for k in keys]) if keys else []
        records = [r for r in (self._decode(k, v) for k, v in zip(keys, values, strict=True)) if r]
        if node >= len(nodes):
            return records, None
        return records, f"{node}:{position}"

    def _node_clients(self) -> list[Any]:
        """One client per node to SCAN: the client itself, or each Cluster primary."""
        client = self.client
        if not self.cluster:
            return [client]
        primaries = sorted(client.get_primaries(), key=lambda node: node.name)
        return [client.get_redis_connection(node) for node in primaries]

    def _scan_all(self, pattern: str, count: int) -> Iterator[list[str]]:
        """Every key matching ``pattern``, in batches of about ``count``."""
        for node in self._node_clients():
            for_node: list[str] = []
            for name in node.scan_iter(match=pattern, count=count):
                for_node.append(name.decode() if isinstance(name, bytes) else str(name))
                if len(for_node) >= count:
                    yield for_node
                    for_node = []
            if for_node:
                yield for_node

    def _record_names(self, count: int) -> Iterator[list[str]]:
        """Every record's Redis key, in batches of about ``count``: keys under the record
        prefix that are not record names (planted, or of another layout) are left out."""
        for names in self._scan_all(self._record_pattern, count):
            records = [name for name in names if self._key_of(name) is not None]
            if records:
                yield records

    def _expiries(self, names: Sequence[str]) -> list[int | None]:
        """Each record's expiry in ms from the head of its value (``None`` if gone)."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.execute_command("GETRANGE", name, 0, 47, **_NEVER_DECODE)
        out: list[int | None] = []
        for head in pipe.execute():
            match = _HEADER.match(head) if head else None
            out.append(int(match.group(2), 16) if match else None)
        return out

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete records that have expired by ``now``; prune the user indexes.

        Redis deletes expired records by itself (each has a TTL), so this finds
        little in production: it matters when ``now`` runs ahead of the TTLs
        (a test clock) and for pruning user indexes.  It costs a SCAN of the
        whole keyspace, in batches of ``batch_size`` keys; ``progress`` hears of
        each batch's deletions.  There is no cheap count of expired records
        beforehand, so :meth:`count_expired` stays "unknown".
        """
        deadline = round(now * 1000)
        deleted = 0
        batch_size = max(1, batch_size)
        with self._errors():
            for names in self._record_names(batch_size):
                expired = [
                    name
                    for name, expires in zip(names, self._expiries(names), strict=True)
                    if expires is not None and expires <= deadline
                ]
                if expired:
                    ops = [_script(_PURGE_SCRIPT, [name], [deadline]) for name in expired]
                    gone = sum(int(n) for n in self._pipeline(ops))
                    deleted += gone
                    if progress is not None and gone:
                        progress(gone)
            for names in self._scan_all(self._index_pattern, batch_size):
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.execute_command("ZREMRANGEBYSCORE", name, "-inf", repr(now))
                pipe.execute()
        return deleted

    def count(self, *, now: float) -> int:
        """Count live records: a SCAN of the whole keyspace, reading each record's head.

        Fine for a gauge every few seconds up to some hundred thousand sessions;
        beyond that, sample less often.
        """
        deadline = round(now * 1000)
        live = 0
        with self._errors():
            for names in self._record_names(1000):
                live += sum(
                    1
                    for expires in self._expiries(names)
                    if expires is not None and expires > deadline
                )
        return live

    def preload_scripts(self) -> None:
        """Load the store's Lua scripts on every node now.

        Optional: without it, the first write of each kind on each node costs one
        extra round trip (a ``NOSCRIPT`` reply, then the script in full).
        """
        with self._errors():
            for node in self._node_clients():
                for script in _SCRIPTS:
                    node.execute_command("SCRIPT", "LOAD", script.source)

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        with self._lock:  # another thread may be adding a node's lane
            lanes = [self._lane, *(lane for _, lane in self._node_lanes.values())]
        for lane in lanes:
            if lane is not None:
                lane.close()
        if not self._owns_client:
            return
        client = self._client
        self._client = None
        self._factory = None
        if client is not None:
            client.close()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                sentinel.close()

    # -- the activity log ------------------------------------------------------
    #
    # One sorted set per UTC day, {prefix}e:{<YYYYMMDD>} (score = the event's
    # time, member = a random tag + the event), and {prefix}e:days listing the
    # days that have events.  Reading goes newest day first, in pages.

    def _day_key(self, day: str) -> str:
        return f"{self.prefix}e:{{{day}}}"

    @property
    def _days_key(self) -> str:
        return f"{self.prefix}e:days"

    @staticmethod
    def _day(at: float) -> str:
        return time.strftime("%Y%m%d", time.gmtime(at))

    def add_events(self, events: Sequence[EventRecord]) -> None:
        """Append events: one round trip (a pipeline of one ZADD per day, and the day list)."""
        if not events:
            return
        by_day: dict[str, list[Any]] = {}
        for event in events:
            kind = event.kind.encode("utf-8")
            if event.user_id is None:
                user = b"-:"
            else:
                raw = event.user_id.encode("utf-8")
                user = b"%d:%s" % (len(raw), raw)
            member = b"%s:%d:%s%s%s" % (
                self._event_tag(),
                len(kind),
                kind,
                user,
                event.data,
            )
            by_day.setdefault(self._day(event.at), []).extend([repr(event.at), member])
        ops = [_call("ZADD", self._day_key(day), *pairs) for day, pairs in by_day.items()]
        days: list[Any] = []
        for day in by_day:
            days += [int(day), day]
        ops.append(_call("ZADD", self._days_key, *days))
        with self._errors():
            self._pipeline(ops)

    def _event_tag(self) -> bytes:
        """A tag that makes each event's member unique and, among events logged at the
        same time, sorts the later one last (Redis orders equal scores by member)."""
        with self._lock:
            self._event_sequence = max(self._event_sequence + 1, time.time_ns())
            sequence = self._event_sequence
        return b"%016x%s" % (sequence, secrets.token_hex(2).encode())

    def _parse_event(self, member: bytes, score: Any) -> EventRecord | None:
        try:
            _tag, size, rest = member.split(b":", 2)
            kind_length = int(size)
            kind = rest[:kind_length].decode("utf-8")
            rest = rest[kind_length:]
            user_size, rest = rest.split(b":", 1)
            user: str | None = None
            if user_size != b"-":
                user_length = int(user_size)
                user = rest[:user_length].decode("utf-8")
                rest = rest[user_length:]
            return EventRecord(float(score), kind, user, rest)
        except ValueError:
            return None

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Logged events, newest first, read a day at a time in pages of ``limit`` or more."""
        out: list[EventRecord] = []
        if limit <= 0:
            return out
        high = "+inf" if before is None else f"({before!r}"
        low = "-inf" if since is None else repr(since)
        last_day = "+inf" if before is None else self._day(before)
        first_day = "-inf" if since is None else self._day(since)
        page = max(limit, 100)
        with self._errors():
            days = self.client.execute_command(
                "ZREVRANGEBYSCORE", self._days_key, last_day, first_day
            )
            for day in days:
                key = self._day_key(day.decode() if isinstance(day, bytes) else str(day))
                offset = 0
                while len(out) < limit:
                    reply = self.client.execute_command(
                        "ZREVRANGEBYSCORE",
                        key,
                        high,
                        low,
                        "WITHSCORES",
                        "LIMIT",
                        offset,
                        page,
                        **_NEVER_DECODE,
                    )
                    pairs = _score_pairs(reply)
                    for member, score in pairs:
                        event = self._parse_event(member, score)
                        if event is None:
                            continue
                        if user_id is not None and event.user_id != user_id:
                            continue
                        if kinds is not None and event.kind not in kinds:
                            continue
                        out.append(event)
                        if len(out) >= limit:
                            break
                    if len(pairs) < page:
                        break
                    offset += page
                if len(out) >= limit:
                    break
        return out

    def prune_events(self, *, before: float) -> int:
        """Delete events older than ``before``: whole days, then the rest of its day."""
        cutoff = self._day(before)
        pruned = 0
        with self._errors():
            days = [
                d.decode() if isinstance(d, bytes) else str(d)
                for d in self.client.execute_command(
                    "ZRANGEBYSCORE", self._days_key, "-inf", cutoff
                )
            ]
            for day in days:
                key = self._day_key(day)
                if day < cutoff:
                    count, _ = self._pipeline([_call("ZCARD", key), _call("UNLINK", key)])
                    self.client.execute_command("ZREM", self._days_key, day)
                    pruned += int(count)
                else:
                    removed = self.client.execute_command(
                        "ZREMRANGEBYSCORE", key, "-inf", f"({before!r}"
                    )
                    pruned += int(removed)
        return pruned


# -- describing clients --------------------------------------------------------------


def _standalone_name(client: Any) -> str:
    pool = getattr(client, "connection_pool", None)
    return "redis-sentinel" if isinstance(pool, SentinelConnectionPool) else "redis"


def _where(client: Any) -> str:
    """Where a client points, for describe(): addresses only, never credentials."""
    if isinstance(client, RedisCluster):
        untyped: Any = client
        return "nodes " + ",".join(sorted(node.name for node in untyped.get_nodes()))
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        manager = pool.sentinel_manager
        addresses = []
        for sentinel in manager.sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            addresses.append(f"{kwargs.get('host')}:{kwargs.get('port')}")
        return f"service {pool.service_name} via sentinels {','.join(addresses)}"
    kwargs = getattr(pool, "connection_kwargs", {}) if pool is not None else {}
    if kwargs.get("path"):
        return f"unix://{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')} db {kwargs.get('db', 0)}"


def _score_pairs(reply: Any) -> list[tuple[bytes, Any]]:
    """(member, score) pairs of a WITHSCORES reply, flat (RESP2) or nested (RESP3)."""
    items = list(reply or [])
    if items and isinstance(items[0], list | tuple):
        return [(item[0], item[1]) for item in items]
    return list(zip(items[::2], items[1::2], strict=True))


def _short(key: str) -> str:
    """A record key (32 hex digits) as 22 characters of base64url: shorter names use
    a smaller allocation in Redis (docs/redis.md, memory)."""
    if not is_store_key(key):
        raise ValueError(f"a record key is 32 hex digits, got {key!r}")
    return base64.urlsafe_b64encode(bytes.fromhex(key))[:22].decode()


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _parse_cursor(cursor: str | None) -> tuple[int, int]:
    if cursor is None:
        return 0, 0
    node, sep, position = cursor.partition(":")
    if not sep or not node.isdigit() or not position.isdigit():
        raise ValueError(f"not a scan cursor of this store: {cursor!r}")
    return int(node), int(position)


# -- opening from a URL ------------------------------------------------------------


def open_redis_store(
    url: str,
    *,
    prefix: str,
    timeout: float,
    wait_replicas: int,
    client_cache: int = 0,
    busy_poll_us: int = BUSY_POLL_US,
) -> Store:
    """Open a Redis store from a ``CLOAKROOM_STORE`` URL.

    ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS) and
    ``unix:///path/to/socket?db=0`` go to :meth:`redis.Redis.from_url`;
    ``redis+sentinel://[user:pass@]host:port,host:port/service?db=0`` asks the
    sentinels for the service's master; ``redis+cluster://[user:pass@]host:port,...``
    opens a Cluster client on first use.  ``timeout`` (seconds) is the connect and
    socket timeout of every connection; a timeout is not retried, a dropped
    connection is retried once (on Sentinel, against the new master).  Nothing
    connects here: a Redis that is down does not stop the app from starting.
    ``client_cache`` > 0 turns on client-side caching (standalone URLs only);
    ``busy_poll_us`` is :class:`RedisStore`'s.
    """
    scheme = url.split("://", 1)[0].lower()
    if client_cache and scheme in ("redis+cluster", "redis+sentinel"):
        raise ConfigError(
            _CACHE_KEY,
            f"works with a standalone Redis (redis://, rediss://, unix://) only, not with "
            f"{scheme}://: set it to 0, or point CLOAKROOM_STORE at a standalone Redis",
        )
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    store_options = _StoreOptions(prefix, wait_replicas, timeout, client_cache, busy_poll_us)
    if scheme == "redis+cluster":
        return _open_cluster(url, options, store_options)
    # One retry, for a connection that died while idle in the pool (a restarted
    # server, a failover): timeouts are not retried, so nothing waits twice.
    options["retry"] = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    options["health_check_interval"] = _HEALTH_CHECK_INTERVAL
    if scheme == "redis+sentinel":
        return _open_sentinel(url, options, store_options)
    try:
        client = redis.Redis.from_url(url, **options)
    except (ValueError, TypeError) as error:
        raise ConfigError(_KEY, f"not a usable Redis URL: {_redact(url)} ({error})") from None
    store = store_options.make(client)
    store._where = _redact(url)
    return store


@dataclass(frozen=True)
class _StoreOptions:
    prefix: str
    wait_replicas: int
    wait_timeout: float
    client_cache: int = 0
    busy_poll_us: int = BUSY_POLL_US

    def make(self, client: Any) -> RedisStore:
        """A store that owns ``client`` (it closes it)."""
        store = RedisStore(
            client,
            prefix=self.prefix,
            wait_replicas=self.wait_replicas,
            wait_timeout=self.wait_timeout,
            client_cache=self.client_cache,
            busy_poll_us=self.busy_poll_us,
        )
        store._owns_client = True
        return store


@dataclass(frozen=True)
class _MultiHostURL:
    username: str | None
    password: str | None
    hosts: list[tuple[str, int]]
    path: str
    query: dict[str, str]


def _parse_multi_host(url: str, default_port: int) -> _MultiHostURL:
    """Parse ``scheme://[user:pass@]h:p,h:p[/path][?query]`` (urllib takes one host)."""
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:6379
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        if not host or (port_text and not port_text.isdigit()):
            raise ConfigError(_KEY, f"{item!r} is not host:port in {_redact(url)}")
        hosts.append((host, int(port_text) if port_text else default_port))
    if not hosts:
        raise ConfigError(_KEY, f"no host:port in {_redact(url)}")
    return _MultiHostURL(
        username,
        password,
        hosts,
        path if slash else "",
        dict(parse_qsl(query, keep_blank_values=True)),
    )


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _check_query(url: str, query: dict[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ConfigError(
            _KEY,
            f"unknown option(s) {', '.join(unknown)} in {_redact(url)}; "
            f"known: {', '.join(sorted(allowed))}",
        )


def _open_sentinel(url: str, options: dict[str, Any], store_options: _StoreOptions) -> RedisStore:
    parsed = _parse_multi_host(url, 26379)
    service = parsed.path.strip("/")
    if not service or "/" in service:
        raise ConfigError(
            _KEY,
            "a Sentinel URL names its service after the hosts: "
            f"redis+sentinel://host:26379,host:26379/mymaster; got {_redact(url)}",
        )
    allowed = {"db", "ssl", "sentinel_username", "sentinel_password", "client_name"}
    _check_query(url, parsed.query, allowed)
    query = parsed.query
    db_text = query.get("db", "0")
    if not db_text.isdigit():
        raise ConfigError(_KEY, f"db must be a number in {_redact(url)}")
    ssl = _truthy(query.get("ssl", ""))
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "ssl": ssl,
        # A sentinel that does not answer is skipped for the next one, not retried.
        "retry": Retry(NoBackoff(), 0),
    }
    if "sentinel_username" in query:
        sentinel_kwargs["username"] = query["sentinel_username"]
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    master_options = dict(options, db=int(db_text), ssl=ssl)
    if parsed.username:
        master_options["username"] = parsed.username
    if parsed.password is not None:
        master_options["password"] = parsed.password
    if "client_name" in query:
        master_options["client_name"] = query["client_name"]
    sentinel = _Sentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(service, **master_options)
    store = store_options.make(client)
    store._sentinel = sentinel
    return store


def _open_cluster(url: str, options: dict[str, Any], store_options: _StoreOptions) -> RedisStore:
    parsed = _parse_multi_host(url, 6379)
    if parsed.path.strip("/") not in ("", "0"):
        raise ConfigError(_KEY, f"a Redis Cluster has only database 0: {_redact(url)}")
    _check_query(url, parsed.query, {"ssl", "client_name"})
    kwargs: dict[str, Any] = dict(options)
    kwargs["ssl"] = _truthy(parsed.query.get("ssl", ""))
    if "client_name" in parsed.query:
        kwargs["client_name"] = parsed.query["client_name"]
    if parsed.username:
        kwargs["username"] = parsed.username
    if parsed.password is not None:
        kwargs["password"] = parsed.password
    nodes = [_ClusterNode(host, port) for host, port in parsed.hosts]

    def connect() -> RedisCluster:
        # No retries inside the client: a dead shard must answer at once (503), not
        # after the client has re-read the topology and tried again several times.
        # The store itself sends a command once more after a dropped connection.
        return RedisCluster(
            startup_nodes=nodes,
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=False,
            **kwargs,
        )

    where = "nodes " + ",".join(f"{host}:{port}" for host, port in parsed.hosts)
    return RedisStore._lazy_cluster(
        connect,
        where=where,
        prefix=store_options.prefix,
        wait_replicas=store_options.wait_replicas,
        wait_timeout=store_options.wait_timeout,
        busy_poll_us=store_options.busy_poll_us,
    )


def _redact(url: str) -> str:
    """``url`` with its passwords (user info, ``*password=`` options) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i != -1], default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    tail = re.sub(r"(password=)[^&]*", r"\1***", tail)
    return f"{scheme}://{netloc}{tail}"
