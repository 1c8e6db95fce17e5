"""Turning a session into stored bytes and back: tagged JSON, never pickle.

Session values go through Flask's own tagged JSON serializer
(``flask.sessions.session_json_serializer``), so every type Flask's cookie
session accepts works unchanged: JSON types plus tuple, bytes, Markup, UUID
and datetime, and any tag an app registered on that serializer.  Anything
else fails at the write with :class:`~flask_cloakroom.errors.SessionNotSerializable`
naming the key.

A stored payload is one compact JSON document::

    {"c": created, "s": last seen - c, "a": login time - c, "u": user id,
     "r": remember, "ip": ..., "ua": ..., "lip": login IP if not "ip",
     "dev": device, "loc": location, "x": {extra}, "d": {data}}

with times in whole tenths of a second (``c`` since the Unix epoch, ``s`` and
``a`` after ``c``): integers, which write and parse faster than fractions of a
second and are no longer.  ``d`` maps each session key to its tagged value.
Keys are tagged one by one (the top-level dict is never itself tagged), which
is what lets concurrent writes be merged key by key.

The format version is ``"v"``, left out while it is 1 (every byte of a small
record counts in Redis: docs/redis.md).  ``"u"`` is left out when the caller
keeps the user id beside the payload (a store record's own user id, bound into
the associated data when the payload is sealed) and gives it back to
:meth:`Codec.decode`.
"""

from __future__ import annotations

import json
import json.scanner
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flask.json.tag import PassDict, PassList, TagDict, TaggedJSONSerializer, TagTuple

from .crypto import SEALED, Keyring
from .errors import RecordDecodeError, RecordTooLarge, SessionNotSerializable
from .session import Meta

FORMAT_VERSION = 1
#: How many sessions' last decoded payload a :class:`Codec` remembers by default
#: (see :meth:`Codec.decode`).
DECODED_CACHE_SIZE = 1024
#: Larger payloads are decoded every time (and never held).
DECODED_CACHE_MAX_PAYLOAD = 4096
_SEALED_BYTE = bytes((SEALED,))
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})
#: The first tags of Flask's serializer, in order: while they come first, a
#: plain list or dict (not a one-key dict named like a tag) is tagged item by item.
_DEFAULT_CONTAINER_TAGS = [TagDict, PassDict, TagTuple, PassList]
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_dumps = _ENCODER.encode
_loads = json.JSONDecoder().decode
#: The last tenth of a second of year 9999: a ``datetime`` holds no later time.
_MAX_TENTHS = 2_534_023_007_999
#: A JSON escape of a UTF-16 surrogate, which might be a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A payload field that is not there (None is a stored value).
_UNSET: Any = object()


def _payload_encoder() -> Callable[[Any], str]:
    """What ``_dumps`` does, for a payload document, for less.

    ``JSONEncoder.encode`` builds the C encoder anew on every call, a good part of
    the cost of encoding a small session; this builds it once.  It runs without
    the circular-reference check (whose state could not be shared between
    threads), so a value that contains itself raises :class:`RecursionError`
    rather than :class:`ValueError`.  Where the C encoder is missing, or takes
    other arguments, ``_dumps`` is used.
    """
    make = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed's stubs
    if make is None:  # pragma: no cover - CPython has the C encoder
        return _dumps
    try:
        encoder = make(
            None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",",
            False, False, True,
        )  # fmt: skip
        if "".join(encoder({"k": ["é", 1.5, None]}, 0)) != _dumps({"k": ["é", 1.5, None]}):
            return _dumps  # pragma: no cover - a C encoder unlike CPython 3.11-3.14's
    except TypeError:  # pragma: no cover - a C encoder taking other arguments
        return _dumps

    def encode(doc: Any) -> str:
        return "".join(encoder(doc, 0))

    return encode


_encode_payload = _payload_encoder()


def _payload_decoder() -> Callable[[str], Any]:
    """What ``_loads`` does, for a payload, with less around the C scanner.

    ``JSONDecoder.decode`` runs a regular expression on each side of the scan
    to skip whitespace; a payload has none.  The scan alone is used when it
    takes the whole text; anything else goes the long way, for its result or
    its error.
    """
    make = getattr(json.scanner, "c_make_scanner", None)  # not in typeshed's stubs
    if make is None:  # pragma: no cover - CPython has the C scanner
        return _loads
    scan = make(json.JSONDecoder())

    def decode(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return _loads(text)  # raises JSONDecodeError, unless after whitespace
        return value if end == len(text) else _loads(text)

    return decode


_decode_payload = _payload_decoder()


class Decoded(NamedTuple):
    """A decoded payload: its meta, its tagged data, and whether it is sealed under
    the current encryption key (``False`` for records a rekey should rewrite)."""

    meta: Meta
    raw: dict[str, Any]
    current: bool


#: Builds a :class:`Decoded` from a tuple: half the time of its constructor.
_new_decoded = tuple.__new__


class Codec:
    """Encodes sessions into payload bytes and decodes them back.

    With a :class:`~flask_cloakroom.crypto.Keyring` every payload is sealed
    (AES-256-GCM) with the caller's associated data (the record's key), and
    plaintext payloads are refused unless ``accept_plaintext`` is set.
    """

    __slots__ = (
        "_decoded",
        "_default_tags",
        "_fast_containers",
        "_order_seen",
        "_own_untag",
        "_serializer",
        "accept_plaintext",
        "decoded_cache_size",
        "keyring",
        "max_size",
    )

    def __init__(
        self,
        serializer: TaggedJSONSerializer,
        *,
        max_size: int,
        keyring: Keyring | None = None,
        accept_plaintext: bool = False,
        decoded_cache_size: int = DECODED_CACHE_SIZE,
    ) -> None:
        self._serializer = serializer
        self.max_size = max_size
        self.keyring = keyring
        self.accept_plaintext = accept_plaintext
        self._order_seen = -1
        self._fast_containers = False
        self._default_tags = False
        #: Whether the serializer's untag() is its own, not Flask's.
        self._own_untag = type(serializer).untag is not TaggedJSONSerializer.untag
        #: (associated data, user id) -> (the last payload decoded under them, its result)
        self._decoded: dict[tuple[bytes, str | None], tuple[bytes, Decoded]] = {}
        #: How many decoded payloads :meth:`decode` remembers (0: none).
        self.decoded_cache_size = decoded_cache_size

    @property
    def serializer(self) -> TaggedJSONSerializer:
        """The tagged JSON serializer in use (Flask's session serializer)."""
        return self._serializer

    # -- values ----------------------------------------------------------------

    def tag(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Return the tagged (JSON-ready) form of the session data, key by key."""
        if len(self._serializer.order) != self._order_seen:
            self._check_tags()
        tag = self._tag_value if self._fast_containers else self._serializer.tag
        plain = _PLAIN_TYPES
        out: dict[str, Any] = {}
        for key, value in data.items():
            if type(key) is not str and not isinstance(key, str):
                raise SessionNotSerializable(
                    str(key), f"session keys must be strings, got {type(key).__name__}"
                )
            if type(value) in plain:
                out[key] = value
                continue
            try:
                out[key] = tag(value)
            except RecursionError:
                raise SessionNotSerializable(
                    key, "the value contains itself, or is nested too deeply to store"
                ) from None
        return out

    def _check_tags(self) -> None:
        """Look at the serializer's tags again (callers do when their number changed).

        ``_fast_containers``: plain lists and dicts are tagged as Flask's own tags
        do it, unless an app registered a tag of its own ahead of Flask's list tag
        (which could claim lists or dicts).  ``_default_tags``: Flask's own tags
        and no others, whose tagged forms are always new containers of plain JSON
        values.
        """
        order = self._serializer.order
        self._order_seen = len(order)
        kinds = [type(t) for t in order]
        self._fast_containers = kinds[:4] == _DEFAULT_CONTAINER_TAGS
        self._default_tags = kinds == TaggedJSONSerializer.default_tags

    def _tag_value(self, value: Any) -> Any:
        """Flask's ``tag()`` for one value, with plain lists and dicts walked here.

        The serializer tries its tags one by one on every value, nested ones
        included; this gives the same JSON for much less on the usual session
        data (lists and dicts of strings and numbers).
        """
        kind = type(value)
        plain = _PLAIN_TYPES
        if kind in plain:
            return value
        tag = self._tag_value
        if kind is list:
            return [item if type(item) in plain else tag(item) for item in value]
        if kind is dict and (len(value) != 1 or next(iter(value)) not in self._serializer.tags):
            return {k: v if type(v) in plain else tag(v) for k, v in value.items()}
        return self._serializer.tag(value)

    def untag(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Return the Python values of tagged data (new containers, ``raw`` untouched).

        Raises :class:`RecordDecodeError` if a tagged value is malformed (a stored
        ``{" u": "not-a-uuid"}``, say) or nested too deeply to rebuild.
        """
        scan = self._untag_scan
        plain = _PLAIN_TYPES
        try:
            return {
                key: value if type(value) in plain else scan(value) for key, value in raw.items()
            }
        except Exception as error:  # Flask's tags trust their input: any error is a bad record
            raise RecordDecodeError(f"a tagged value is malformed: {error!r}") from error

    def _untag_scan(self, value: Any) -> Any:
        kind = type(value)
        plain = _PLAIN_TYPES
        scan = self._untag_scan
        if kind is dict:
            value = {k: v if type(v) in plain else scan(v) for k, v in value.items()}
            # Only a one-key dict can be a tagged value (when Flask's untag() is used).
            return self._serializer.untag(value) if len(value) == 1 or self._own_untag else value
        if kind is list:
            return [v if type(v) in plain else scan(v) for v in value]
        return value

    # -- payloads --------------------------------------------------------------

    def encode(
        self, meta: Meta, tagged: dict[str, Any], aad: bytes, *, user_id: str | None = None
    ) -> bytes:
        """Return the payload for ``meta`` and tagged data (sealed if there are keys).

        ``user_id`` is what the caller keeps beside the payload and will pass
        back to :meth:`decode` (a store record's user id).  When it is
        ``meta.user_id`` itself, the payload leaves the user id out; the caller
        binds it into ``aad``.

        The payload is remembered as :meth:`decode` remembers one, so the
        session's next read need not decode what was just written.  That is
        done only when decoding the payload would give back exactly ``meta``
        and ``tagged``: plain JSON values, and no tags an app registered.
        ``tagged`` is then held as it is, not copied: like the tagged data
        :meth:`decode` returns, it must not be changed in place afterwards.

        Raises :class:`SessionNotSerializable` naming the first key whose value
        is not serializable, and :class:`RecordTooLarge` past ``max_size``.
        """
        # Times in tenths of a second, "s" and "a" after "c": plenty for timeouts,
        # and every byte of a record counts in Redis.  Never negative: with app
        # servers whose clocks disagree, a session may be touched "before" it was
        # created, and such a record must stay readable.
        created = round(meta.created_at * 10)
        seen = max(0, round(meta.last_seen_at * 10) - created)
        doc: dict[str, Any] = {"c": created, "s": seen}
        auth = None if meta.auth_at is None else max(0, round(meta.auth_at * 10) - created)
        if auth is not None:
            doc["a"] = auth
        user = meta.user_id
        if user is not None and user != user_id:
            doc["u"] = user
        if meta.remember:
            doc["r"] = True
        ip = meta.ip
        if ip is not None:
            doc["ip"] = ip
        if meta.user_agent is not None:
            doc["ua"] = meta.user_agent
        # Left out in the usual case, the login IP being the IP; read back, a
        # missing "lip" is the IP of a logged-in session and None otherwise.
        login_ip = meta.login_ip
        if login_ip != ip and (auth is not None or login_ip is not None):
            doc["lip"] = login_ip
        else:
            login_ip = ip if auth is not None else None
        if meta.device is not None:
            doc["dev"] = meta.device
        if meta.location is not None:
            doc["loc"] = meta.location
        extra = meta.extra
        if extra:
            doc["x"] = extra
        doc["d"] = tagged
        try:
            payload = _encode_payload(doc).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as error:
            raise self._explain(tagged, error) from error
        if self.keyring is not None:
            payload = self.keyring.seal(payload, aad)
        if len(payload) > self.max_size:
            sizes = sorted(
                ((k, len(_dumps(v).encode("utf-8"))) for k, v in tagged.items()),
                key=lambda item: item[1],
                reverse=True,
            )
            raise RecordTooLarge(len(payload), self.max_size, sizes[:3])
        # Remember the payload as decode() would have read it.  The data and
        # "x" must be plain JSON values (_json_exact); the other fields are
        # checked as decoding checks them, so what is held is what it would build.
        if len(self._serializer.order) != self._order_seen:
            self._check_tags()
        if (
            self.decoded_cache_size > 0
            and len(payload) <= DECODED_CACHE_MAX_PAYLOAD
            and self._default_tags
            and _json_exact(tagged)
            and (not extra or _json_exact(extra))
        ):
            try:
                held = _checked_meta(
                    created, seen, auth, user if user is not None else user_id, meta.remember,
                    ip, meta.user_agent, login_ip, meta.device, meta.location, dict(extra),
                )  # fmt: skip
            except RecordDecodeError:
                return payload  # decoding would fail too: let the read find that out
            self._remember(aad, user_id, payload, _new_decoded(Decoded, (held, tagged, True)))
        return payload

    @staticmethod
    def _explain(tagged: dict[str, Any], error: Exception) -> Exception:
        for key, value in tagged.items():
            try:
                _dumps(value).encode("utf-8")
            except (TypeError, ValueError, RecursionError) as inner:
                return SessionNotSerializable(
                    key,
                    f"{inner}. Session values must be JSON types or tuple, bytes, Markup, "
                    "UUID or datetime (Flask's tagged JSON); store an id or a plain dict "
                    "instead of the object",
                )
        return error

    def decode(self, payload: bytes, aad: bytes, *, user_id: str | None = None) -> Decoded:
        """Return the meta and tagged data in a payload.

        ``user_id`` is the session's user when the payload leaves it out (see
        :meth:`encode`); a ``"u"`` in the payload comes first.  The meta is the
        caller's to change; the tagged data is shared and must not be changed
        in place (copy it first, as merges do).

        Raises :class:`RecordDecodeError` if the payload does not decrypt or is
        not a well-formed record of a format this version understands.

        The last payload that decoded (or that :meth:`encode` wrote) under each
        associated data and ``user_id`` (for a stored session: its key and user)
        is remembered, for up to ``decoded_cache_size`` sessions: a record read
        again unchanged (each version of a session is written once, then read by
        its requests until the next write) is compared byte for byte with the
        remembered payload instead of being decrypted, parsed and checked again.
        A new version replaces its session's entry; payloads that fail to decode
        are never remembered.
        """
        size = self.decoded_cache_size
        if size <= 0 or len(payload) > DECODED_CACHE_MAX_PAYLOAD:
            return self._decode(payload, aad, user_id)
        cache = self._decoded
        known = cache.get((aad, user_id))
        if known is not None and known[0] == payload:
            remembered = known[1]
            return _new_decoded(
                Decoded, (remembered.meta.copy(), remembered.raw, remembered.current)
            )
        decoded = self._decode(payload, aad, user_id)
        self._remember(
            aad,
            user_id,
            payload,
            _new_decoded(Decoded, (decoded.meta.copy(), decoded.raw, decoded.current)),
        )
        return decoded

    def _remember(self, aad: bytes, user_id: str | None, payload: bytes, decoded: Decoded) -> None:
        """Hold ``decoded`` (the caller's to give away) as the session's last payload."""
        cache = self._decoded
        if (aad, user_id) not in cache and len(cache) >= self.decoded_cache_size:
            cache.clear()  # every entry is one session's: start again, at O(1) a request
        cache[aad, user_id] = (payload, decoded)

    def _decode(self, payload: bytes, aad: bytes, user_id: str | None) -> Decoded:
        current = True
        if payload[:1] == _SEALED_BYTE:
            if self.keyring is None:
                raise RecordDecodeError(
                    "the record is encrypted, and CLOAKROOM_ENCRYPTION_KEYS is not set"
                )
            payload, current = self.keyring.open(payload, aad)
        elif self.keyring is not None:
            if not self.accept_plaintext:
                raise RecordDecodeError(
                    "the record is not encrypted, and CLOAKROOM_ENCRYPTION_KEYS is set "
                    "(while turning encryption on, CLOAKROOM_ENCRYPTION_ACCEPT_PLAINTEXT "
                    "lets such records be read)"
                )
            current = False
        try:
            doc = _decode_payload(payload.decode("utf-8"))
        except (ValueError, TypeError, RecursionError) as error:
            raise RecordDecodeError(f"not valid JSON: {error!r}") from error
        if type(doc) is not dict:
            raise RecordDecodeError("not a JSON object")
        if _SURROGATE_ESCAPE.search(payload) is not None and not _encodable(doc):
            # We never write such escapes (ensure_ascii=False); a lone surrogate
            # would load, then make every later write of the session fail.
            raise RecordDecodeError("a string holds a lone surrogate")
        return self._interpret(doc, user_id, current)

    @staticmethod
    def _interpret(doc: dict[str, Any], user_id: str | None, current: bool) -> Decoded:
        """Check a parsed payload's fields and build its :class:`Decoded`."""
        version = doc.get("v", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise RecordDecodeError(
                    f"written in format {version} by a newer Flask-Cloakroom; "
                    f"this one reads format {FORMAT_VERSION}"
                )
            raise RecordDecodeError(f"unknown format version {version!r}")
        try:
            created, seen, data = doc["c"], doc["s"], doc["d"]
        except KeyError as error:
            raise RecordDecodeError(f"missing field {error}") from error
        get = doc.get
        if type(data) is not dict:
            raise RecordDecodeError("a field has the wrong type")
        meta = _checked_meta(
            created, seen, get("a"), get("u", user_id), get("r", False), get("ip"),
            get("ua"), get("lip", _UNSET), get("dev"), get("loc"), get("x", {}),
        )  # fmt: skip
        return _new_decoded(Decoded, (meta, data, current))


def _checked_meta(
    created: Any,
    seen: Any,
    auth: Any,
    user_id: Any,
    remember: Any,
    ip: Any,
    user_agent: Any,
    login_ip: Any,
    device: Any,
    location: Any,
    extra: Any,
) -> Meta:
    """Check a payload's fields as stored and build the :class:`Meta` they describe.

    Times are in tenths of a second, ``seen`` and ``auth`` after ``created``
    (never before: a session may be seen "before" its creation by a server
    whose clock is behind, and is written as seen at it); a ``login_ip`` of
    ``_UNSET`` (not stored) is the IP of a logged-in session, else ``None``.
    Raises :class:`RecordDecodeError` if a field has the wrong type or a time
    lies outside 1970 to the year 9999 (past it, datetime conversions would fail).
    """
    # One pass of plain checks: this runs on every request.
    if login_ip is _UNSET:
        login_ip = ip if auth is not None else None
    if not (
        type(created) is int  # not a bool or a float (no tenths of a second)
        and type(seen) is int
        and 0 <= created <= _MAX_TENTHS
        and seen >= 0
        and created + seen <= _MAX_TENTHS
        and (auth is None or (type(auth) is int and auth >= 0 and created + auth <= _MAX_TENTHS))
        and (user_id is None or type(user_id) is str)
        and type(remember) is bool
        and (ip is None or type(ip) is str)
        and (user_agent is None or type(user_agent) is str)
        and (login_ip is None or type(login_ip) is str)
        and (device is None or type(device) is str)
        and (location is None or type(location) is str)
        and type(extra) is dict
    ):
        raise RecordDecodeError("a field has the wrong type")
    return Meta(  # positionally: a third of the time of keywords
        created / 10,  # created_at
        (created + seen) / 10,  # last_seen_at
        None if auth is None else (created + auth) / 10,  # auth_at
        user_id,
        remember,
        ip,
        user_agent,
        login_ip,
        device,
        location,
        extra,
    )


def _json_exact(value: Any) -> bool:
    """Whether ``value`` comes back from a JSON round trip exactly as it is: only
    ``str``, ``int``, ``float``, ``bool``, ``None``, lists and dicts with string
    keys (no subclasses: an ``IntEnum`` is written as a number and read as an ``int``)."""
    plain = _PLAIN_TYPES
    kind = type(value)
    # Loops, not all() over generators: this runs on every write.
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in plain and not _json_exact(item)):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110 - a loop, for speed (above)
            if type(item) not in plain and not _json_exact(item):
                return False
        return True
    return kind in plain


def _encodable(doc: Any) -> bool:
    try:
        _dumps(doc).encode("utf-8")
    except (UnicodeError, RecursionError):
        return False
    return True
