"""The codec's and the cookie signer's shortcuts give exactly what the long way gives.

The request path tags plain lists and dicts itself instead of asking Flask's
serializer to try every tag on every nested value, and remembers cookies that
verified.  These tests hold the shortcuts to the long way's results.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from flask.json.tag import JSONTag, TaggedJSONSerializer
from flask.sessions import session_json_serializer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from flask_cloakroom import Cloakroom, RecordDecodeError, SessionNotSerializable
from flask_cloakroom.codec import (
    DECODED_CACHE_MAX_PAYLOAD,
    Codec,
    _decode_payload,
    _encode_payload,
    _json_exact,
)
from flask_cloakroom.crypto import Keyring, generate_key, parse_key
from flask_cloakroom.session import Meta
from flask_cloakroom.tokens import VERIFIED_CACHE_SIZE, CookieSigner, new_session_id, store_key

_TAG_KEYS = sorted(session_json_serializer.tags)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.uuids(),
    st.builds(Markup, st.text(max_size=8)),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=0)),
)
_keys = st.one_of(st.text(max_size=6), st.sampled_from(_TAG_KEYS))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_keys, inner, max_size=3),
    ),
    max_leaves=12,
)


def _flask_tagged(data: dict[str, Any], serializer: TaggedJSONSerializer) -> dict[str, Any]:
    return {key: serializer.tag(value) for key, value in data.items()}


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.dictionaries(st.text(max_size=6), _values, max_size=4))
def test_tagging_matches_flasks_serializer(data: dict[str, Any]) -> None:
    codec = Codec(session_json_serializer, max_size=1 << 20)
    tagged = codec.tag(data)
    assert codec._fast_containers, "the shortcut must be on with Flask's own tags"
    assert json.dumps(tagged) == json.dumps(_flask_tagged(data, session_json_serializer))
    assert codec.untag(json.loads(json.dumps(tagged))) == codec.untag(
        json.loads(json.dumps(_flask_tagged(data, session_json_serializer)))
    )
    # Untagging (which skips Flask's untag() on dicts that cannot be tagged values)
    # gives what Flask's own loads() gives.
    assert codec.untag(json.loads(json.dumps(tagged))) == {
        key: session_json_serializer.loads(json.dumps(value)) for key, value in tagged.items()
    }


class _UntagsPairs(TaggedJSONSerializer):
    """A serializer whose untag() also rebuilds two-key dicts ({"a": x, "b": y} -> (x, y))."""

    def untag(self, value: dict[str, Any]) -> Any:
        if set(value) == {"a", "b"}:
            return (value["a"], value["b"])
        return super().untag(value)


def test_a_serializers_own_untag_sees_every_dict() -> None:
    codec = Codec(_UntagsPairs(), max_size=1 << 20)
    assert codec.untag({"p": {"a": 1, "b": [{"a": 2, "b": 3}]}, "q": {"a": 1}}) == {
        "p": (1, [(2, 3)]),
        "q": {"a": 1},
    }


_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # NaN and infinities too: written as Python's json writes them
        st.text(max_size=8),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_json_values)
def test_the_payload_encoder_writes_what_json_writes(value: Any) -> None:
    """The payload's JSON is written by a C encoder built once (codec._encode_payload),
    not by JSONEncoder.encode: the text is the same, byte for byte."""
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert _encode_payload(value) == expected
    assert _encode_payload({"d": value, "x": [value]}) == json.dumps(
        {"d": value, "x": [value]}, separators=(",", ":"), ensure_ascii=False
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_json_values, st.sampled_from(["", " ", "\n\t"]), st.sampled_from(["", " ", "x", "}"]))
def test_the_payload_decoder_reads_what_json_reads(value: Any, before: str, after: str) -> None:
    """Payloads are parsed by the C scanner alone where it takes the whole text
    (codec._decode_payload): same values as json.loads, same errors."""
    text = before + json.dumps(value) + after

    def outcome(decode: Any) -> tuple[str, Any]:
        try:
            return "value", json.dumps(decode(text))
        except json.JSONDecodeError as error:
            return "error", (error.msg, error.pos)

    assert outcome(_decode_payload) == outcome(json.loads)


def test_a_value_that_contains_itself_fails_naming_its_key() -> None:
    codec = Codec(session_json_serializer, max_size=1 << 20)
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_000)
    loop: list[Any] = ["a"]
    loop.append(loop)
    with pytest.raises(SessionNotSerializable) as caught:
        codec.tag({"ok": 1, "loop": loop})
    assert caught.value.key == "loop"
    # Past tag() (an app's own tag can return such a value): encode() names the key too.
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(SessionNotSerializable) as caught:
        codec.encode(meta, {"ok": 1, "odd": {"inner": looped}}, b"key")
    assert caught.value.key == "odd"
    assert isinstance(caught.value, TypeError)


class _Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Point) and other.x == self.x

    def __hash__(self) -> int:
        return self.x


class _TagPoint(JSONTag):
    key = " pt"

    def check(self, value: Any) -> bool:
        return isinstance(value, _Point)

    def to_json(self, value: Any) -> Any:
        return value.x

    def to_python(self, value: Any) -> Any:
        return _Point(value)


class _TagPairList(JSONTag):
    """Claims two-item lists: only correct if it runs before Flask's list tag."""

    key = " pair"

    def check(self, value: Any) -> bool:
        return type(value) is list and len(value) == 2

    def to_json(self, value: Any) -> Any:
        return f"{value[0]}|{value[1]}"

    def to_python(self, value: Any) -> Any:
        first, second = value.split("|")
        return [first, second]


def test_an_apps_own_tags_are_used_inside_lists_and_dicts() -> None:
    serializer = TaggedJSONSerializer()
    serializer.register(_TagPoint)  # after Flask's tags: the shortcut stays on
    codec = Codec(serializer, max_size=1 << 20)
    data = {"points": [_Point(1), {"p": _Point(2)}], "n": 3}
    tagged = codec.tag(data)
    assert codec._fast_containers
    assert tagged == {"points": [{" pt": 1}, {"p": {" pt": 2}}], "n": 3}
    assert codec.untag(tagged) == data


def test_a_tag_registered_ahead_of_flasks_list_tag_turns_the_shortcut_off() -> None:
    serializer = TaggedJSONSerializer()
    codec = Codec(serializer, max_size=1 << 20)
    assert codec.tag({"l": ["a", "b"]}) == {"l": ["a", "b"]}
    assert codec._fast_containers
    serializer.register(_TagPairList, index=0)  # registered after the codec was made
    tagged = codec.tag({"l": ["a", "b"], "nested": {"x": ["c", "d"]}})
    assert not codec._fast_containers
    assert tagged == {"l": {" pair": "a|b"}, "nested": {"x": {" pair": "c|d"}}}
    assert codec.untag(tagged) == {"l": ["a", "b"], "nested": {"x": ["c", "d"]}}


def test_everyday_values_round_trip() -> None:
    codec = Codec(session_json_serializer, max_size=1 << 20)
    when = datetime(2026, 11, 26, 1, 2, 3, tzinfo=UTC)
    ident = uuid.uuid4()
    data = {
        "cart": ["tea", 2, 3.5, None, True],
        "prefs": {"theme": "dark", " t": "a key named like a tag"},
        "escaped": {" t": [1, 2]},  # a one-key dict named like a tag is escaped
        "pair": (1, "x"),
        "raw": b"\x00\xff",
        "html": Markup("<b>hi</b>"),
        "when": when,
        "id": ident,
    }
    meta = Meta(created_at=1_795_000_000.0, last_seen_at=1_795_000_000.0)
    payload = codec.encode(meta, codec.tag(data), b"aad")
    decoded = codec.decode(payload, b"aad")
    assert codec.untag(decoded.raw) == data


def test_a_session_touched_before_it_was_created_stays_readable() -> None:
    """App servers whose clocks disagree: the touch time is written as no earlier
    than creation, not as a negative offset (which would make the record unreadable)."""
    codec = Codec(session_json_serializer, max_size=1 << 20)
    meta = Meta(created_at=1_795_000_010.0, last_seen_at=1_795_000_008.5, auth_at=1_795_000_009.0)
    decoded = codec.decode(codec.encode(meta, {}, b"k"), b"k")
    assert decoded.meta.created_at == 1_795_000_010.0
    assert decoded.meta.last_seen_at == 1_795_000_010.0
    assert decoded.meta.auth_at == 1_795_000_010.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("s", -1),
        ("a", -5),
        ("s", 10**13),
        ("c", True),
        ("c", "1"),
        ("s", float("nan")),
        ("c", 17_950_000_000.5),
        ("a", 1.0),
        ("c", -1),
    ],
)
def test_stored_times_out_of_range_are_refused(field: str, value: Any) -> None:
    """Times are whole tenths of a second from 1970 to the year 9999."""
    codec = Codec(session_json_serializer, max_size=1 << 20)
    doc: dict[str, Any] = {"v": 1, "c": 17_950_000_000, "s": 1, "a": 0, "d": {}}
    assert codec.decode(json.dumps(doc).encode(), b"k").meta.last_seen_at == 1_795_000_000.1
    doc[field] = value
    with pytest.raises(RecordDecodeError, match="wrong type"):
        codec.decode(json.dumps(doc).encode(), b"k")


def test_the_payload_leaves_out_what_the_record_keeps_beside_it() -> None:
    """No format version while it is 1, no user id when the caller keeps it (and a
    record written with "v" and "u" in it still reads)."""
    codec = Codec(session_json_serializer, max_size=1 << 20)
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_000, auth_at=1_795_000_000)
    meta.user_id = "user-42"
    kept = json.loads(codec.encode(meta, {"theme": "dark"}, b"k"))
    assert kept == {"c": 17_950_000_000, "s": 0, "a": 0, "u": "user-42", "d": {"theme": "dark"}}
    left_out = codec.encode(meta, {"theme": "dark"}, b"k", user_id="user-42")
    assert b"user-42" not in left_out and b'"v"' not in left_out
    assert codec.decode(left_out, b"k").meta.user_id is None
    assert codec.decode(left_out, b"k", user_id="user-42").meta.user_id == "user-42"
    # A "u" in the payload comes first (the caller's is an index value then).
    assert codec.decode(json.dumps(kept).encode(), b"k", user_id="h:1f").meta.user_id == "user-42"
    older = json.dumps({"v": 1, **kept}).encode()
    assert codec.decode(older, b"k").meta == codec.decode(json.dumps(kept).encode(), b"k").meta
    with pytest.raises(RecordDecodeError, match="format 2 by a newer"):
        codec.decode(json.dumps({"v": 2, **kept}).encode(), b"k")


def test_a_sealed_payload_names_no_key_and_opens_under_any_configured_one() -> None:
    old, new = parse_key(generate_key()), parse_key(generate_key())
    plaintext = b'{"c":1,"s":0,"d":{}}'
    sealed = Keyring([old]).seal(plaintext, b"aad")
    # marker, nonce, ciphertext, tag: nothing else, so no key id in the record
    assert len(sealed) == 1 + 12 + len(plaintext) + 16
    assert old[0].encode() not in sealed
    rotated = Keyring([new, old])
    assert rotated.open(sealed, b"aad") == (plaintext, False)  # opened by an older key
    assert rotated.open(rotated.seal(plaintext, b"aad"), b"aad") == (plaintext, True)
    with pytest.raises(RecordDecodeError, match="does not open under any key"):
        Keyring([new]).open(sealed, b"aad")  # its key was dropped
    with pytest.raises(RecordDecodeError, match="does not open under any key"):
        rotated.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad")
    with pytest.raises(RecordDecodeError, match="does not open under any key"):
        rotated.open(sealed, b"other aad")
    with pytest.raises(RecordDecodeError, match="truncated"):
        rotated.open(sealed[:28], b"aad")


def test_a_payload_read_again_is_remembered_and_never_shared_or_stale() -> None:
    keyring = Keyring([parse_key(generate_key())])
    codec = Codec(session_json_serializer, max_size=1 << 20, keyring=keyring)
    # Written elsewhere (another process): this codec has not seen the payloads.
    writer = Codec(session_json_serializer, max_size=1 << 20, keyring=keyring)
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_000, extra={"fp": "a"})
    first = writer.encode(meta, {"cart": ["tea"]}, b"key-1")
    one = codec.decode(first, b"key-1", user_id="u1")
    one.meta.last_seen_at += 60  # the caller's to change...
    one.meta.extra["fp"] = "changed"
    stored = Meta(1_795_000_000, 1_795_000_000, user_id="u1", extra={"fp": "a"})
    two = codec.decode(first, b"key-1", user_id="u1")
    assert two.meta == stored and two.raw == {"cart": ["tea"]}
    two.meta.remember = True  # a remembered one is the caller's to change too
    two.meta.extra["fp"] = "changed"
    assert codec.decode(first, b"key-1", user_id="u1").meta == stored
    assert codec._decoded[b"key-1", "u1"][0] is first  # ...and it came from memory
    # A new version of the session replaces its entry; the old one is decoded afresh.
    meta.last_seen_at += 30
    second = writer.encode(meta, {"cart": ["tea", "pen"]}, b"key-1")
    assert codec.decode(second, b"key-1", user_id="u1").raw == {"cart": ["tea", "pen"]}
    assert list(codec._decoded) == [(b"key-1", "u1")]
    assert codec.decode(first, b"key-1", user_id="u1").raw == {"cart": ["tea"]}
    # Nothing that fails is remembered, and a remembered payload opens nothing else.
    altered = second[:-1] + bytes([second[-1] ^ 1])
    for payload, aad in ((altered, b"key-1"), (first, b"key-2")):
        with pytest.raises(RecordDecodeError, match="does not open"):
            codec.decode(payload, aad, user_id="u1")
    assert codec.decode(first, b"key-1", user_id="u2").meta.user_id == "u2"
    assert set(codec._decoded) == {(b"key-1", "u1"), (b"key-1", "u2")}


def test_the_decoded_payload_memory_is_bounded_and_can_be_off() -> None:
    codec = Codec(session_json_serializer, max_size=1 << 20)
    writer = Codec(session_json_serializer, max_size=1 << 20, decoded_cache_size=0)
    codec.decoded_cache_size = 3
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_000)
    payloads = [(writer.encode(meta, {"i": i}, b""), b"key-%d" % i) for i in range(8)]
    for payload, aad in payloads:
        assert codec.decode(payload, aad).raw == {"i": int(aad[4:])}
        assert 1 <= len(codec._decoded) <= 3
    big = writer.encode(meta, {"blob": "x" * DECODED_CACHE_MAX_PAYLOAD}, b"")
    codec._decoded.clear()
    codec.decode(big, b"key-big")
    assert not codec._decoded  # too large to hold
    codec.decoded_cache_size = 0
    codec.decode(*payloads[0])
    assert not codec._decoded


class _Level(enum.IntEnum):
    GOLD = 1


class _Name(str):
    pass


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1 == _Level.GOLD`` is not
    enough: the next request would see an ``IntEnum`` where a read gives an ``int``)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Meta):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Meta))
    return bool(a == b)


_unusual = st.one_of(
    st.just(_Level.GOLD),
    st.builds(_Name, st.text(max_size=4)),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
)
_texts = st.none() | st.text(max_size=6)
_times = st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False)
_metas = st.builds(
    Meta,
    created_at=_times,
    last_seen_at=_times,
    auth_at=st.none() | _times,
    user_id=_texts,
    remember=st.booleans(),
    ip=_texts,
    user_agent=_texts,
    login_ip=_texts,
    device=_texts,
    location=_texts,
    extra=st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.booleans(), max_size=2),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    _metas,
    st.dictionaries(st.text(max_size=6), _values | _unusual, max_size=4),
    st.booleans(),
    st.booleans(),
)
def test_a_payload_just_written_reads_back_as_a_fresh_decode_gives_it(
    meta: Meta, data: dict[str, Any], keep_user: bool, sealed: bool
) -> None:
    """What encode() remembers is what decoding the payload gives, to the types:
    either the next read is served from memory with exactly that, or nothing was
    remembered (values a JSON round trip would change) and the read decodes."""
    keyring = Keyring([parse_key(generate_key())]) if sealed else None
    codec = Codec(session_json_serializer, max_size=1 << 20, keyring=keyring)
    fresh = Codec(session_json_serializer, max_size=1 << 20, keyring=keyring, decoded_cache_size=0)
    user = meta.user_id if keep_user else None
    try:
        payload = codec.encode(meta, codec.tag(data), b"key", user_id=user)
    except Exception:  # values no payload can hold: nothing to read back
        assume(False)
    meta.extra["changed"] = True  # the caller's meta is not held
    expected = fresh.decode(payload, b"key", user_id=user)
    remembered = codec._decoded.get((b"key", user))
    if remembered is not None:
        assert remembered[0] is payload
        got = codec.decode(payload, b"key", user_id=user)
        assert _same(got.meta, expected.meta) and _same(got.raw, expected.raw)
        assert got.current == expected.current
    else:
        assert not _json_exact({"x": meta.extra, "d": codec.tag(data)}) or len(payload) > 4096


def test_what_a_json_round_trip_would_change_is_not_remembered() -> None:
    codec = Codec(session_json_serializer, max_size=1 << 20)
    meta = Meta(created_at=1_795_000_000.25, last_seen_at=1_795_000_100)
    plain = {"cart": ["tea"], "prefs": {"theme": "dark"}, "n": 1, "when": datetime.now(UTC)}
    payload = codec.encode(meta, codec.tag(plain), b"plain")
    assert codec._decoded[b"plain", None][0] is payload  # tagged values are plain JSON
    assert codec.decode(payload, b"plain").meta.created_at == 1_795_000_000.2
    for number, value in enumerate(([_Level.GOLD], {"d": {1: "a"}}, _Name("x"))):
        aad = b"odd-%d" % number
        codec.encode(meta, codec.tag({"v": value}), aad)
        assert (aad, None) not in codec._decoded
        assert codec.decode(codec.encode(meta, codec.tag({"v": value}), aad), aad).raw["v"] in (
            [1],
            {"d": {"1": "a"}},
            "x",
        )


def test_with_an_app_registered_tag_nothing_written_is_remembered() -> None:
    serializer = TaggedJSONSerializer()

    class TagSet(JSONTag):
        key = " set"

        def check(self, value: Any) -> bool:
            return isinstance(value, set)

        def to_json(self, value: Any) -> Any:
            return sorted(value)

        def to_python(self, value: Any) -> Any:
            return set(value)

    serializer.register(TagSet)
    codec = Codec(serializer, max_size=1 << 20)
    meta = Meta(created_at=1_795_000_000, last_seen_at=1_795_000_000)
    payload = codec.encode(meta, codec.tag({"cart": ["tea"]}), b"key")
    assert not codec._decoded
    assert codec.untag(codec.decode(payload, b"key").raw) == {"cart": ["tea"]}


def test_verified_cookies_are_remembered_and_forged_ones_are_not() -> None:
    signer = CookieSigner(["k" * 32, "old" * 11])
    old_signer = CookieSigner(["old" * 11])
    session_id = new_session_id()
    value = signer.sign(session_id)
    first = signer.unsign(value)
    assert first is not None and first.session_id == session_id and not first.stale_key
    assert first.key == store_key(session_id)
    assert signer.unsign(value) is first  # from the cache
    stale = old_signer.sign(session_id)
    assert signer.unsign(stale) == (session_id, True, store_key(session_id))
    assert signer.unsign(stale) == (session_id, True, store_key(session_id))  # cached, stale
    forged = value[:-1] + ("A" if value[-1] != "A" else "B")
    for _ in range(3):
        assert signer.unsign(forged) is None
    assert forged not in signer._verified
    # A signer under other keys never accepts it, whatever another signer remembered.
    assert CookieSigner(["z" * 32]).unsign(value) is None


def test_the_verified_cookie_cache_is_bounded() -> None:
    signer = CookieSigner(["k" * 32])
    for _ in range(VERIFIED_CACHE_SIZE + 10):
        assert signer.unsign(signer.sign(new_session_id())) is not None
    assert 0 < len(signer._verified) <= VERIFIED_CACHE_SIZE


def test_the_decoded_payload_memory_follows_the_setting() -> None:
    sizes = []
    for config in ({}, {"CLOAKROOM_DECODED_CACHE_SIZE": 0}, {"CLOAKROOM_STORE": "cookie://"}):
        app = Flask(__name__)
        app.config.update({"SECRET_KEY": "s" * 32, "CLOAKROOM_STORE": "memory://", **config})
        Cloakroom(app)
        sizes.append(app.extensions["cloakroom"].codec.decoded_cache_size)
    assert sizes == [1024, 0, 0]  # cookie mode: no session key to remember a payload by


def test_a_copied_meta_has_every_field_and_its_own_extra() -> None:
    """Meta.copy() names its fields one by one (it runs on every read): a field added
    to Meta and not to copy() fails here."""
    values: dict[str, Any] = {}
    for number, item in enumerate(dataclasses.fields(Meta)):
        values[item.name] = {"k": "v"} if item.name == "extra" else f"value-{number}"
    meta = Meta(**values)
    copy = meta.copy()
    assert copy == meta and copy.extra is not meta.extra
