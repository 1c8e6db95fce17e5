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
per-statement overhead of the Core execution path.  Everything else (paging,
purging, the activity log) goes through SQLAlchemy Core as usual.
SQLite files are opened in WAL mode with ``synchronous=NORMAL`` and a busy
timeout, which is what makes the embedded default fast and safe with several
worker processes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import StoreError, StoreUnavailable
from .base import EventRecord, Record, Store

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
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        finally:
            cursor.close()

    return on_connect


class _Connections:
    """A small pool of DBAPI connections in autocommit mode, for the hot statements.

    Connections are made by the engine (so its connect arguments and events
    apply) and then detached from the engine's pool, so switching them to
    autocommit never leaks into connections the app uses.  At most ``size``
    are open at once; a caller waits up to ``timeout`` for one.
    """

    def __init__(self, engine: Engine, size: int, timeout: float) -> None:
        self._engine = engine
        self._idle: deque[Any] = deque()
        self._slots = threading.BoundedSemaphore(size)
        self._timeout = timeout

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Lend a connection; it is kept only if the block ends without an error."""
        if not self._slots.acquire(timeout=self._timeout):
            raise PoolTimeout("no free database connection within the store timeout")
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._connect()
            try:
                yield conn
            except BaseException:
                _close_quietly(conn)  # it may be broken: never lend it again
                raise
            self._idle.append(conn)
        finally:
            self._slots.release()

    def _connect(self) -> Any:
        proxied = self._engine.raw_connection()
        conn = proxied.dbapi_connection
        assert conn is not None
        proxied.detach()
        self._engine.dialect.set_isolation_level(conn, "AUTOCOMMIT")
        return conn

    def close(self) -> None:
        while self._idle:
            _close_quietly(self._idle.pop())


def _close_quietly(conn: Any) -> None:
    with suppress(Exception):  # closing a broken connection may fail; it is gone either way
        conn.close()


class SQLStore(Store):
    """Keeps sessions in a table of an SQL database.

    Pass an :class:`sqlalchemy.Engine` (for example Flask-SQLAlchemy's
    ``db.engine``) or let :func:`~flask_cloakroom.stores.open_store` make one
    from a URL.  ``create_table=False`` leaves the schema to you (see
    :func:`sessions_table`).  ``busy_timeout`` (seconds) is how long SQLite
    waits for another process's write lock before the store gives up.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        table: str = "cloakroom_sessions",
        create_table: bool = True,
        busy_timeout: float = 5.0,
    ) -> None:
        self.engine = engine
        metadata = MetaData()
        self.table = sessions_table(table, metadata)
        self.events_table = events_table(f"{table}_events", metadata)
        self._metadata = metadata
        self.name = engine.dialect.name
        self._create_table = create_table
        self._ready = not create_table
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
        self._compiled = {
            name: self._compile(statement)
            for name, statement in (
                ("load", self._load),
                ("insert", self._insert),
                ("update", self._update),
                ("rotate", self._rotate),
                ("delete", self._delete),
                ("load_for_update", self._load.with_for_update()),
            )
        }
        self._begin = "BEGIN IMMEDIATE" if self.name == "sqlite" else "BEGIN"
        pool = engine.pool
        size = getattr(pool, "size", lambda: 5)() + max(0, getattr(pool, "_max_overflow", 10))
        self._connections = _Connections(engine, max(size, 5), busy_timeout)
        self._dbapi: Any = engine.dialect.loaded_dbapi

    def describe(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"{self.name} ({url}, table {self.table.name})"

    # -- plumbing --------------------------------------------------------------

    def _compile(self, statement: Any) -> tuple[str, tuple[str, ...] | None]:
        """SQL text for the engine's DBAPI, and the parameter order if positional."""
        compiled = statement.compile(dialect=self.engine.dialect)
        order = tuple(compiled.positiontup) if compiled.positional else None
        return compiled.string, order

    def _fast(self, name: str, params: dict[str, Any], *, fetch: bool) -> Any:
        """Run a hot statement on a raw autocommit connection: one round trip.

        Returns the row (``fetch``) or the row count; ``-1`` when a unique key
        was violated (a create or rotation onto an existing key).
        """
        if not self._ready:
            with self._errors():
                self._ensure_table()
        statement = self._args(name, params)

        def run(cursor: Any) -> Any:
            cursor.execute(*statement)
            return cursor.fetchone() if fetch else cursor.rowcount

        try:
            return self._with_cursor(run)
        except self._dbapi.IntegrityError:
            return -1

    def _with_cursor(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work`` on a cursor of a raw autocommit connection, mapping errors.

        A connection the server dropped while idle is replaced once.
        IntegrityError is left to the caller.
        """
        dbapi = self._dbapi
        for attempt in (1, 2):
            try:
                with self._connections.connection() as conn:
                    cursor = conn.cursor()
                    try:
                        return work(cursor)
                    finally:
                        cursor.close()
            except dbapi.IntegrityError:
                raise
            except dbapi.Error as error:
                broken = isinstance(error, dbapi.OperationalError | dbapi.InterfaceError)
                if attempt == 1 and broken and self.engine.dialect.is_disconnect(error, None, None):
                    continue  # a connection the server dropped while idle: once more, fresh
                cls = StoreUnavailable if broken else StoreError
                raise cls(
                    str(error).splitlines()[0] or type(error).__name__, store=self.name
                ) from error
            except PoolTimeout as error:
                raise StoreUnavailable(str(error), store=self.name) from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_table(self) -> None:
        with self._lock:
            if self._ready:
                return
            for table in (self.table, self.events_table):
                try:
                    table.create(self.engine, checkfirst=True)
                except DBAPIError:
                    # Another process may have created it between check and create.
                    with self.engine.connect() as conn:
                        if not self.engine.dialect.has_table(conn, table.name):
                            raise
            self._ready = True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (DBAPIError, PoolTimeout) as error:
            unavailable = isinstance(error, PoolTimeout) or (
                error.connection_invalidated
                or type(error.orig).__name__ in ("OperationalError", "InterfaceError")
            )
            cls = StoreUnavailable if unavailable else StoreError
            raise cls(str(error).splitlines()[0], store=self.name) from error
        except SQLAlchemyError as error:
            raise StoreError(str(error).splitlines()[0], store=self.name) from error

    def _run(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        if not self._ready:
            with self._errors():
                self._ensure_table()
        with self._errors():
            if write:
                with self.engine.begin() as conn:
                    return work(conn)
            with self.engine.connect() as conn:
                return work(conn)

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

        return self._with_cursor(run)

    def _args(self, name: str, params: dict[str, Any]) -> tuple[str, Any]:
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
        t = self.table.c
        query = select(t.key, t.user_id, t.expires_at, t.version, t.payload).where(
            t.user_id == user_id, t.expires_at > now
        )
        rows = self._run(lambda c: c.execute(query).all(), write=False)
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

    def purge_expired(self, *, now: float, batch_size: int = 1000) -> int:
        t = self.table.c
        find = select(t.key).where(t.expires_at <= now).limit(batch_size)
        total = 0
        while True:

            def batch(conn: Connection) -> tuple[int, int]:
                keys = list(conn.execute(find).scalars())
                if not keys:
                    return 0, 0
                # Re-check the expiry: a record may have been renewed since the select.
                gone = delete(self.table).where(t.key.in_(keys), t.expires_at <= now)
                return len(keys), conn.execute(gone).rowcount

            found, deleted = self._run(batch, write=True)
            total += deleted
            if found < batch_size:
                return total

    def count(self, *, now: float) -> int:
        t = self.table.c
        query = select(func.count()).select_from(self.table).where(t.expires_at > now)
        return int(self._run(lambda c: c.execute(query).scalar_one(), write=False))

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

            found = self._run(batch, write=True)
            total += found
            if found < batch_size:
                return total
