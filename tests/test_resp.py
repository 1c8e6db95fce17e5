"""flask_cloakroom.stores.resp: the Redis protocol as the store's own socket code
speaks it (the lane without hiredis, the client-side cache's tracking connection).

Replies are generated, written out as a Redis server writes them, cut into pieces
anywhere, and must come back whole and equal; bytes that are not RESP raise a
ValueError (which the lane turns into redis-py's InvalidResponse), never anything
else.  Packing is checked against redis-py's own Python packer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import DataError, NoScriptError, ResponseError

from flask_cloakroom.stores import resp

_ERROR_TEXT = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), min_size=1
)

replies: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.binary(max_size=300)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.builds(ResponseError, _ERROR_TEXT),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def written(reply: Any) -> bytes:
    """``reply`` as a RESP2 server writes it."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, bytes):
        return b"$%d\r\n%b\r\n" % (len(reply), reply)
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, ResponseError):
        return b"-%b\r\n" % str(reply).encode()
    return b"*%d\r\n" % len(reply) + b"".join(written(item) for item in reply)


def same(got: Any, wanted: Any) -> bool:
    if isinstance(wanted, ResponseError):
        return type(got) is ResponseError and str(got) == str(wanted)
    if isinstance(wanted, list):
        return (
            isinstance(got, list)
            and len(got) == len(wanted)
            and all(same(g, w) for g, w in zip(got, wanted, strict=True))
        )
    return type(got) is type(wanted) and got == wanted


@given(st.lists(replies, min_size=1, max_size=4), st.data())
def test_replies_fed_in_any_pieces_come_back_whole(wanted: list[Any], data: st.DataObject) -> None:
    stream = b"".join(written(reply) for reply in wanted)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = resp.Reader()
    got: list[Any] = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        reader.feed(stream[start:stop])
        while (reply := reader.gets()) is not resp.NOT_YET:
            got.append(reply)
    assert same(got, wanted)
    assert not reader.has_data()


@given(st.binary(max_size=64))
def test_bytes_that_are_not_resp_raise_value_error_or_wait_for_more(junk: bytes) -> None:
    # Anything else would escape the lane untranslated, and fail this test.
    with contextlib.suppress(resp.Incomplete, ValueError):
        resp.parse(junk, 0)


def test_error_replies_become_the_given_exception_class_in_their_place() -> None:
    def error(message: str) -> Exception:
        return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)

    stream = b"*2\r\n-NOSCRIPT no script\r\n$2\r\nok\r\n-ERR bad\r\n"
    items, end = resp.parse(stream, 0, error)
    assert isinstance(items[0], NoScriptError) and items[1] == b"ok"
    bad, _ = resp.parse(stream, end, error)
    assert type(bad) is ResponseError and str(bad) == "ERR bad"


def test_resp3_replies_the_tracking_connection_receives() -> None:
    push, end = resp.parse(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n_\r\n", 0)
    assert isinstance(push, resp.Push) and push.items == [b"invalidate", [b"key"]]
    assert resp.parse(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n_\r\n", end) == (
        None,
        end + 3,
    )
    assert resp.parse(b"%1\r\n+a\r\n:1\r\n", 0)[0] == [b"a", 1]
    assert resp.parse(b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n", 0)[0] == b"v"  # attribute skipped
    # As hiredis gives them: a boolean, a double, a big number.
    assert resp.parse(b"#t\r\n", 0) == (True, 4) and resp.parse(b"#f\r\n", 0) == (False, 4)
    assert resp.parse(b",1.5\r\n", 0) == (1.5, 6)
    assert resp.parse(b"(12345678901234567890\r\n", 0)[0] == 12345678901234567890


@given(
    st.lists(
        st.lists(
            st.binary(max_size=40)
            | st.text(max_size=20)
            | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(["utf-8", "latin-1"]),
)
def test_commands_are_packed_as_redis_pys_python_packer_packs_them(
    commands: list[list[Any]], encoding: str
) -> None:
    # A command's name first: redis-py would split one with spaces in it ("CONFIG
    # GET"), which the store never sends.
    commands = [["SET", *command] for command in commands]
    if encoding == "latin-1":  # text latin-1 can write
        commands = [
            [a.encode("utf-8").decode("latin-1") if isinstance(a, str) else a for a in command]
            for command in commands
        ]
    encoder = Encoder(encoding, "strict", False)  # type: ignore[no-untyped-call]
    theirs = PythonRespSerializer(6000, encoder.encode)
    expected = b"".join(b"".join(theirs.pack(*command)) for command in commands)  # type: ignore[no-untyped-call]
    assert resp.pack(commands, encoding) == expected


def test_what_cannot_be_sent_is_a_data_error() -> None:
    for bad in (None, True, object()):
        with pytest.raises(DataError, match="Invalid input of type"):
            resp.pack([("SET", "k", bad)])
