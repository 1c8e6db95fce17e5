"""The store contract: what every session store must do, and nothing more.

A store keeps :class:`Record` objects by ``key``.  It knows nothing about HTTP,
cookies, Flask, timeouts or encryption: the key is already a hash of the
session id, the payload is opaque bytes (possibly ciphertext), and ``now`` is
passed in by the caller so stores never read a clock of their own.

To write your own store, subclass :class:`Store` and implement the abstract
methods; run ``tests/test_store_contract.py`` against it (see docs/stores.md).
"""

from __future__ import annotations

import abc
import contextlib
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ..errors import ConfigError, NotSupported, StoreUnavailable

_T = TypeVar("_T")

#: Records deleted per batch by :meth:`Store.purge_expired` unless told otherwise.
#: Small on purpose: on PostgreSQL under load on a fast 2-core machine, while a
#: million expired rows went, the app's p99 stayed within 2x of normal in five runs
#: out of five with batches of 100, where batches of 250 pushed it past 2x (2.1x to
#: 5.9x) in five runs of seven (and batches of 1,000 to 2.1-2.3x in five of six on a
#: slower machine); batches of 100 make the purge about 1.5 times as long
#: (benchmarks/scale.py; docs/performance.md).
PURGE_BATCH_SIZE = 100
#: How long a purge rests after each batch, in multiples of the time the batch took,
#: unless told otherwise (see :func:`paced`).  At 2.0 it keeps its connection busy
#: about a third of the time.  On PostgreSQL under load, on a fast 2-core machine,
#: while a million expired rows went, the app's p99 stayed within 2x of normal in seven
#: runs of seven at 2.0 or 3.0, and in four of eight at 1.0 (one of the others had a
#: slice at 78 ms), for a purge of 26-29 s instead of 16-19 s
#: (benchmarks/scale.py --purge-only; docs/performance.md).
PURGE_PACE = 2.0
#: The default of ``CLOAKROOM_BUSY_POLL``: microseconds a Redis or PostgreSQL store's
#: connection polls for an answer before it sleeps (docs/redis.md, "Busy polling").
BUSY_POLL_US = 100
#: Its highest value: a millisecond.
BUSY_POLL_MAX_US = 1000


def busy_poll_micros(key: str, value: Any) -> int:
    """``value`` if it is a valid ``CLOAKROOM_BUSY_POLL``, else a ConfigError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(
            key, f"expected a whole number of microseconds, got {value!r}. Example: {key} = 50"
        )
    if not 0 <= value <= BUSY_POLL_MAX_US:
        raise ConfigError(
            key,
            f"must be from 0 (never poll: wait for the server's answer asleep) to "
            f"{BUSY_POLL_MAX_US} microseconds, got {value!r}",
        )
    return value


def busy_poll_seconds(micros: Any) -> float:
    """A store's ``busy_poll_us`` in seconds, checked as ``CLOAKROOM_BUSY_POLL`` is."""
    return busy_poll_micros("CLOAKROOM_BUSY_POLL", micros) / 1_000_000


#: Where Linux keeps the calling thread's scheduler statistics: nanoseconds on a CPU,
#: nanoseconds waiting in a run queue for one, timeslices.
SCHEDSTAT = "/proc/thread-self/schedstat"
#: How often a thread looks again at how long it has waited for a CPU (seconds).
CROWDED_SAMPLE = 0.02
#: The share of its time a thread waited for a CPU from which it is "crowded" and busy
#: polling is skipped.  With 1, 2 and 5 gunicorn workers on a local Redis or PostgreSQL
#: and 2 cores, a worker waited 0 %, 23 % and 61-68 % of the time, and polling served
#: 10-22 % and -1 to 16 % more than sleeping with 1 and 2 workers, 3-9 % less with 5
#: (benchmarks/polling.py; docs/performance.md, "Busy polling with more workers than
#: cores").
CROWDED_SHARE = 0.5


class _Schedstat:
    """A kernel thread's open schedstat file."""

    __slots__ = ("__weakref__", "fd", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fd = os.open(SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)

    def waited_ns(self) -> int:
        """Nanoseconds the thread has waited for a CPU, so far."""
        return int(os.pread(self.fd, 128, 0).split()[1])

    def __del__(self) -> None:
        # At interpreter exit ``os`` may be gone already: nothing left to close then.
        with contextlib.suppress(OSError, AttributeError, TypeError):
            os.close(self.fd)


#: The open files, by kernel thread id: one a thread, not one a ``threading.local``
#: (with gevent or eventlet, that is one a greenlet: a file a request).  Each is held by
#: the states that read it, so a thread's is closed when the thread ends (its state
#: goes), and under gevent when no greenlet of the thread has a state any more.
_files: weakref.WeakValueDictionary[int, _Schedstat] = weakref.WeakValueDictionary()


def _schedstat() -> _Schedstat:
    """The calling kernel thread's open file (opened anew after a fork)."""
    tid = threading.get_native_id()
    stat = _files.get(tid)
    if stat is None or stat.pid != os.getpid():
        stat = _files[tid] = _Schedstat()
    return stat


class _Crowding(threading.local):
    """Per thread (per greenlet under gevent): the file read last, what it said then,
    the verdict, and when to look again (never, where there is no such file)."""

    def __init__(self) -> None:
        self.stat: _Schedstat | None = None
        self.crowded = False
        self.at_ns = 0
        self.waited_ns = 0
        self.until_ns: float = 0


_crowding = _Crowding()


def cpu_crowded() -> bool:
    """Whether the calling thread spent more than ``CROWDED_SHARE`` of its time lately
    waiting for a CPU (looked at every ``CROWDED_SAMPLE`` seconds at most).

    Then the CPUs have more runnable threads than they can run, and a thread that
    busy-polls for an answer takes a CPU that another worker, or the store's server,
    would use.  Always ``False`` where the kernel keeps no such statistics (not Linux).
    """
    state = _crowding
    now_ns = time.monotonic_ns()
    if now_ns < state.until_ns:
        return state.crowded
    try:
        stat = _schedstat()
        waited_ns = stat.waited_ns()
    except (OSError, ValueError, IndexError):  # no such file here: never look again
        state.crowded = False
        state.until_ns = float("inf")
        return False
    elapsed_ns = now_ns - state.at_ns
    fresh = state.stat is not stat  # nothing of this file's to compare with yet
    state.crowded = not fresh and waited_ns - state.waited_ns > CROWDED_SHARE * elapsed_ns
    state.stat, state.at_ns, state.waited_ns = stat, now_ns, waited_ns
    state.until_ns = now_ns + CROWDED_SAMPLE * 1e9
    return state.crowded


class PollBackoff:
    """Whether a connection's next wait for an answer should busy-poll first.

    Always, until a poll runs out (a miss): then the polling is skipped for the next
    wait, then for twice as many after each further miss with no answer polled in
    between, up to 1,024 waits, so a server whose answers never come within the
    polling time costs next to no CPU.  An answer polled for in time (a hit) starts
    the count over.  Nor is a wait polled while the thread is crowded (``crowded``,
    by default :func:`cpu_crowded`: it has been waiting for a CPU more than half the
    time), as with more busy workers than CPUs.  ``hits``, ``misses`` and ``crowds``
    count the polls and the waits not polled for crowding.
    """

    __slots__ = ("backoff", "crowded", "crowds", "hits", "misses", "skip")

    #: The most waits skipped after a run of misses.
    MAX_SKIP = 1024

    def __init__(self, crowded: Callable[[], bool] = cpu_crowded) -> None:
        self.skip = 0  # waits left to skip the polling for
        self.backoff = 1  # how many the next miss skips
        self.hits = 0
        self.misses = 0
        self.crowds = 0
        self.crowded = crowded

    def due(self) -> bool:
        """Whether to poll this wait (``False``: sleep, and count it as skipped)."""
        if self.skip:
            self.skip -= 1
            return False
        if self.crowded():
            self.crowds += 1
            return False
        return True

    def hit(self) -> None:
        self.hits += 1
        self.backoff = 1

    def miss(self) -> None:
        self.misses += 1
        self.skip = self.backoff
        self.backoff = min(self.backoff * 2, self.MAX_SKIP)


#: After an attempt to open a connection to a store's server fails, the store opens
#: none for this long (seconds), doubling with each failure in a row up to the most,
#: and never for less time than the failed attempt took; its callers get
#: ``StoreUnavailable`` at once (:class:`ConnectRest`).  Trying on every call cost each
#: one the driver's whole connection set-up while the server was down (PyMySQL 1.2
#: loads the system's CA certificates for every connection: 20 ms of CPU, so two
#: workers served 70 requests a second during a MariaDB outage), or the whole connect
#: timeout where the server's host does not answer.  A server that comes back is found
#: by the first call after the rest.
CONNECT_REST_FIRST = 0.05
CONNECT_REST_MOST = 0.5


class ConnectRest:
    """When a store may next try to open a connection to its server, after failures.

    A store keeps one per server, shared by everything in it that connects there:
    while it rests, :meth:`attempt` raises ``resting`` (an exception class the store
    translates into :class:`~flask_cloakroom.errors.StoreUnavailable`) without
    touching the network.  Nothing is added where a connection is already open.
    """

    __slots__ = ("_rest", "_resting", "_until", "_what")

    def __init__(self, what: str, resting: type[Exception]) -> None:
        self._what = what
        self._resting = resting
        #: How long the last rest was (0: the last attempt succeeded), and until when
        #: (``time.monotonic()``) no attempt is made.
        self._rest = 0.0
        self._until = 0.0

    @property
    def resting(self) -> bool:
        """Whether the last attempt failed (a rest is running or has just run out)."""
        return self._rest > 0

    def attempt(
        self,
        open_: Callable[[], _T],
        failures: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    ) -> _T:
        """``open_()``, unless resting after a failed attempt (then ``resting``).

        After a failure, the first caller past the rest tries again, claiming the
        next rest before it does, so that other threads do not all try at once: they
        are answered at once.  Two threads may still both pass at the very end of a
        rest: the rest limits attempts, it does not promise a single one.  An error of
        ``failures`` starts or lengthens the rest; any other (a full pool) leaves it.
        """
        if self._rest:
            now = time.monotonic()
            if now < self._until:
                raise self._resting(
                    f"the last attempt to connect to {self._what} failed; the next is in "
                    f"{(self._until - now) * 1000:.0f} ms"
                )
            self._until = now + self._rest
        started = time.monotonic()
        try:
            opened = open_()
        except failures:
            ended = time.monotonic()
            doubled = min(2 * self._rest, CONNECT_REST_MOST) or CONNECT_REST_FIRST
            self._rest = max(doubled, ended - started)
            self._until = ended + self._rest
            raise
        self._rest = 0.0
        return opened


def paced(
    progress: Callable[[int], None] | None,
    pace: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[int], None] | None:
    """A progress callback for :meth:`Store.purge_expired` that rests after each batch.

    It reports the batch to ``progress`` (if any), then sleeps ``pace`` times as
    long as the batch took; the store calls it outside any lock.  A purge running
    batch after batch keeps a database connection and some of the server's CPU
    busy all the time, and on a small machine the app's requests wait behind it.
    ``pace`` 0 returns ``progress`` as it is (no rest).  Raises ``ValueError`` for
    a negative or non-finite ``pace``.
    """
    if not 0 <= pace < float("inf"):
        raise ValueError(f"a purge's pace must be 0 or more (times a batch's time), got {pace!r}")
    if pace == 0:
        return progress
    started = clock()

    def rest(deleted: int) -> None:
        nonlocal started
        took = clock() - started
        if progress is not None:
            progress(deleted)
        sleep(took * pace)
        started = clock()

    return rest


class Record(NamedTuple):
    """One stored session (immutable: a named tuple, built on every request for
    less than a third of a frozen dataclass's cost).

    ``key``
        The store key: a hash of the session id (hex), never the id itself.
    ``user_id``
        The index value for the session's user, or ``None`` for an anonymous
        session.  Stores index it for :meth:`Store.user_records`, and must give
        it back exactly as written: unless user ids are hashed it is the only
        copy of the user id (the payload leaves it out and, when sealed, binds
        it in its associated data).
    ``expires_at``
        Unix time (seconds) at which the record is dead for sure: the sooner of
        its idle and absolute expiry at the time it was written.  Stores use it
        for TTLs and :meth:`Store.purge_expired`.
    ``version``
        Starts at 1 and grows by one on every write; the basis of conditional
        writes (:meth:`Store.save`).
    ``payload``
        The encoded session: opaque bytes the store keeps as they are.
    """

    key: str
    user_id: str | None
    expires_at: float
    version: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One entry of the activity log, as a store keeps it.

    ``at`` (Unix time), ``kind`` and ``user_id`` (the same index value as
    :attr:`Record.user_id`) are what stores filter on; ``data`` is opaque
    bytes (possibly ciphertext) with the rest of the event.
    """

    at: float
    kind: str
    user_id: str | None
    data: bytes


class Translated:
    """A context manager that raises ``translate(error)`` from any error of ``kinds``.

    How a store turns its driver's errors into :class:`StoreError`: one instance
    per store, used around every call (a class, not a ``@contextmanager``
    generator, which costs about 0.8 µs more on each use).
    """

    __slots__ = ("_kinds", "_translate")

    def __init__(
        self,
        kinds: type[BaseException] | tuple[type[BaseException], ...],
        translate: Callable[[BaseException], BaseException],
    ) -> None:
        self._kinds = kinds
        self._translate = translate

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if error is not None and isinstance(error, self._kinds):
            raise self._translate(error) from error


class Store(abc.ABC):
    """Abstract base class of session stores.

    All methods may raise :class:`~flask_cloakroom.errors.StoreUnavailable`
    (the store cannot be reached) or another
    :class:`~flask_cloakroom.errors.StoreError`; nothing else should escape.
    Methods must be safe to call from several threads at once.
    """

    #: A short name used in logs, metrics and error messages ("sqlite", "redis").
    name: str = "store"

    @abc.abstractmethod
    def load(self, key: str) -> Record | None:
        """Return the record stored under ``key``, or ``None``.

        This is on every request's path: one round trip, no writes.  A store may
        return a record whose ``expires_at`` has passed; the caller checks it.
        """

    @abc.abstractmethod
    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        """Write ``record`` if the stored version is still ``expected``.

        ``expected=None`` means "create": succeed only if no record exists under
        ``record.key``.  Otherwise succeed only if a record exists and its
        version equals ``expected`` (a deleted record is never re-created by
        an update).  Returns ``False`` on a conflict, without writing anything.
        ``now`` lets a store derive a TTL from ``record.expires_at``.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the record under ``key``; return whether there was one."""

    @abc.abstractmethod
    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        """Return the records indexed under ``user_id``.

        Expired records may be left out; a store may prune index entries of
        expired records while it is here.
        """

    @abc.abstractmethod
    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        """Return a page of records and the cursor of the next page (``None`` at the end).

        Start with ``cursor=None`` and pass each returned cursor back in.  A full
        pass returns every record that lived through it at least once (a store
        may return one more than once, as Redis's SCAN does); the order is the
        store's.  A page holds about ``limit`` records and must not cost a scan
        of the whole store.  Used by operator tools and re-encryption.
        """

    @abc.abstractmethod
    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete records whose ``expires_at`` is at or before ``now``.

        Works in batches of ``batch_size`` so that a large purge never holds
        long locks; returns how many records were deleted.  If ``progress`` is
        given, it is called after each batch (outside any lock) with the number
        of records that batch deleted; a batch that deleted nothing need not be
        reported, and the calls add up to the return value.  It drives
        ``flask cloakroom purge``'s progress bar, so stores report as they go
        rather than once at the end.
        """

    def count_expired(self, *, now: float) -> int | None:
        """Return how many records :meth:`purge_expired` would delete at ``now``, or ``None``.

        ``None`` means "unknown": the store cannot tell without doing about as
        much work as the purge itself (files, Redis).  Stores that can count
        cheaply (an index on ``expires_at``) override it; the total of
        ``flask cloakroom purge``'s progress bar comes from here.  The default
        returns ``None``.
        """
        return None

    @abc.abstractmethod
    def count(self, *, now: float) -> int:
        """Return how many records are live at ``now`` (cheap enough for a gauge)."""

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        """Move a session to a new key in one step (session id rotation).

        Creates ``record`` (under its new key) and deletes ``old_key``, whose
        version must be ``expected``.  Returns ``False``, writing nothing, if the
        old record is gone or has another version.  The default does it in two
        steps; stores that can should override it to be atomic.
        """
        current = self.load(old_key)
        if current is None or current.version != expected:
            return False
        if not self.save(record, expected=None, now=now):
            return False
        self.delete(old_key)
        return True

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        """Read, change and write one record so that no other write can come in between.

        ``change`` gets the current record (or ``None``) and returns the record to
        store, or ``None`` to leave things as they are; it must not call the store.
        Returns what was stored, or ``None``.  Cloakroom falls back on this when a
        session's conditional write keeps losing races, so that a busy session
        still makes progress.  Stores that can hold a lock (SQL, files, memory, Redis)
        override it; this default retries optimistic writes, backing off.
        """
        for attempt in range(64):
            settled, stored = self._change_once(self.load(key), change, now=now)
            if settled:
                return stored
            time.sleep(random.random() * min(0.02, 0.0005 * (1 << min(attempt, 10))))
        raise StoreUnavailable(f"record {key}: too many concurrent writes", store=self.name)

    def _change_once(
        self,
        current: Record | None,
        change: Callable[[Record | None], Record | None],
        *,
        now: float,
    ) -> tuple[bool, Record | None]:
        """Apply ``change`` to ``current`` and write the result if nothing else has
        been written since: ``(True, stored or None)``, or ``(False, None)`` when
        another write came in between (read again and retry)."""
        new = change(current)
        if new is None:
            return True, None
        expected = None if current is None else current.version
        if self.save(new, expected=expected, now=now):
            return True, new
        return False, None

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete several records; return how many existed."""
        return sum(1 for key in keys if self.delete(key))

    def ping(self) -> None:
        """Raise :class:`~flask_cloakroom.errors.StoreUnavailable` if the store is down."""
        self.count(now=0.0)

    def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release connections and files.  The store must not be used afterwards."""

    def describe(self) -> str:
        """A one-line description for logs and operator tools (no passwords)."""
        return self.name

    # -- the activity log (optional) -------------------------------------------
    #
    # Stores that keep an activity log override these three.  The defaults
    # raise NotSupported, and Cloakroom then delivers events to signals and
    # the logger only.

    def add_events(self, events: Sequence[EventRecord]) -> None:
        """Append events to the activity log."""
        raise NotSupported(f"the {self.name} store keeps no activity log")

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Return logged events, newest first.

        Filters: ``user_id`` (an index value), ``kinds``, ``since <= at < before``.
        Page backwards in time by passing the last ``at`` seen as ``before``.
        """
        raise NotSupported(f"the {self.name} store keeps no activity log")

    def prune_events(self, *, before: float) -> int:
        """Delete events older than ``before``; return how many."""
        raise NotSupported(f"the {self.name} store keeps no activity log")


def filter_events(
    newest_first: Iterable[EventRecord],
    user_id: str | None,
    kinds: Sequence[str] | None,
    since: float | None,
    before: float | None,
    limit: int,
) -> list[EventRecord]:
    """Apply :meth:`Store.events` filters to events sorted newest first (a helper for stores)."""
    out: list[EventRecord] = []
    for event in newest_first:
        if before is not None and event.at >= before:
            continue
        if since is not None and event.at < since:
            break
        if (user_id is None or event.user_id == user_id) and (kinds is None or event.kind in kinds):
            out.append(event)
            if len(out) >= limit:
                break
    return out
