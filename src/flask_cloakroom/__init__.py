"""Flask-Cloakroom: managed server-side sessions for Flask.

The browser holds only a ticket (an opaque, MAC-protected id); the data stays
on the server.  ``flask.session`` keeps working as before.

    from flask_cloakroom import Cloakroom
    cloak = Cloakroom(app)
"""

from __future__ import annotations

from .activity import Event
from .crypto import generate_key
from .errors import (
    CloakroomError,
    ConfigError,
    CookieTooLarge,
    LoginRefused,
    NoSession,
    NotSupported,
    RecordDecodeError,
    RecordTooLarge,
    SessionNotSerializable,
    SessionUnavailable,
    StoreError,
    StoreResting,
    StoreUnavailable,
    TooManySessions,
)
from .extension import Cloakroom
from .manager import RekeyReport, SessionInfo
from .session import ANONYMOUS, ServerSession
from .stores import Record, Store

__version__ = "0.1.0.dev0"

__all__ = [
    "ANONYMOUS",
    "Cloakroom",
    "CloakroomError",
    "ConfigError",
    "CookieTooLarge",
    "Event",
    "LoginRefused",
    "NoSession",
    "NotSupported",
    "Record",
    "RecordDecodeError",
    "RecordTooLarge",
    "RekeyReport",
    "ServerSession",
    "SessionInfo",
    "SessionNotSerializable",
    "SessionUnavailable",
    "Store",
    "StoreError",
    "StoreResting",
    "StoreUnavailable",
    "TooManySessions",
    "generate_key",
]
