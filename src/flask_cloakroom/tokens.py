"""Session ids, their store keys, and the cookie that carries them.

* A session id is 32 random bytes from :mod:`secrets` (256 bits).
* The store never sees the id: records are keyed by :func:`store_key`, a
  SHA-256 hash of it, so a dump of the store holds no usable cookie.  The same
  hash, in hex, is the session's public *handle*.
* The cookie is ``<id>.<mac>``: the id in URL-safe base64 and an HMAC-SHA256
  tag (truncated to 128 bits) under a key derived from Flask's ``SECRET_KEY``.
  A cookie whose tag does not verify is rejected before any store lookup.
  ``SECRET_KEY_FALLBACKS`` verify older cookies, which are then re-issued under
  the current key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import NamedTuple

ID_BYTES = 32
_ID_TEXT_LEN = 43  # base64 of 32 bytes, unpadded
_MAC_BYTES = 16
_MAC_TEXT_LEN = 22  # base64 of 16 bytes, unpadded
COOKIE_LEN = _ID_TEXT_LEN + 1 + _MAC_TEXT_LEN
_KEY_CONTEXT = b"flask-cloakroom/cookie-mac/v1"
_HASH_CONTEXT = b"flask-cloakroom/store-key/v1:"


def new_session_id() -> bytes:
    """Return a fresh 256-bit session id."""
    return secrets.token_bytes(ID_BYTES)


def store_key(session_id: bytes) -> str:
    """Return the store key (and public handle) of a session id.

    128 bits of SHA-256 in hex: collision-free for any realistic number of
    sessions, and preimage resistant, so the key reveals nothing usable.
    """
    return hashlib.sha256(_HASH_CONTEXT + session_id).hexdigest()[:32]


_STORE_KEY = re.compile(r"[0-9a-f]{32}")


def is_store_key(value: str) -> bool:
    """Whether ``value`` has the shape of a store key / handle (32 lowercase hex)."""
    return _STORE_KEY.fullmatch(value) is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac_key(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.digest(raw, _KEY_CONTEXT, "sha256")


class Unsigned(NamedTuple):
    """A verified cookie: the session id, whether it was signed by a fallback key, and
    the id's :func:`store_key` (worked out once, with the verification)."""

    session_id: bytes
    stale_key: bool
    key: str


#: How many verified cookies a signer remembers (about 300 bytes each).
VERIFIED_CACHE_SIZE = 4096


class CookieSigner:
    """Signs and verifies session cookies under ``SECRET_KEY`` and its fallbacks.

    Cookies that verified are remembered (up to :data:`VERIFIED_CACHE_SIZE`), so
    a browser's next requests skip the HMAC, base64 and store-key hashing work.
    What is remembered is only "this exact text carries a valid tag", which stays
    true as long as the keys do (a signer's keys never change); forged cookies are
    never remembered, so they cannot fill the cache.
    """

    __slots__ = ("_keys", "_verified")

    def __init__(self, secret_keys: Sequence[str | bytes]) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        self._keys = tuple(_mac_key(k) for k in secret_keys)
        self._verified: dict[str, Unsigned] = {}

    def sign(self, session_id: bytes) -> str:
        """Return the cookie value for ``session_id`` under the current key."""
        text = _b64(session_id)
        tag = hmac.digest(self._keys[0], text.encode("ascii"), "sha256")[:_MAC_BYTES]
        return f"{text}.{_b64(tag)}"

    def unsign(self, value: str) -> Unsigned | None:
        """Return the session id in a cookie value, or ``None`` if it does not verify.

        Costs a few microseconds (a dictionary lookup for a cookie seen before)
        and never touches a store.
        """
        known = self._verified.get(value)
        if known is not None:
            return known
        if len(value) != COOKIE_LEN or value[_ID_TEXT_LEN] != "." or not value.isascii():
            return None
        text = value[:_ID_TEXT_LEN].encode("ascii")
        tag = value[_ID_TEXT_LEN + 1 :]
        for index, key in enumerate(self._keys):
            # Compare the tag as text: a non-canonical base64 spelling of the right
            # bytes is refused too, so a cookie has exactly one valid form.
            expected = _b64(hmac.digest(key, text, "sha256")[:_MAC_BYTES])
            if hmac.compare_digest(expected, tag):
                try:
                    session_id = base64.urlsafe_b64decode(text + b"=")
                except ValueError:  # pragma: no cover - we signed it, so it decodes
                    return None
                verified = Unsigned(session_id, index > 0, store_key(session_id))
                if len(self._verified) >= VERIFIED_CACHE_SIZE:
                    self._verified.clear()  # simple and rare: once per that many new cookies
                self._verified[value] = verified
                return verified
        return None
