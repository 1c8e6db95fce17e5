"""The exceptions Flask-Cloakroom raises.

Every exception derives from :class:`CloakroomError`, so ``except CloakroomError``
catches all of them.  Each carries the data a caller needs to act on it (the
config key, the store, the session key that failed) and keeps the original
error as ``__cause__``.
"""

from __future__ import annotations

from werkzeug.exceptions import ServiceUnavailable


class CloakroomError(Exception):
    """Base class of every Flask-Cloakroom error."""


class ConfigError(CloakroomError, ValueError):
    """A ``CLOAKROOM_*`` (or a Flask session) setting is missing or wrong.

    Raised by :meth:`Cloakroom.init_app`, never during a request.  ``key`` names
    the setting; the message says what is wrong and how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class StoreError(CloakroomError):
    """A store could not carry out an operation.

    ``store`` is a short description of the store (never a password).  The
    driver's own exception is attached as ``__cause__``.
    """

    def __init__(self, message: str, *, store: str = "") -> None:
        super().__init__(f"{store}: {message}" if store else message)
        self.store = store


class StoreUnavailable(StoreError):
    """The store cannot be reached: connection refused, timeout, failover, disk full.

    A request that touches the session while its store is unavailable gets
    :class:`SessionUnavailable` (HTTP 503) unless ``CLOAKROOM_ON_STORE_ERROR``
    says otherwise.
    """


class StoreResting(StoreUnavailable):
    """No attempt was made: the store's last attempt to connect failed moments ago.

    After a failed attempt to connect, the SQL and Redis stores make no other for
    a while (50 to 500 ms, and never less than the attempt took) and answer with
    this at once.  It is a :class:`StoreUnavailable`, handled as one; the interface
    logs it at DEBUG rather than ERROR, since the attempt that failed was logged
    already and an outage would otherwise write one line per request.
    """


class RecordDecodeError(CloakroomError):
    """A stored record could not be decoded (corrupt, truncated, foreign, too new).

    Never reaches the client: the interface logs it and treats the session as
    absent.
    """


class SessionNotSerializable(CloakroomError, TypeError):
    """A session value cannot be stored.

    ``key`` is the top-level session key whose value failed.  Only the types
    Flask's tagged JSON serializer knows are accepted (JSON types plus tuple,
    bytes, Markup, UUID and datetime); pickle is never used.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"session[{key!r}]: {message}")
        self.key = key


class RecordTooLarge(CloakroomError, ValueError):
    """An encoded session is larger than ``CLOAKROOM_MAX_RECORD_SIZE``.

    Nothing is written: the stored session keeps its previous value.
    """

    def __init__(self, size: int, limit: int, largest: list[tuple[str, int]]) -> None:
        parts = ", ".join(f"{k!r} ({n} bytes)" for k, n in largest)
        super().__init__(
            f"the session would take {size} bytes, over the limit of {limit} bytes "
            f"(CLOAKROOM_MAX_RECORD_SIZE); its largest values: {parts}. Keep large data "
            "in your own tables and put only a reference in the session, or raise the limit."
        )
        self.size = size
        self.limit = limit
        self.largest = largest


class CookieTooLarge(RecordTooLarge):
    """In cookie mode (``cookie://``), the session would not fit in a cookie.

    Browsers drop cookies over about 4 KB, so Cloakroom refuses to send one:
    the request fails and the browser keeps its previous cookie.
    """

    def __init__(self, size: int, limit: int, largest: list[tuple[str, int]]) -> None:
        parts = ", ".join(f"{k!r} ({n} bytes)" for k, n in largest)
        ValueError.__init__(
            self,
            f"the session cookie would be {size} bytes, over the {limit} bytes browsers "
            f"keep (cookie:// carries the whole session in the cookie); its largest values: "
            f"{parts}. Keep less in the session, or use a server-side store.",
        )
        self.size = size
        self.limit = limit
        self.largest = largest


class TooManySessions(CloakroomError):
    """``login()`` refused: the user has ``CLOAKROOM_MAX_SESSIONS_PER_USER`` live sessions.

    Raised only with ``CLOAKROOM_SESSION_LIMIT_POLICY = "refuse"``.  Catch it to
    tell the user to sign out elsewhere first.
    """

    def __init__(self, user_id: str, limit: int) -> None:
        super().__init__(f"user {user_id!r} already has {limit} live sessions, the limit")
        self.user_id = user_id
        self.limit = limit


class LoginRefused(CloakroomError):
    """``login()`` refused by a rule whose action is ``revoke`` (``rule`` names it)."""

    def __init__(self, rule: str, details: dict[str, object]) -> None:
        super().__init__(f"login refused by the {rule} rule: {details}")
        self.rule = rule
        self.details = details


class NotSupported(CloakroomError):
    """The operation needs server-side state that this store does not keep.

    For example listing or revoking sessions with ``CLOAKROOM_STORE = "cookie://"``.
    """


class SessionUnavailable(CloakroomError, ServiceUnavailable):
    """HTTP 503 raised when a view touches the session while its store is down.

    It is a Werkzeug ``HTTPException``: Flask turns it into a 503 response (with
    ``Retry-After``), and ``@app.errorhandler(SessionUnavailable)`` can replace it.
    The :class:`StoreError` is ``__cause__``.
    """

    description = "Sessions are temporarily unavailable. Please try again shortly."

    def __init__(self, retry_after: int = 5) -> None:
        CloakroomError.__init__(self, self.description)
        ServiceUnavailable.__init__(self, retry_after=retry_after)
        self.retry_after_seconds = retry_after


class NoSession(CloakroomError, RuntimeError):
    """A session API was called where there is no Cloakroom session.

    For example ``cloak.login()`` outside a request, or on an app whose
    session interface is not Cloakroom's.
    """
