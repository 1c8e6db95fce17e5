"""Turning a session into stored bytes and back: tagged JSON, never pickle.

Session values go through Flask's own tagged JSON serializer
(``flask.sessions.session_json_serializer``), so every type Flask's cookie
session accepts works unchanged: JSON types plus tuple, bytes, Markup, UUID
and datetime, and any tag an app registered on that serializer.  Anything
else fails at the write with :class:`~flask_cloakroom.errors.SessionNotSerializable`
naming the key.

A stored payload is one compact JSON document (format version 1)::

    {"v": 1, "c": created, "s": last seen - c, "a": login time - c, "u": user id,
     "r": remember, "ip": ..., "ua": ..., "lip": login IP if not "ip",
     "dev": device, "loc": location, "x": {extra}, "d": {data}}

with times to a tenth of a second.

where ``d`` maps each session key to its tagged value.  Keys are tagged one by
one (the top-level dict is never itself tagged), which is what lets
concurrent writes be merged key by key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from flask.json.tag import TaggedJSONSerializer

from .crypto import SEALED, Keyring
from .errors import RecordDecodeError, RecordTooLarge, SessionNotSerializable
from .session import Meta

FORMAT_VERSION = 1
_SEALED_BYTE = bytes((SEALED,))
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: The last second of year 9999, the largest time a ``datetime`` can hold.
_MAX_TIME = 253_402_300_799
#: A JSON escape of a UTF-16 surrogate, which might be a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class Decoded(NamedTuple):
    """A decoded payload: its meta, its tagged data, and whether it is sealed under
    the current encryption key (``False`` for records a rekey should rewrite)."""

    meta: Meta
    raw: dict[str, Any]
    current: bool


class Codec:
    """Encodes sessions into payload bytes and decodes them back.

    With a :class:`~flask_cloakroom.crypto.Keyring` every payload is sealed
    (AES-256-GCM) with the caller's associated data (the record's key), and
    plaintext payloads are refused unless ``accept_plaintext`` is set.
    """

    __slots__ = ("_serializer", "accept_plaintext", "keyring", "max_size")

    def __init__(
        self,
        serializer: TaggedJSONSerializer,
        *,
        max_size: int,
        keyring: Keyring | None = None,
        accept_plaintext: bool = False,
    ) -> None:
        self._serializer = serializer
        self.max_size = max_size
        self.keyring = keyring
        self.accept_plaintext = accept_plaintext

    @property
    def serializer(self) -> TaggedJSONSerializer:
        """The tagged JSON serializer in use (Flask's session serializer)."""
        return self._serializer

    # -- values ----------------------------------------------------------------

    def tag(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Return the tagged (JSON-ready) form of the session data, key by key."""
        tag = self._serializer.tag
        out: dict[str, Any] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise SessionNotSerializable(
                    str(key), f"session keys must be strings, got {type(key).__name__}"
                )
            out[key] = value if type(value) in _PLAIN_TYPES else tag(value)
        return out

    def untag(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Return the Python values of tagged data (new containers, ``raw`` untouched).

        Raises :class:`RecordDecodeError` if a tagged value is malformed (a stored
        ``{" u": "not-a-uuid"}``, say) or nested too deeply to rebuild.
        """
        scan = self._untag_scan
        try:
            return {key: scan(value) for key, value in raw.items()}
        except Exception as error:  # Flask's tags trust their input: any error is a bad record
            raise RecordDecodeError(f"a tagged value is malformed: {error!r}") from error

    def _untag_scan(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            return self._serializer.untag({k: self._untag_scan(v) for k, v in value.items()})
        if kind is list:
            return [self._untag_scan(v) for v in value]
        return value

    # -- payloads --------------------------------------------------------------

    def encode(self, meta: Meta, tagged: dict[str, Any], aad: bytes) -> bytes:
        """Return the payload for ``meta`` and tagged data (sealed if there are keys).

        Raises :class:`SessionNotSerializable` naming the first key whose value
        is not serializable, and :class:`RecordTooLarge` past ``max_size``.
        """
        # Times are kept to a tenth of a second, "s" and "a" as offsets from "c":
        # plenty for timeouts, and every byte of a record counts in Redis.
        created = round(meta.created_at, 1)
        doc: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "c": created,
            "s": _offset(meta.last_seen_at, created),
        }
        if meta.auth_at is not None:
            doc["a"] = _offset(meta.auth_at, created)
        if meta.user_id is not None:
            doc["u"] = meta.user_id
        if meta.remember:
            doc["r"] = True
        if meta.ip is not None:
            doc["ip"] = meta.ip
        if meta.user_agent is not None:
            doc["ua"] = meta.user_agent
        if meta.login_ip != meta.ip and (meta.auth_at is not None or meta.login_ip is not None):
            doc["lip"] = meta.login_ip  # left out in the usual case: the login IP is the IP
        if meta.device is not None:
            doc["dev"] = meta.device
        if meta.location is not None:
            doc["loc"] = meta.location
        if meta.extra:
            doc["x"] = meta.extra
        doc["d"] = tagged
        try:
            payload = _dumps(doc).encode("utf-8")
        except (TypeError, ValueError) as error:
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
        return payload

    @staticmethod
    def _explain(tagged: dict[str, Any], error: Exception) -> Exception:
        for key, value in tagged.items():
            try:
                _dumps(value).encode("utf-8")
            except (TypeError, ValueError) as inner:
                return SessionNotSerializable(
                    key,
                    f"{inner}. Session values must be JSON types or tuple, bytes, Markup, "
                    "UUID or datetime (Flask's tagged JSON); store an id or a plain dict "
                    "instead of the object",
                )
        return error

    def decode(self, payload: bytes, aad: bytes) -> Decoded:
        """Return the meta and tagged data in a payload.

        Raises :class:`RecordDecodeError` if the payload does not decrypt or is
        not a well-formed record of a format this version understands.
        """
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
            doc = json.loads(payload)
        except (ValueError, TypeError, RecursionError) as error:
            raise RecordDecodeError(f"not valid JSON: {error!r}") from error
        if type(doc) is not dict:
            raise RecordDecodeError("not a JSON object")
        if _SURROGATE_ESCAPE.search(payload) is not None and not _encodable(doc):
            # We never write such escapes (ensure_ascii=False); a lone surrogate
            # would load, then make every later write of the session fail.
            raise RecordDecodeError("a string holds a lone surrogate")
        version = doc.get("v")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise RecordDecodeError(
                    f"written in format {version} by a newer Flask-Cloakroom; "
                    f"this one reads format {FORMAT_VERSION}"
                )
            raise RecordDecodeError(f"unknown format version {version!r}")
        try:
            created, seen, data = doc["c"], doc["s"], doc["d"]
            auth_at = doc.get("a")
            if _is_time(created) and _is_time(seen):
                seen = created + seen
                if auth_at is not None and _is_time(auth_at):
                    auth_at = created + auth_at
            user_id = doc.get("u")
            extra = doc.get("x", {})
            meta = Meta(
                created_at=created,
                last_seen_at=seen,
                auth_at=auth_at,
                user_id=user_id,
                remember=doc.get("r", False),
                ip=doc.get("ip"),
                user_agent=doc.get("ua"),
                login_ip=doc.get("lip", doc.get("ip") if auth_at is not None else None),
                device=doc.get("dev"),
                location=doc.get("loc"),
                extra=extra,
            )
        except KeyError as error:
            raise RecordDecodeError(f"missing field {error}") from error
        if not (
            _is_time(created)
            and _is_time(seen)
            and (auth_at is None or _is_time(auth_at))
            and (user_id is None or type(user_id) is str)
            and type(meta.remember) is bool
            and _optional_str(meta.ip)
            and _optional_str(meta.user_agent)
            and _optional_str(meta.login_ip)
            and _optional_str(meta.device)
            and _optional_str(meta.location)
            and type(extra) is dict
            and type(data) is dict
        ):
            raise RecordDecodeError("a field has the wrong type")
        return Decoded(meta, data, current)


def _offset(moment: float, base: float) -> float | int:
    """``moment - base`` to a tenth of a second, written as briefly as JSON allows."""
    tenths = round((moment - base) * 10)
    return tenths // 10 if tenths % 10 == 0 else tenths / 10


def _is_time(value: Any) -> bool:
    # A range check, not math.isfinite(): that raises OverflowError on a huge int,
    # and a time past year 9999 would break datetime conversions later on.
    return type(value) in (float, int) and 0 <= value <= _MAX_TIME


def _encodable(doc: Any) -> bool:
    try:
        _dumps(doc).encode("utf-8")
    except (UnicodeError, RecursionError):
        return False
    return True


def _optional_str(value: Any) -> bool:
    return value is None or type(value) is str
