"""Authenticated encryption of session payloads: AES-256-GCM with a rotating keyring.

A sealed payload is::

    0x01 | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext + tag

The associated data is chosen by the caller: the record's store key for stored
sessions, so a record copied onto another session's key does not decrypt.
The first key of a :class:`Keyring` encrypts; every key decrypts, so keys can be
rotated by adding a new one in front and dropping the old one once nothing
needs it (see ``rekey``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import RecordDecodeError

#: The first byte of a sealed payload (a plain JSON payload starts with ``{``).
SEALED = 0x01
_NONCE = 12
_MAX_KID = 32


def generate_key() -> str:
    """Return a new random encryption key, ready for ``CLOAKROOM_ENCRYPTION_KEYS``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")


def key_id(key: bytes) -> str:
    """The default id of a key: a short hash of it (reveals nothing usable)."""
    return hashlib.sha256(b"flask-cloakroom/key-id:" + key).hexdigest()[:8]


def derive_key(secret: str | bytes, purpose: str) -> bytes:
    """Derive a 32-byte key for ``purpose`` from a secret such as ``SECRET_KEY``."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.digest(raw, b"flask-cloakroom/derive:" + purpose.encode("ascii"), "sha256")


def parse_key(text: str) -> tuple[str, bytes]:
    """Parse ``"key"`` or ``"id:key"`` into ``(id, 32 key bytes)``.

    Raises :class:`ValueError` with a message fit for the user.
    """
    if not isinstance(text, str):
        raise ValueError(f"a key must be text, got {type(text).__name__}")
    kid, _, encoded = text.rpartition(":")
    try:
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("a key must be URL-safe base64 (make one with generate_key())") from None
    if len(key) != 32:
        raise ValueError(
            f"a key must be 32 random bytes in URL-safe base64, this one has {len(key)} "
            "bytes (make one with flask_cloakroom.crypto.generate_key())"
        )
    if kid:
        if len(kid) > _MAX_KID or not kid.isascii() or not kid.replace("-", "").isalnum():
            raise ValueError(f"a key id must be up to {_MAX_KID} letters, digits or -, got {kid!r}")
    else:
        kid = key_id(key)
    return kid, key


class Opened(NamedTuple):
    """A decrypted payload and whether it was sealed under the current key."""

    plaintext: bytes
    current: bool


class Keyring:
    """Encryption keys: the first seals, all open."""

    __slots__ = ("_current", "_keys", "ids")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self.ids = tuple(kid for kid, _ in keys)
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("two keys have the same id")
        self._keys = {kid.encode("ascii"): AESGCM(key) for kid, key in keys}
        first = keys[0][0].encode("ascii")
        # The header of every payload sealed now: marker, key id length, key id.
        self._current = (first, self._keys[first], bytes((SEALED, len(first))) + first)

    @classmethod
    def from_config(cls, texts: Sequence[str]) -> Keyring:
        """Build a keyring from ``CLOAKROOM_ENCRYPTION_KEYS`` entries."""
        return cls([parse_key(t) for t in texts])

    @property
    def current_id(self) -> str:
        return self.ids[0]

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` under the current key."""
        _, aead, header = self._current
        nonce = os.urandom(_NONCE)
        return b"".join((header, nonce, aead.encrypt(nonce, plaintext, aad)))

    def open(self, sealed: bytes, aad: bytes) -> Opened:
        """Decrypt a sealed payload; raise :class:`RecordDecodeError` if that fails."""
        if len(sealed) < 2 or sealed[0] != SEALED:
            raise RecordDecodeError("not an encrypted payload")
        start = 2 + sealed[1]
        kid = sealed[2:start]
        aead = self._keys.get(kid)
        if aead is None:
            shown = kid.decode("ascii", "replace")
            raise RecordDecodeError(
                f"encrypted under key {shown!r}, which is not in CLOAKROOM_ENCRYPTION_KEYS"
            )
        nonce = sealed[start : start + _NONCE]
        if len(nonce) != _NONCE:
            raise RecordDecodeError("truncated encrypted payload")
        try:
            plaintext = aead.decrypt(nonce, sealed[start + _NONCE :], aad)
        except InvalidTag:
            raise RecordDecodeError(
                "the encrypted payload does not authenticate (altered, truncated, "
                "or copied from another session)"
            ) from None
        return Opened(plaintext, kid == self._current[0])
