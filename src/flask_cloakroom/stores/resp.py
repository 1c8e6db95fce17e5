"""RESP, the Redis protocol: commands packed and replies parsed in a few lines.

Used where the Redis store talks to a socket itself: the lane's hot path
(:mod:`~flask_cloakroom.stores.redis_lane`) and the client-side cache's tracking
connection (:mod:`~flask_cloakroom.stores.redis_cache`).  Values come back as Redis
sent them: bulk and simple strings as ``bytes``, never decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.exceptions import DataError, ResponseError

__all__ = ["NOT_YET", "Incomplete", "Push", "Reader", "pack", "parse"]

_DOLLAR: Final = 36  # $
_COLON: Final = 58  # :
_PLUS: Final = 43  # +
_MINUS: Final = 45  # -
_STAR: Final = 42  # *
_AGGREGATES: Final = frozenset(b"*>~%|")


class Incomplete(Exception):
    """The buffer ends inside a reply."""


class _NotYet:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_YET"


#: What :meth:`Reader.gets` returns while a reply has not all arrived (not ``False``,
#: which is a RESP3 reply).  The lane gives it to hiredis's reader as well.
NOT_YET: Final = _NotYet()


class Push:
    """A RESP3 push message (``>``): out-of-band, not the reply to a command."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


def pack(
    commands: Sequence[Sequence[Any]], encoding: str = "utf-8", errors: str = "strict"
) -> bytes:
    """``commands`` as the bytes to send: each a list of bulk strings.

    Arguments may be ``bytes``, ``str`` (encoded with ``encoding``), ``int`` or
    ``float`` (written as redis-py writes them); anything else is a ``DataError``.
    """
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode(encoding, errors)
            elif kind is int:
                data = b"%d" % arg
            elif kind is float:
                data = repr(arg).encode()
            elif isinstance(arg, bytes | bytearray | memoryview):
                data = bytes(arg)
            elif isinstance(arg, int) and not isinstance(arg, bool):
                data = b"%d" % arg
            elif isinstance(arg, float):
                data = repr(float(arg)).encode()
            else:
                raise DataError(
                    f"Invalid input of type {kind.__name__!r}: "
                    "convert to bytes, str, int or float first"
                )
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def parse(
    buffer: bytes | bytearray,
    start: int,
    error: Callable[[str], Exception] = ResponseError,
) -> tuple[Any, int]:
    """One RESP2/RESP3 reply at ``start``: ``(value, end)``; raises :class:`Incomplete`.

    An error reply is returned in its place as ``error(message)``, not raised, so a
    pipeline's other replies are still read.  A RESP3 attribute is skipped; a push
    message comes back as a :class:`Push`.
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise Incomplete
    kind = buffer[start]
    if kind == _DOLLAR or kind == 61:  # $ bulk, = verbatim
        size = int(buffer[start + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            raise Incomplete
        return bytes(buffer[end + 2 : stop]), stop + 2
    if kind == _COLON:
        return int(buffer[start + 1 : end]), end + 2
    if kind == _PLUS:
        return bytes(buffer[start + 1 : end]), end + 2
    if kind == 35:  # # boolean
        return buffer[start + 1 : end] == b"t", end + 2
    if kind == 44:  # , double
        return float(buffer[start + 1 : end]), end + 2
    if kind == 40:  # ( big number
        return int(buffer[start + 1 : end]), end + 2
    if kind == _MINUS:
        return error(bytes(buffer[start + 1 : end]).decode("utf-8", "replace")), end + 2
    if kind == 33:  # ! bulk error
        size = int(buffer[start + 1 : end])
        stop = end + 2 + size
        if len(buffer) < stop + 2:
            raise Incomplete
        return error(bytes(buffer[end + 2 : stop]).decode("utf-8", "replace")), stop + 2
    if kind == 95:  # _ null
        return None, end + 2
    if kind in _AGGREGATES:
        count = int(buffer[start + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        if kind in b"%|":  # a map's or an attribute's keys and values
            count *= 2
        items = []
        for _ in range(count):
            item, pos = parse(buffer, pos, error)
            items.append(item)
        if kind == 124:  # | attributes come before the reply they describe: skip them
            return parse(buffer, pos, error)
        return (Push(items) if kind == 62 else items), pos
    raise ValueError(f"not a RESP reply: {bytes(buffer[start : start + 16])!r}")


class Reader:
    """Replies out of the bytes fed to it, one at a time: the part of
    ``hiredis.Reader`` the Redis store uses, where hiredis is not installed (made with
    ``notEnoughData=NOT_YET``)."""

    __slots__ = ("_buffer", "_error", "_pos")

    def __init__(self, error: Callable[[str], Exception] = ResponseError) -> None:
        self._buffer = b""
        self._pos = 0
        self._error = error

    def feed(self, data: bytes) -> None:
        """Add bytes read off the socket."""
        self._buffer = self._buffer[self._pos :] + data if self._buffer else data
        self._pos = 0

    def gets(self) -> Any:
        """The next complete reply, or :data:`NOT_YET` while it has not all arrived."""
        try:
            reply, self._pos = parse(self._buffer, self._pos, self._error)
        except Incomplete:
            return NOT_YET
        return reply

    def has_data(self) -> bool:
        """Whether bytes are waiting that no reply has taken yet."""
        return self._pos < len(self._buffer)
