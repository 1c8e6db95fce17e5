"""Authenticated encryption of session payloads: AES-256-GCM with a rotating keyring.

A sealed payload is::

    0x01 | nonce (12 bytes) | ciphertext + tag (16 bytes)

The associated data is chosen by the caller: the record's store key and user
id for stored sessions, so a record copied onto another session's key, or
moved to another user, does not decrypt.  The first key of a :class:`Keyring`
encrypts; every key decrypts, so keys can be rotated by adding a new one in
front and dropping the old one once nothing needs it (see ``rekey``).

The payload does not name its key: opening tries the keys in order, the
current one first (an authentication tag that does not verify under a key is
how AES-GCM says "not this key").  A key id would cost every record several
bytes, which in Redis can push a small session into the next allocation size;
a failed try costs about a microsecond, and only records not yet rewritten
under the current key pay it.  Key ids remain, as names in the configuration.
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
_SEALED_BYTE = bytes((SEALED,))
_NONCE = 12
_TAG = 16
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

    __slots__ = ("_aeads", "ids")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self.ids = tuple(kid for kid, _ in keys)
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("two keys have the same id")
        # Opening tries the keys in this order: the current one first.
        self._aeads = tuple(AESGCM(key) for _, key in keys)

    @classmethod
    def from_config(cls, texts: Sequence[str]) -> Keyring:
        """Build a keyring from ``CLOAKROOM_ENCRYPTION_KEYS`` entries."""
        return cls([parse_key(t) for t in texts])

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` under the current key."""
        nonce = os.urandom(_NONCE)
        return b"".join((_SEALED_BYTE, nonce, self._aeads[0].encrypt(nonce, plaintext, aad)))

    def open(self, sealed: bytes, aad: bytes) -> Opened:
        """Decrypt a sealed payload; raise :class:`RecordDecodeError` if that fails."""
        if sealed[:1] != _SEALED_BYTE:
            raise RecordDecodeError("not an encrypted payload")
        if len(sealed) < 1 + _NONCE + _TAG:
            raise RecordDecodeError("truncated encrypted payload")
        nonce = sealed[1 : 1 + _NONCE]
        body = sealed[1 + _NONCE :]
        for position, aead in enumerate(self._aeads):
            try:
                return Opened(aead.decrypt(nonce, body, aad), position == 0)
            except InvalidTag:
                continue
        raise RecordDecodeError(
            "the encrypted payload does not open under any key in CLOAKROOM_ENCRYPTION_KEYS "
            "(sealed under a key that has since been dropped, altered, or copied from "
            "another session)"
        )
