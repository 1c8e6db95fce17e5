"""A store in an SQL table, through SQLAlchemy 2 Core: SQLite, PostgreSQL, MySQL/MariaDB.

One code path serves every database.  The table (``cloakroom_sessions`` unless
``CLOAKROOM_SQL_TABLE`` says otherwise) is created on first use::

    key         VARCHAR(32)  primary key: hash of the session id, never the id
    user_id     VARCHAR(255) indexed, NULL for anonymous sessions
    expires_at  DOUBLE       indexed, Unix time
    version     INTEGER      grows by one on every write
    payload     BLOB         the encoded (and possibly encrypted) session

Conditional writes are a single ``UPDATE ... WHERE key = ? AND version = ?``;
rotation at login is a single ``UPDATE`` of the primary key, so it is atomic.

The four statements on a request's path (load, insert, update, delete) are
compiled once by SQLAlchemy for the engine's dialect and then run on DBAPI
connections kept in autocommit mode (see :class:`_Connections`): one round
trip per operation, with no ``BEGIN``/``ROLLBACK`` around it and none of the
per-statement overhead of the Core execution path.  On PostgreSQL through psycopg
3 they skip psycopg's cursors too and run straight on libpq (:mod:`.sql_pq`).
Each of those statements
must answer within the store timeout, or :class:`_Watchdog` breaks its
connection (a frozen server would otherwise keep the request forever).
Everything else (paging, purging, the activity log) goes through SQLAlchemy
Core as usual.  On both paths, a pooled connection the server dropped while it
sat idle (a restart) is replaced and the operation tried once more, so a
restart costs no request and no ping is added to each one.
SQLite files are opened in WAL mode with ``synchronous=NORMAL`` and a busy
timeout, which is what makes the embedded default fast and safe with several
worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    any_,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import ConfigError, StoreError, StoreResting, StoreUnavailable
from .base import (
    BUSY_POLL_US,
    PURGE_BATCH_SIZE,
    ConnectRest,
    EventRecord,
    PollBackoff,
    Record,
    Store,
    Translated,
    busy_poll_seconds,
)
from .turns import Turns

logger = logging.getLogger("flask_cloakroom")

_T = TypeVar("_T")
_DELETE_CHUNK = 500


def _blob() -> LargeBinary:
    blob: LargeBinary = LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
    return blob


def sessions_table(name: str, metadata: MetaData | None = None) -> Table:
    """The session table definition (add it to your own ``MetaData`` for Alembic)."""
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("key", String(32), primary_key=True),
        Column("user_id", String(255), nullable=True),
        Column("expires_at", Float(precision=53), nullable=False),
        Column("version", Integer, nullable=False),
        Column("payload", _blob(), nullable=False),
        Index(f"ix_{name}_user_id", "user_id"),
        Index(f"ix_{name}_expires_at", "expires_at"),
    )


def events_table(name: str, metadata: MetaData | None = None) -> Table:
    """The activity-log table definition (``<sessions table>_events`` by default)."""
    return Table(
        name,
        metadata if metadata is not None else MetaData(),
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("at", Float(precision=53), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("user_id", String(255), nullable=True),
        Column("data", _blob(), nullable=False),
        Index(f"ix_{name}_at", "at"),
        Index(f"ix_{name}_user_id_at", "user_id", "at"),
    )


def _sqlite_pragmas(busy_timeout: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # The busy timeout first: switching to WAL takes a lock, and without a
            # busy timeout a connection opened while another writes fails at once.
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    return on_connect


class _NeverRaised(Exception):
    """Stands in for :class:`.sql_pq.Unsupported` where the libpq path is not used."""


class _Watchdog:
    """Breaks the connection of a statement that has not answered by its deadline.

    A server that stops answering while its TCP connections stay up (a frozen
    process, a stalled host: the kernel still acknowledges) would keep a
    psycopg call waiting forever: psycopg has no client-side read timeout,
    and keepalives and ``tcp_user_timeout`` do not fire while data is
    acknowledged.  PyMySQL has a read timeout, but in whole seconds as we
    configure it.  So the statements on the request path are watched here
    instead: the caller arms a deadline before each statement and disarms it
    after (a lock and a dict operation, no thread per statement); one daemon
    thread for the process sleeps until the earliest deadline, and if that
    statement is still running it shuts the connection's socket down, so the
    blocked driver call fails at once with an ``OperationalError``.

    What it is given is a duplicate of the connection's descriptor, made
    when the connection was opened (see :class:`_Conn`): it keeps the socket
    alive until the connection is discarded, so the watchdog can never hit a
    descriptor number the OS has since given to another file.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread is not copied by fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._armed: dict[int, float] = {}  # descriptor: deadline
        self._fired: set[int] = set()
        self._wake_at = math.inf  # when the thread looks next; inf: it waits for arm()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, deadline: float) -> None:
        """Shut socket ``fd`` down at ``deadline`` (``time.monotonic()``) unless disarmed."""
        with self._lock:
            self._armed[fd] = deadline
            if deadline < self._wake_at:  # rare under load: deadlines come in order
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._watch, name="cloakroom-sql-watchdog", daemon=True
                    )
                    self._thread.start()
                self._wake_at = deadline
                self._changed.notify()

    def disarm(self, fd: int) -> bool:
        """Stop watching ``fd``; return whether it was shut down for missing its deadline."""
        with self._lock:
            self._armed.pop(fd, None)
            if fd in self._fired:
                self._fired.discard(fd)
                return True
            return False

    def fired(self, fd: int) -> bool:
        """Whether ``fd`` was shut down for missing its deadline (still armed or not)."""
        with self._lock:
            return fd in self._fired

    def _watch(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                soonest = math.inf
                for fd, deadline in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[fd]
                        self._fired.add(fd)
                        _shut_down(fd)
                    elif deadline < soonest:
                        soonest = deadline
                self._wake_at = soonest
                self._changed.wait(None if soonest == math.inf else soonest - now)


def _shut_down(fd: int) -> None:
    """Shut a socket down, both ways: a call blocked on it returns at once."""
    with suppress(OSError):  # already shut by the peer, or not a socket: nothing to break
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the descriptor stays open, for _Conn.close()


_WATCHDOG = _Watchdog()

#: How long the store waits before it tries SQLite's lock again, the first time and
#: at most (seconds): it doubles from the first to the most (SQLStore._sqlite_polling).
#: Another process's write holds the lock for tens of microseconds, so SQLite's own
#: busy handler, which first sleeps a whole millisecond (then 2, 5, 10 ...), is off on
#: the request path's connections: with two workers writing, a write that found the
#: lock taken lost a millisecond where a tenth of one was enough.
SQLITE_RETRY_FIRST: Final = 50e-6
SQLITE_RETRY_MOST: Final = 1e-3


def sqlite_retry_delays() -> Iterator[float]:
    """The waits between tries of a locked SQLite database: doubling, then the most."""
    delay = SQLITE_RETRY_FIRST
    while True:
        yield delay
        delay = min(delay * 2, SQLITE_RETRY_MOST)


class _SQLiteBusy(Exception):
    """SQLite's lock is taken (by another process); the statement did not run."""


def _sqlite_busy(error: BaseException) -> bool:
    """Whether a sqlite3 error is SQLITE_BUSY or SQLITE_LOCKED (extended codes too)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (5, 6)


class _Resting(Exception):
    """No connection is opened for now: the last attempt to open one failed."""


#: The deadline (seconds) of the operations that scan the table: counts and purge
#: batches.  Long enough for a big table, short enough that a frozen server does
#: not hang a command or a metrics scrape forever.
BULK_TIMEOUT: Final = 60.0


def _socket_copy(dbapi: Any) -> int | None:
    """A duplicate of a DBAPI connection's socket descriptor, or ``None`` (SQLite,
    or a driver that does not show its socket).  The caller closes it."""
    fileno = getattr(dbapi, "fileno", None)  # psycopg, psycopg2
    if fileno is None:
        fileno = getattr(getattr(dbapi, "_sock", None), "fileno", None)  # PyMySQL
    if fileno is not None:
        with suppress(Exception):
            return os.dup(fileno())
    return None


class _Deadline:
    """The watchdog on a SQLAlchemy Core connection, for one call of :meth:`SQLStore._run`:
    every statement and the commit together must answer within ``timeout``.

    ``late`` (and :meth:`missed`, while watching) tell whether the deadline passed:
    the watchdog shut the connection, or the driver gave up by itself at or after the
    deadline (PyMySQL's read timeout is the store timeout too; when the watchdog's
    thread wakes late, the driver's timeout comes first)."""

    __slots__ = ("_at", "_fd", "late", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._fd: int | None = None
        self._at = math.inf
        self.late = False

    @contextmanager
    def watching(self, conn: Connection) -> Iterator[None]:
        fd = self._fd = _socket_copy(conn.connection.dbapi_connection)
        if fd is None:
            yield
            return
        self._at = time.monotonic() + self.timeout
        _WATCHDOG.arm(fd, self._at)
        try:
            yield
        finally:
            self.late = _WATCHDOG.disarm(fd) or time.monotonic() >= self._at
            os.close(fd)

    def missed(self) -> bool:
        """Whether the deadline has passed (so a retry would wait again)."""
        return self._fd is not None and (_WATCHDOG.fired(self._fd) or time.monotonic() >= self._at)


class _Conn:
    """A DBAPI connection of :class:`_Connections`, with what the store keeps about it."""

    __slots__ = ("dbapi", "fd", "polls", "pooled", "prepared")

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi
        self.pooled = False  # True once it has been idle in the pool
        #: The statements prepared on it by the libpq path (sql_pq.py), by name.
        self.prepared: dict[bytes, Any] = {}
        #: And how their busy polling goes, by name (sql_pq.py).
        self.polls: dict[bytes, PollBackoff] = {}
        # A duplicate of its socket's descriptor, for the watchdog (a plain
        # descriptor: a socket object could make the socket non-blocking under
        # socket.setdefaulttimeout()).  None if the driver does not show its
        # socket; SQLite has none, and never waits on a network.
        self.fd = _socket_copy(dbapi)

    def close(self) -> None:
        with suppress(Exception):  # closing a broken connection may fail; it is gone either way
            self.dbapi.close()
        if self.fd is not None:
            os.close(self.fd)


class _Connections:
    """A small pool of DBAPI connections in autocommit mode, for the hot statements.

    Connections are made by the engine (so its connect arguments and events
    apply) and then detached from the engine's pool, so switching them to
    autocommit never leaks into connections the app uses.  At most ``size``
    are open at once; a caller waits up to ``timeout`` for one.
    """

    def __init__(self, engine: Engine, size: int, timeout: float, setup: str | None = None) -> None:
        self._engine = engine
        #: A statement each new connection runs first (the store's session settings).
        self._setup = setup
        self._idle: deque[_Conn] = deque()
        self._slots = Turns(size)  # fair, and a tenth of a BoundedSemaphore's cost
        self._timeout = timeout
        #: When a connection may next be opened, after failed attempts (the store's).
        self.rest = ConnectRest("the database", _Resting)

    def take(self, *, fresh: bool = False) -> _Conn:
        """An idle connection (a new one if ``fresh`` or none is idle); give it back after."""
        if not self._slots.acquire(timeout=self._timeout):
            raise PoolTimeout("no free database connection within the store timeout")
        try:
            if not fresh:
                with suppress(IndexError):
                    return self._idle.pop()
            return self._connect()
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: _Conn) -> None:
        conn.pooled = True
        self._idle.append(conn)
        self._slots.release()

    def discard(self, conn: _Conn) -> None:
        """Close a connection that may be broken, so that it is never lent again."""
        conn.close()
        self._slots.release()

    def _connect(self) -> _Conn:
        return self.rest.attempt(self._open)

    def _open(self) -> _Conn:
        proxied = self._engine.raw_connection()
        conn = proxied.dbapi_connection
        assert conn is not None
        proxied.detach()
        self._engine.dialect.set_isolation_level(conn, "AUTOCOMMIT")
        if self._engine.dialect.name == "sqlite":
            # SQLite's own busy handler sleeps longer and longer (1 ms first, up to
            # 100 ms) between tries, so a writer of another process would wait far
            # longer than the lock is held, or keep missing it until its timeout; the
            # store tries again itself, sooner (_sqlite_polling).
            conn.execute("PRAGMA busy_timeout=0")
        if self._setup is not None:
            try:
                cursor = conn.cursor()
                cursor.execute(self._setup)
                cursor.close()
            except BaseException:
                with suppress(Exception):
                    conn.close()
                raise
        return _Conn(conn)

    def flush(self) -> None:
        """Close the idle connections, ours and those in the engine's pool.

        Called when the server dropped one of ours while it sat idle (it
        restarted): the others are as old, so likely dead too.  The engine's
        pool matters because it is where new connections come from.
        """
        self.close()
        self._engine.pool.dispose()

    def close(self) -> None:
        """Close the idle connections (those lent out are closed when given back broken)."""
        while self._idle:
            with suppress(IndexError):  # another thread took the last one
                self._idle.pop().close()


class _Watched:
    """A cursor whose statements are watched by :data:`_WATCHDOG`, each for ``timeout``.

    ``late`` tells whether a statement missed its deadline: the watchdog shut the
    connection down, or the driver gave up by itself at or after the deadline (see
    :class:`_Deadline`).  Either way the server is not answering, and the caller must
    not try again on a new connection: that would double the client's wait.
    """

    __slots__ = ("_cursor", "_fd", "_timeout", "late")

    def __init__(self, cursor: Any, fd: int, timeout: float) -> None:
        self._cursor = cursor
        self._fd = fd
        self._timeout = timeout
        self.late = False

    def execute(self, *args: Any) -> None:
        deadline = time.monotonic() + self._timeout
        _WATCHDOG.arm(self._fd, deadline)
        try:
            self._cursor.execute(*args)
        finally:
            if _WATCHDOG.disarm(self._fd) or time.monotonic() >= deadline:
                self.late = True

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        rowcount: int = self._cursor.rowcount
        return rowcount


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0] or type(error).__name__


class SQLStore(Store):
    """Keeps sessions in a table of an SQL database.

    Pass an :class:`sqlalchemy.Engine` (for example Flask-SQLAlchemy's
    ``db.engine``) or let :func:`~flask_cloakroom.stores.open_store` make one
    from a URL.  ``create_table=False`` leaves the schema to you (see
    :func:`sessions_table`).  ``busy_timeout`` (seconds) is how long SQLite
    waits for another process's write lock before the store gives up, and
    how long any statement of a session load, save or delete may wait for
    the database before its connection is broken and the store gives up.
    ``busy_poll_us``: on PostgreSQL through psycopg 3, how long the hot statements
    poll for their result before they wait asleep (``CLOAKROOM_BUSY_POLL``; see
    :mod:`~flask_cloakroom.stores.sql_pq`).

    ``async_commit=True`` (PostgreSQL only, ``CLOAKROOM_SQL_ASYNC_COMMIT``): the
    store's own connections run with ``synchronous_commit = off``, so a session's
    creation, changes, touches and rotation commit without waiting for the disk.
    A crash of the database server can lose the last such writes (up to about three
    times ``wal_writer_delay``); the sessions read back as they were. Deletions
    (logout, revocation, ``delete_many``, the purge) still wait for the disk, so an
    ended session never comes back. Connections the app itself takes from the engine
    are not touched.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        table: str = "cloakroom_sessions",
        create_table: bool = True,
        busy_timeout: float = 5.0,
        busy_poll_us: int = BUSY_POLL_US,
        async_commit: bool = False,
    ) -> None:
        if async_commit and engine.dialect.name != "postgresql":
            raise ConfigError(
                "CLOAKROOM_SQL_ASYNC_COMMIT",
                f"(async_commit) is for PostgreSQL, and the store's database is "
                f"{engine.dialect.name}: remove it (SQLite already commits without "
                "flushing each write, in WAL mode with synchronous=NORMAL; MySQL and "
                "MariaDB set this server-wide, innodb_flush_log_at_trx_commit)",
            )
        #: Whether session writes commit without waiting for the disk (PostgreSQL).
        self.async_commit = async_commit
        self.engine = engine
        self._busy_poll = busy_poll_seconds(busy_poll_us)
        self._translated = Translated((SQLAlchemyError, _Resting), self._translate)
        metadata = MetaData()
        self.table = sessions_table(table, metadata)
        self.events_table = events_table(f"{table}_events", metadata)
        self._metadata = metadata
        self.name = engine.dialect.name
        self._create_table = create_table
        self._ready = not create_table
        #: Whether the table has PostgreSQL's row addresses (``ctid``), which a purge
        #: batch deletes by; None until the first purge on PostgreSQL asks.
        self._addresses: bool | None = None
        self._lock = threading.Lock()
        if self.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas(busy_timeout))
        t = self.table.c
        self._load = select(t.key, t.user_id, t.expires_at, t.version, t.payload).where(
            t.key == bindparam("k")
        )
        self._insert = insert(self.table)
        self._update = (
            update(self.table)
            .where(t.key == bindparam("k"), t.version == bindparam("expected"))
            .values(
                user_id=bindparam("user_id"),
                expires_at=bindparam("expires_at"),
                version=bindparam("version"),
                payload=bindparam("payload"),
            )
        )
        self._rotate = (
            update(self.table)
            .where(t.key == bindparam("old"), t.version == bindparam("expected"))
            .values(
                key=bindparam("new"),
                user_id=bindparam("user_id"),
                expires_at=bindparam("expires_at"),
                version=bindparam("version"),
                payload=bindparam("payload"),
            )
        )
        self._delete = delete(self.table).where(t.key == bindparam("k"))
        statements = (
            ("load", self._load),
            ("insert", self._insert),
            ("update", self._update),
            ("rotate", self._rotate),
            ("delete", self._delete),
            ("load_for_update", self._load.with_for_update()),
            (
                "user_records",
                select(t.key, t.user_id, t.expires_at, t.version, t.payload).where(
                    t.user_id == bindparam("u"), t.expires_at > bindparam("now")
                ),
            ),
        )
        self._compiled = {name: self._compile(statement) for name, statement in statements}
        #: The same statements for the libpq path (PostgreSQL through psycopg 3 only).
        self._pq: dict[str, Any] | None = self._pq_statements(engine, statements)
        self._pq_cursor: Any = None
        self._pq_unsupported: type[Exception] = _NeverRaised
        if self._pq is not None:
            from .sql_pq import PQCursor, Unsupported

            self._pq_cursor, self._pq_unsupported = PQCursor, Unsupported
        self._begin = "BEGIN IMMEDIATE" if self.name == "sqlite" else "BEGIN"
        pool = engine.pool
        size = getattr(pool, "size", lambda: 5)() + max(0, getattr(pool, "_max_overflow", 10))
        setup = "SET synchronous_commit TO off" if async_commit else None
        self._connections = _Connections(engine, max(size, 5), busy_timeout, setup)
        self._timeout = busy_timeout
        # SQLite has no lock queue: a writer that finds the database locked polls it,
        # sleeping in between, and under contention some pollers keep missing their
        # turn until their busy timeout runs out.  The writes of one process queue
        # on this lock instead, in arrival order, so that each starts as soon as the
        # writers ahead of it are done; between processes, _sqlite_polling tries the
        # database's lock every millisecond.
        self._sqlite_writer = Turns()  # used by SQLite only
        self._sqlite = self.name == "sqlite"
        self._dbapi: Any = engine.dialect.loaded_dbapi

    def describe(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        commit = ", asynchronous commit" if self.async_commit else ""
        return f"{self.name} ({url}, table {self.table.name}{commit})"

    # -- plumbing --------------------------------------------------------------

    @staticmethod
    def _pq_statements(
        engine: Engine, statements: Sequence[tuple[str, Any]]
    ) -> dict[str, Any] | None:
        """The hot statements for :mod:`.sql_pq`, or ``None`` where it does not apply."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        from .sql_pq import PQStatement

        dollar = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
        out: dict[str, Any] = {}
        for name, statement in statements:
            compiled = statement.compile(dialect=dollar)
            text = compiled.string.encode("utf-8")
            # Named after its text too: on a server connection shared through a pooler,
            # the same name always means the same statement (of the same table).
            digest = hashlib.sha256(text).hexdigest()[:16]
            out[name] = PQStatement(
                f"cloakroom_{name}_{digest}".encode("ascii"),
                text,
                tuple(compiled.positiontup or ()),
                returns_rows=bool(getattr(statement, "is_select", False)),
            )
        return out

    def _compile(self, statement: Any) -> tuple[str, tuple[str, ...] | None]:
        """SQL text for the engine's DBAPI, and the parameter order if positional."""
        compiled = statement.compile(dialect=self.engine.dialect)
        order = tuple(compiled.positiontup) if compiled.positional else None
        return compiled.string, order

    def _fast(self, name: str, params: dict[str, Any], *, fetch: bool, many: bool = False) -> Any:
        """Run a hot statement on a raw autocommit connection: one round trip.

        Returns the row (``fetch``), every row (``fetch`` and ``many``) or the
        row count; ``-1`` when a unique key was violated (a create or rotation
        onto an existing key).
        """
        if not self._ready:
            with self._errors():
                self._ensure_table()

        def run(cursor: Any) -> Any:
            cursor.execute(*self._args(name, params))
            if not fetch:
                return cursor.rowcount
            return cursor.fetchall() if many else cursor.fetchone()

        try:
            if not self._sqlite:
                return self._with_cursor(run)
            if fetch:
                return self._sqlite_polling(run)
            with self._write_turn():
                return self._sqlite_polling(run)
        except self._dbapi.IntegrityError:
            return -1

    def _sqlite_polling(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work`` on SQLite, trying again while another process holds the
        database's lock (after :func:`sqlite_retry_delays`), until the store timeout."""
        deadline = time.monotonic() + self._timeout
        delays = sqlite_retry_delays()
        while True:
            try:
                return self._with_cursor(work)
            except _SQLiteBusy as busy:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"{busy} (for {self._timeout:g} s)", store=self.name
                    ) from busy
            time.sleep(next(delays))

    def _with_cursor(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work`` on a cursor of a raw autocommit connection, mapping errors.

        Each statement must answer within the store timeout (see
        :class:`_Watchdog`).  IntegrityError is left to the caller.

        A pooled connection the server dropped while it sat idle (a restart)
        fails on its first statement: it is discarded with the other idle
        connections (as old, so likely dead too) and ``work`` runs once more,
        on a new connection.  The retry is safe for writes because every write
        is conditional: had the statement landed before the connection died,
        its retry finds the version moved on (an update or rotation matches no
        row) or the key taken (an insert breaks the primary key), which callers
        already handle as a lost race, and a repeated delete finds nothing.
        ``update_locked`` works in a transaction, so a failed attempt committed
        nothing.  There is no retry for a connection opened for this call, nor
        after a missed deadline: that server is not answering, and a second
        wait would double the client's.
        """
        dbapi = self._dbapi
        fresh = False
        while True:
            try:
                conn = self._connections.take(fresh=fresh)
            except _Resting as error:
                raise StoreResting(str(error), store=self.name) from error
            except PoolTimeout as error:
                raise StoreUnavailable(str(error), store=self.name) from error
            except dbapi.Error as error:  # no connection: the server is down
                raise StoreUnavailable(_first_line(error), store=self.name) from error
            late = False
            try:
                cursor = self._cursor(conn)
                watched = None if conn.fd is None else _Watched(cursor, conn.fd, self._timeout)
                try:
                    result = work(cursor if watched is None else watched)
                finally:
                    late = watched is not None and watched.late
                    cursor.close()
            except self._pq_unsupported as error:
                # A table whose columns the libpq path cannot read (changed by hand):
                # psycopg's cursors from now on.  Nothing was changed: a statement is
                # prepared before it first runs (a transaction begun for it rolled back).
                logger.warning("%s: %s; using psycopg's cursors instead", self.name, error)
                self._pq = None
                self._release(conn, late)
                continue
            except dbapi.IntegrityError:
                self._release(conn, late)  # a unique key was violated; the connection is fine
                raise
            except dbapi.Error as error:
                if self._sqlite and _sqlite_busy(error):
                    self._release(conn, late)  # the database was busy; the connection is fine
                    raise _SQLiteBusy(_first_line(error)) from error
                self._connections.discard(conn)
                broken = isinstance(error, dbapi.OperationalError | dbapi.InterfaceError)
                if late:
                    message = f"no answer from the database within {self._timeout:g} s"
                    raise StoreUnavailable(message, store=self.name) from error
                if (
                    broken
                    and conn.pooled
                    and not fresh
                    and self.engine.dialect.is_disconnect(error, conn.dbapi, None)
                ):
                    self._connections.flush()
                    fresh = True
                    continue
                cls = StoreUnavailable if broken else StoreError
                raise cls(_first_line(error), store=self.name) from error
            except BaseException:
                self._connections.discard(conn)
                raise
            self._release(conn, late)
            return result

    def _cursor(self, conn: _Conn) -> Any:
        """A cursor for the hot statements: on libpq for PostgreSQL through psycopg 3
        (:mod:`.sql_pq`), else the DBAPI's own."""
        if self._pq is not None:
            return self._pq_cursor(conn.dbapi, conn.prepared, conn.polls, self._busy_poll)
        return conn.dbapi.cursor()

    def _release(self, conn: _Conn, late: bool) -> None:
        """Pool ``conn`` again, unless the watchdog shut it (its statement ended just late)."""
        if late:
            self._connections.discard(conn)
        else:
            self._connections.give_back(conn)

    def _ensure_table(self) -> None:
        with self._lock:
            if self._ready:
                return
            with self._engine_connection() as conn:
                for table in (self.table, self.events_table):
                    try:
                        table.create(conn, checkfirst=True)
                        conn.commit()
                    except DBAPIError:
                        # Another process may have created it between check and create.
                        conn.rollback()
                        if not self.engine.dialect.has_table(conn, table.name):
                            raise
            self._ready = True

    def _engine_connection(self) -> Connection:
        """A connection from the engine's pool, unless the store is resting after a
        failed attempt to connect (then :class:`_Resting`; see :class:`ConnectRest`).

        A connection the pool already held counts as an attempt that succeeded: if it
        died with the server, its first statement fails, SQLAlchemy empties the pool,
        and the next call makes a real attempt (which a down server fails)."""
        return self._connections.rest.attempt(self.engine.connect, DBAPIError)

    def _errors(self) -> Translated:
        """Translates SQLAlchemy's errors into StoreError (StoreUnavailable where the
        database is down or the pool has no connection for us)."""
        return self._translated

    def _translate(self, error: BaseException) -> StoreError:
        if isinstance(error, _Resting):
            return StoreResting(str(error), store=self.name)
        if isinstance(error, DBAPIError | PoolTimeout):
            unavailable = isinstance(error, PoolTimeout) or (
                error.connection_invalidated
                or type(error.orig).__name__ in ("OperationalError", "InterfaceError")
            )
            cls = StoreUnavailable if unavailable else StoreError
            return cls(str(error).splitlines()[0], store=self.name)
        return StoreError(str(error).splitlines()[0], store=self.name)

    def _run(self, work: Callable[[Connection], _T], *, write: bool, bulk: bool = False) -> _T:
        """Run ``work`` through SQLAlchemy Core, in a transaction committed if ``write``.

        ``work`` and the commit must answer within the store timeout, like the
        hot statements (see :class:`_Watchdog`), or within :data:`BULK_TIMEOUT`
        if ``bulk`` (counts and purge batches, which scan); past it, the
        connection is shut and :class:`StoreUnavailable` raised, with no retry.
        A pooled connection the server dropped while idle fails its first
        statement; SQLAlchemy then invalidates the pool (every connection as
        old is replaced on checkout), and ``work`` runs once more.  Only
        ``work`` is retried, never the commit: a transaction that failed before
        its commit left nothing behind, whereas a failed commit may have landed.
        """
        if not self._ready:
            with self._errors():
                self._ensure_table()
        for attempt in (1, 2):
            deadline = _Deadline(max(BULK_TIMEOUT, self._timeout) if bulk else self._timeout)
            try:
                with (
                    self._errors(),
                    self._engine_connection() as conn,
                    deadline.watching(conn),
                ):
                    try:
                        result = work(conn)
                    except DBAPIError as error:
                        if attempt == 1 and error.connection_invalidated and not deadline.missed():
                            continue
                        raise
                    if write:
                        conn.commit()
                    return result
            except StoreError as error:
                if deadline.late:
                    message = f"no answer from the database within {deadline.timeout:g} s"
                    raise StoreUnavailable(message, store=self.name) from error
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _record(row: Sequence[Any]) -> Record:
        return Record(row[0], row[1], row[2], row[3], bytes(row[4]))

    @staticmethod
    def _values(record: Record) -> dict[str, Any]:
        return {
            "user_id": record.user_id,
            "expires_at": record.expires_at,
            "version": record.version,
            "payload": record.payload,
        }

    # -- the contract ----------------------------------------------------------

    def load(self, key: str) -> Record | None:
        row = self._fast("load", {"k": key}, fetch=True)
        return None if row is None else self._record(row)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        if expected is None:
            params = {"key": record.key, **self._values(record)}
            return bool(self._fast("insert", params, fetch=False) == 1)
        params = {"k": record.key, "expected": expected, **self._values(record)}
        return bool(self._fast("update", params, fetch=False) == 1)

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        params = {"old": old_key, "new": record.key, "expected": expected, **self._values(record)}
        return bool(self._fast("rotate", params, fetch=False) == 1)

    def delete(self, key: str) -> bool:
        if self.async_commit:
            # A logout or revocation must not be undone by a crash: through the
            # engine's own (durable) connections, in a transaction of its own.
            return bool(
                self._run(lambda c: c.execute(self._delete, {"k": key}).rowcount, write=True) > 0
            )
        return bool(self._fast("delete", {"k": key}, fetch=False) > 0)

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        """One transaction holding the row (PostgreSQL, MySQL) or the database (SQLite).

        The lock wait is bounded by the store timeout (SQLite's busy timeout,
        PostgreSQL's statement_timeout, MySQL's innodb_lock_wait_timeout).
        """
        if not self._ready:
            with self._errors():
                self._ensure_table()

        def run(cursor: Any) -> Record | None:
            cursor.execute(self._begin)
            try:
                cursor.execute(*self._args("load_for_update", {"k": key}))
                row = cursor.fetchone()
                current = None if row is None else self._record(row)
                new = change(current)
                if new is not None:
                    if current is None:
                        params = {"key": new.key, **self._values(new)}
                        cursor.execute(*self._args("insert", params))
                    else:
                        params = {"k": key, "expected": current.version, **self._values(new)}
                        cursor.execute(*self._args("update", params))
                cursor.execute("COMMIT")
                return new
            except BaseException:
                with suppress(Exception):
                    cursor.execute("ROLLBACK")
                raise

        if not self._sqlite:
            return self._with_cursor(run)
        with self._write_turn():
            return self._sqlite_polling(run)

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        """Wait for this process's turn to write to the SQLite database (bounded)."""
        if not self._sqlite_writer.acquire(timeout=self._timeout):
            raise StoreUnavailable(
                f"the database stayed locked by this process's other writes for "
                f"{self._timeout:g} s",
                store=self.name,
            )
        try:
            yield
        finally:
            self._sqlite_writer.release()

    def _args(self, name: str, params: dict[str, Any]) -> tuple[Any, Any]:
        pq = self._pq
        if pq is not None:
            statement = pq[name]
            return statement, tuple(params[k] for k in statement.order)
        sql, order = self._compiled[name]
        return sql, params if order is None else tuple(params[k] for k in order)

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        t = self.table.c

        def work(conn: Connection) -> int:
            deleted = 0
            for start in range(0, len(keys), _DELETE_CHUNK):
                chunk = keys[start : start + _DELETE_CHUNK]
                deleted += conn.execute(delete(self.table).where(t.key.in_(chunk))).rowcount
            return deleted

        return self._run(work, write=True) if keys else 0

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        # On the raw autocommit path, like load: one round trip (a Core connection
        # adds a ROLLBACK when it goes back to the pool), and a listing page is hot.
        rows = self._fast("user_records", {"u": user_id, "now": now}, fetch=True, many=True)
        return [self._record(r) for r in rows]

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        t = self.table.c
        query = select(t.key, t.user_id, t.expires_at, t.version, t.payload)
        if cursor is not None:
            query = query.where(t.key > cursor)
        query = query.order_by(t.key).limit(limit)
        rows = self._run(lambda c: c.execute(query).all(), write=False)
        records = [self._record(r) for r in rows]
        return records, (records[-1].key if len(records) == limit else None)

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        t = self.table.c
        expired = t.expires_at <= bindparam("now")
        values: dict[str, Any] = {"now": now, "floor": None}
        batch: Callable[[Connection], tuple[bool, int, float | None]]
        # One statement per batch where the database allows it: the keys never travel
        # to Python and back, which on a busy app server is most of a purge's CPU.  The
        # outer expiry test is checked again on a row renewed meanwhile (PostgreSQL
        # re-evaluates it on the row's new version), so a renewed session is never
        # deleted.
        if self.name == "postgresql":
            # The pick is of row addresses (ctid), which the delete reaches without the
            # primary key's index: half a batch's pages and time.  A row renewed while
            # the batch waits for its lock has a new address, and a new expiry, so it
            # is spared twice over.  Where addresses do not name one row (a view; a
            # partitioned table; a server that speaks PostgreSQL's protocol on storage
            # of its own), it picks keys.
            # Each batch goes on from the latest expiry the last one deleted, told back
            # in one row with the count.
            if self._addresses is None:
                self._addresses = self._has_addresses()
            addresses = self._addresses

            def statement(floor: bool) -> Any:
                pick = self._purge_pick(batch_size, floor, addresses=addresses)
                if addresses:
                    rows = literal_column("ctid") == any_(func.ARRAY(pick.scalar_subquery()))
                else:
                    rows = t.key.in_(pick)
                gone = delete(self.table).where(rows, expired).returning(t.expires_at)
                done = gone.cte("gone")
                return select(func.count(), func.max(done.c.expires_at))

            first, then = statement(False), statement(True)

            def batch(conn: Connection) -> tuple[bool, int, float | None]:
                statement = first if values["floor"] is None else then
                count, floor = conn.execute(statement, values).one()
                return bool(count), int(count), floor

        elif self.name == "sqlite":
            # SQLite deletes a row's index entries with it: nothing to go on from.
            gone = delete(self.table).where(t.key.in_(self._purge_pick(batch_size)), expired)

            def batch(conn: Connection) -> tuple[bool, int, float | None]:
                deleted = int(conn.execute(gone, values).rowcount)
                return bool(deleted), deleted, None

        else:
            # MySQL and MariaDB refuse LIMIT in such a subquery: a select, then a delete.
            finds = [self._purge_pick(batch_size, f, t.expires_at) for f in (False, True)]

            def batch(conn: Connection) -> tuple[bool, int, float | None]:
                rows = conn.execute(finds[values["floor"] is not None], values).all()
                if not rows:
                    return False, 0, None
                # Re-check the expiry: a record may have been renewed since the select.
                gone = delete(self.table).where(t.key.in_([r[0] for r in rows]), expired)
                deleted = int(conn.execute(gone, values).rowcount)
                return len(rows) == batch_size, deleted, rows[-1][1]

        total = 0
        while True:
            more, deleted, floor = self._run(batch, write=True, bulk=True)
            total += deleted
            values["floor"] = floor
            if progress is not None and deleted:
                progress(deleted)
            if not more:
                return total

    def _purge_pick(
        self, batch_size: int, floor: bool = False, *extra: Any, addresses: bool = False
    ) -> Select[Any]:
        """The purge's pick of a batch: the first ``batch_size`` rows expired by the
        bound ``now``, in expiry order, with ``floor`` from the bound ``floor`` on (the
        latest expiry the last batch deleted); their keys (with ``addresses``, their
        PostgreSQL row addresses, ``ctid``) and ``extra`` columns.

        Expiry order walks the expiry index.  Picking any expired rows instead let
        PostgreSQL scan the table from its first page, past every live row and every
        row the purge had deleted (dead until a vacuum), and the floor keeps each batch
        from passing the index entries of the rows deleted before it: a batch costs the
        same at the end of a purge as at its start, whatever the table's size.
        """
        t = self.table.c
        what = literal_column("ctid") if addresses else t.key
        find = select(what, *extra).where(t.expires_at <= bindparam("now"))
        if floor:
            find = find.where(t.expires_at >= bindparam("floor"))
        return find.order_by(t.expires_at).limit(batch_size)

    def _has_addresses(self) -> bool:
        """Whether a purge batch may delete by PostgreSQL's row addresses (``ctid``):
        yes on a plain table of PostgreSQL's; no on a view, or on a table of a server
        that speaks PostgreSQL's protocol on storage of its own, which may have none;
        no on a partitioned table or one with inheritance children, whose rows share
        addresses across partitions.  An outage is raised, not taken for a no."""
        kind = text("SELECT relkind, relhassubclass FROM pg_class WHERE oid = CAST(:t AS regclass)")
        name = self.engine.dialect.identifier_preparer.format_table(self.table)
        probe: Select[Any] = select(literal_column("ctid")).select_from(self.table).limit(0)

        def ask(conn: Connection) -> Any:
            found = conn.execute(kind, {"t": name}).one_or_none()
            conn.execute(probe).all()
            return found

        try:
            found = self._run(ask, write=False)
        except StoreUnavailable:
            raise
        except StoreError as error:
            logger.info("%s: the purge picks keys, not row addresses: %s", self.name, error)
            return False
        if found is None or tuple(found) != ("r", False):
            logger.info("%s: the purge picks keys: %s is not a plain table", self.name, name)
            return False
        return True

    def count_expired(self, *, now: float) -> int:
        """Count the records :meth:`purge_expired` would delete (a range of the expiry index)."""
        t = self.table.c
        query = select(func.count()).select_from(self.table).where(t.expires_at <= now)
        return int(self._run(lambda c: c.execute(query).scalar_one(), write=False, bulk=True))

    def count(self, *, now: float) -> int:
        t = self.table.c
        query = select(func.count()).select_from(self.table).where(t.expires_at > now)
        return int(self._run(lambda c: c.execute(query).scalar_one(), write=False, bulk=True))

    def ping(self) -> None:
        self._run(lambda c: c.execute(select(1)).scalar_one(), write=False)

    def close(self) -> None:
        self._connections.close()
        self.engine.dispose()

    # -- activity log ----------------------------------------------------------

    def add_events(self, events: Sequence[EventRecord]) -> None:
        if not events:
            return
        rows = [{"at": e.at, "kind": e.kind, "user_id": e.user_id, "data": e.data} for e in events]
        self._run(lambda c: c.execute(insert(self.events_table), rows), write=True)

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        t = self.events_table.c
        query = select(t.at, t.kind, t.user_id, t.data)
        if user_id is not None:
            query = query.where(t.user_id == user_id)
        if kinds is not None:
            query = query.where(t.kind.in_(list(kinds)))
        if since is not None:
            query = query.where(t.at >= since)
        if before is not None:
            query = query.where(t.at < before)
        query = query.order_by(t.at.desc(), t.id.desc()).limit(limit)
        rows = self._run(lambda c: c.execute(query).all(), write=False)
        return [EventRecord(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def prune_events(self, *, before: float, batch_size: int = 1000) -> int:
        t = self.events_table.c
        find = select(t.id).where(t.at < before).limit(batch_size)
        total = 0
        while True:

            def batch(conn: Connection) -> int:
                ids = list(conn.execute(find).scalars())
                if ids:
                    conn.execute(delete(self.events_table).where(t.id.in_(ids)))
                return len(ids)

            found = self._run(batch, write=True, bulk=True)
            total += found
            if found < batch_size:
                return total
