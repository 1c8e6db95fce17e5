"""The SQL store's hot statements on PostgreSQL, straight on libpq: the store's lane.

psycopg's cursor runs a fair amount of Python around each statement: it converts the
query, adapts each parameter, drives the protocol from a generator, builds row makers
and loaders.  Inside a request that is 25 to 30 µs a statement on the benchmark
machine (``benchmarks/run.py``; as much as the layer's own CPU on a read).  A
:class:`PQCursor` runs the SQL store's few statements, which it knows in advance,
through psycopg's own libpq wrapper (``Connection.pgconn``: ``prepare`` and
``exec_prepared``, C calls that release the GIL while they wait):

* each statement is prepared once per connection, under a name of its own
  (``cloakroom_<name>_<hash of its text>``), and described, so the types of its
  columns are known;
  a statement the server no longer knows (``26000``: the connection was reset by a
  pooler, say) is prepared again, and one it knows already (``42P05``: a pooler's
  server connection that another client prepared it on) is used as it is;
* parameters go as text, except ``bytes`` (``bytea``), which go as binary; rows come
  back in binary and are converted by column type (text, ``bytea``, floats and
  integers); a column of another type (a table changed by hand) raises
  :class:`Unsupported` at prepare time, and the store goes back to psycopg's cursors;
* an error reply becomes the exception psycopg would raise for it (by SQLSTATE), and a
  broken connection an ``OperationalError``, so the store's error handling (retry on a
  fresh connection, integrity errors as lost races, the watchdog's deadlines) is the
  same on both paths.

A cursor made with ``busy_poll`` > 0 sends a prepared statement and then asks libpq
for its result again and again (``PQconsumeInput``, which never waits) for up to that
many seconds, before it waits for the socket asleep: a nearby server's answer comes
within that time, and the worker is spared being put to sleep and woken again (26 µs
against 62 µs for a ``SELECT`` by key on the benchmark machine; docs/stores.md).  Each
statement keeps its own count on its connection: a wait that runs out makes that
statement's next waits skip the polling, one after a first miss, then twice as many
after each further miss with no answer polled in between (up to 1,024), so a statement
that always waits longer (a durable commit's ``fsync``) is soon not polled for.

Only PostgreSQL through psycopg 3 uses it; other statements, databases and drivers go
through the DBAPI as before.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors, pq

from .base import PollBackoff

__all__ = ["PQCursor", "PQStatement", "Unsupported"]

_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
_UNKNOWN_STATEMENT = b"26000"
_ALREADY_PREPARED = b"42P05"


def _sqlstate(result: Any) -> bytes | None:
    state: bytes | None = result.error_field(pq.DiagnosticField.SQLSTATE)
    return state


def _text(value: bytes) -> str:
    return value.decode("utf-8")


#: Binary result converters by type OID.
_CONVERTERS: dict[int, Callable[[bytes], Any]] = {
    25: _text,  # text
    1043: _text,  # varchar
    1042: _text,  # bpchar
    19: _text,  # name
    17: bytes,  # bytea
    701: lambda v: struct.unpack(">d", v)[0],  # float8
    700: lambda v: struct.unpack(">f", v)[0],  # float4
    23: lambda v: struct.unpack(">i", v)[0],  # int4
    20: lambda v: struct.unpack(">q", v)[0],  # int8
    21: lambda v: struct.unpack(">h", v)[0],  # int2
}


def _wait(fd: int, events: int) -> None:
    """Sleep until ``fd`` is ready for ``events`` (or broken: the next call says so)."""
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


class Unsupported(Exception):
    """A statement's result has a column this lane cannot convert."""


@dataclass(frozen=True, slots=True)
class PQStatement:
    """One of the store's statements, as libpq takes it: ``$n`` placeholders, and the
    order of its named parameters."""

    name: bytes
    sql: bytes
    order: tuple[str, ...]
    returns_rows: bool


class PQCursor:
    """The cursor the store's hot statements run on, on one psycopg connection.

    ``execute(statement, params)`` takes a :class:`PQStatement` and its parameters
    in order, or plain SQL with no parameters (``BEGIN``, ``COMMIT``); then
    ``fetchone``, ``fetchall`` and ``rowcount`` as a DBAPI cursor has them.
    ``prepared`` is the connection's: the names prepared on it, and the converters
    of their columns; ``polls`` too: each statement's :class:`~.base.PollBackoff`
    (``busy_poll``: seconds to poll for a result, 0 for none; see the module).
    """

    __slots__ = ("_busy_poll", "_converters", "_pgconn", "_polls", "_prepared", "_result")

    def __init__(
        self,
        connection: psycopg.Connection[Any],
        prepared: dict[bytes, Any],
        polls: dict[bytes, PollBackoff] | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        self._pgconn = connection.pgconn
        self._prepared = prepared
        self._polls = {} if polls is None else polls
        self._busy_poll = busy_poll
        self._result: Any = None
        self._converters: Sequence[Callable[[bytes], Any]] = ()

    def execute(self, statement: PQStatement | str, params: Sequence[Any] = ()) -> None:
        pgconn = self._pgconn
        if isinstance(statement, str):
            self._result = self._check(pgconn.exec_(statement.encode("ascii")))
            self._converters = ()
            return
        values: list[Any] = []  # bytes, or None for NULL (which libpq takes)
        formats: list[int] = []
        for value in params:
            if value is None:
                values.append(None)
                formats.append(0)
            elif isinstance(value, bytes):
                values.append(value)
                formats.append(1)
            elif isinstance(value, str):
                values.append(value.encode("utf-8"))
                formats.append(0)
            else:  # int or float: their repr is what PostgreSQL reads back exactly
                values.append(repr(value).encode("ascii"))
                formats.append(0)
        converters = self._prepared.get(statement.name)
        if converters is None:
            converters = self._prepare(statement)
        result = self._run(statement.name, values, formats)
        if result.status not in _OK and self._unknown(result):
            converters = self._prepare(statement)  # reset by a pooler: prepare again
            result = self._run(statement.name, values, formats)
        self._result = self._check(result)
        self._converters = converters

    def _run(self, name: bytes, values: list[Any], formats: list[int]) -> Any:
        """The result of prepared statement ``name``, as ``exec_prepared`` gives it;
        polled for first, unless polling is off or this statement skips it now."""
        pgconn = self._pgconn
        if not self._busy_poll:
            return pgconn.exec_prepared(name, values, formats, 1)
        polling = self._polls.get(name)
        if polling is None:
            polling = self._polls[name] = PollBackoff()
        if not polling.due():
            return pgconn.exec_prepared(name, values, formats, 1)
        pgconn.send_query_prepared(name, values, formats, 1)
        while pgconn.flush():  # a non-blocking connection that could not send it all
            _wait(pgconn.socket, select.POLLOUT)
        deadline = time.perf_counter() + self._busy_poll
        pgconn.consume_input()
        while pgconn.is_busy():
            if time.perf_counter() >= deadline:
                polling.miss()
                return self._finish()
            pgconn.consume_input()
        polling.hit()
        return self._finish()

    def _finish(self) -> Any:
        """The last result of the statement sent, waiting for it asleep if need be."""
        pgconn = self._pgconn
        result = None
        while True:
            while pgconn.is_busy():
                _wait(pgconn.socket, select.POLLIN)
                pgconn.consume_input()
            got = pgconn.get_result()
            if got is None:
                if result is None:
                    raise psycopg.OperationalError("the server sent no result")
                return result
            result = got

    def _prepare(self, statement: PQStatement) -> Sequence[Callable[[bytes], Any]]:
        pgconn = self._pgconn
        prepared = pgconn.prepare(statement.name, statement.sql)
        if prepared.status not in _OK and _sqlstate(prepared) != _ALREADY_PREPARED:
            self._check(prepared)  # (already prepared: a pooler's server connection)
        converters: list[Callable[[bytes], Any]] = []
        if statement.returns_rows:
            described = self._check(pgconn.describe_prepared(statement.name))
            for column in range(described.nfields):
                oid = described.ftype(column)
                converter = _CONVERTERS.get(oid)
                if converter is None:
                    raise Unsupported(
                        f"column {described.fname(column)!r} has type OID {oid}, which the "
                        "store's libpq path does not read"
                    )
                converters.append(converter)
        self._prepared[statement.name] = converters
        return converters

    @staticmethod
    def _unknown(result: Any) -> bool:
        return _sqlstate(result) == _UNKNOWN_STATEMENT

    def _check(self, result: Any) -> Any:
        if result.status in _OK:
            return result
        message = (result.error_message or self._pgconn.error_message).decode(
            "utf-8", "replace"
        ).strip() or "the statement failed"
        if self._pgconn.status == pq.ConnStatus.BAD:
            raise psycopg.OperationalError(message)
        sqlstate = _sqlstate(result)
        try:
            cls = errors.lookup(sqlstate.decode("ascii")) if sqlstate else psycopg.DatabaseError
        except KeyError:
            cls = psycopg.DatabaseError
        raise cls(message)

    def _row(self, index: int) -> tuple[Any, ...]:
        get = self._result.get_value
        return tuple(
            None if (value := get(index, column)) is None else convert(value)
            for column, convert in enumerate(self._converters)
        )

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._result is None or not self._result.ntuples:
            return None
        return self._row(0)

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self._result is None:
            return []
        return [self._row(index) for index in range(self._result.ntuples)]

    @property
    def rowcount(self) -> int:
        count = None if self._result is None else self._result.command_tuples
        return -1 if count is None else int(count)

    def close(self) -> None:
        self._result = None
