"""The session object Flask apps see as ``flask.session``.

:class:`ServerSession` is a ``dict`` (so ``jsonify(session)``, ``dict(session)``
and templates work as with Flask's own session) that also tracks whether it
was read or changed, and carries the server-side facts about the session
(:class:`Meta`) that live beside the data rather than in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask.sessions import SessionMixin

from .activity import NO_CLIENT, Client

_MISSING: Any = object()


class _Anonymous:
    """The type of :data:`ANONYMOUS`."""

    def __repr__(self) -> str:
        return "flask_cloakroom.ANONYMOUS"


#: Return this from ``CLOAKROOM_ON_STORE_ERROR`` to go on without the store: the
#: request sees an empty session, and its changes are not saved.
ANONYMOUS = _Anonymous()


@dataclass(slots=True)
class Meta:
    """What the server knows about a session, kept beside its data.

    Times are Unix timestamps in seconds.  ``auth_at`` is the time of the last
    :meth:`~flask_cloakroom.Cloakroom.login` (``None`` for an anonymous
    session); the absolute timeout counts from it, or from ``created_at``.
    ``extra`` holds fields added by optional features (activity tracking).
    """

    created_at: float
    last_seen_at: float
    auth_at: float | None = None
    user_id: str | None = None
    remember: bool = False
    ip: str | None = None
    user_agent: str | None = None
    login_ip: str | None = None
    device: str | None = None
    location: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Meta:
        """A copy that shares nothing mutable with this one (``extra`` holds only
        immutable values)."""
        return Meta(
            self.created_at,
            self.last_seen_at,
            self.auth_at,
            self.user_id,
            self.remember,
            self.ip,
            self.user_agent,
            self.login_ip,
            self.device,
            self.location,
            dict(self.extra),
        )


class ServerSession(dict[str, Any], SessionMixin):
    """A server-side session: a dict of the app's data plus server state.

    Reading marks the session ``accessed`` (so the response varies on
    ``Cookie``); changing it marks it ``modified`` (so it is written at the
    end of the request).  As with Flask's session, changes inside a mutable
    value (``session["cart"].append(x)``) are not seen: set
    ``session.modified = True`` after them.

    ``session.clear()`` ends the server session, as
    :meth:`~flask_cloakroom.Cloakroom.logout` does: the stored record is
    deleted at the end of the request, and anything stored afterwards goes
    into a new session with a new id.
    """

    # Every request makes one of these, so the attributes whose start value is
    # shared (immutable) are class attributes, and __init__ sets only the rest.

    #: Stored sessions are never "new"; a session with no record yet is.
    new: bool = True
    modified: bool = False
    accessed: bool = False
    #: The store key (the public handle) of the loaded record, or None.
    key: str | None = None
    #: The version of the loaded record, for the conditional write.
    version: int | None = None
    #: Server-side facts about the session; None until it is first stored.
    meta: Meta | None = None
    #: Set by login()/rotate(): give the session a new id when it is saved.
    rotate_requested: bool = False
    #: Meta changed (client IP or browser, a rule's flag): write even if the data did not.
    meta_changed: bool = False
    #: The request's client (IP, User-Agent), set by the interface.
    client: Client = NO_CLIENT
    #: The secret session id behind ``key``, when known (never stored or logged).
    session_id: bytes | None = None
    #: Set while saving when the browser needs the cookie again (a new id, say).
    reissue: bool = False
    #: The cookie value to send with the response, decided when the session is saved.
    cookie: str | None = None
    #: Whether the request carried a session cookie (valid or not).
    had_cookie: bool = False
    #: Whether that cookie was signed with a SECRET_KEY_FALLBACKS key.
    stale_signature: bool = False

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        version: int | None = None,
        meta: Meta | None = None,
        raw: dict[str, Any] | None = None,
    ) -> None:
        dict.__init__(self, data or ())
        if key is not None:
            self.key = key
            self.new = False
        if version is not None:
            self.version = version
        if meta is not None:
            self.meta = meta
        #: The tagged JSON form of the data as loaded (to merge concurrent writes).
        self.raw: dict[str, Any] = raw if raw is not None else {}
        #: Stored records (key, meta) to delete when the session is saved (clear()).
        self.discard: list[tuple[str, Meta | None]] = []
        #: Events to send once the session is written: (kind, details).
        self.pending: list[tuple[str, dict[str, Any]]] = []
        #: The loaded value of session.permanent, to notice a change.
        self.loaded_permanent = bool(dict.get(self, "_permanent", False))

    @classmethod
    def loaded(
        cls,
        data: Mapping[str, Any],
        key: str,
        version: int,
        meta: Meta,
        raw: dict[str, Any],
    ) -> ServerSession:
        """The session of a stored record: ``cls(data, key=..., version=..., meta=...,
        raw=...)`` for half the cost (every request that finds its session builds one).

        It sets what ``__init__`` sets; ``test_a_loaded_session_is_what_the_constructor_builds``
        compares the two, so an attribute added to one and not the other fails there.
        """
        session = dict.__new__(cls)
        dict.update(session, data)
        session.key = key
        session.new = False
        session.version = version
        session.meta = meta
        session.raw = raw
        session.discard = []
        session.pending = []
        session.loaded_permanent = bool(dict.get(session, "_permanent", False))
        return session

    # -- state changes ---------------------------------------------------------

    def end(self, *, deleted: bool = False) -> None:
        """Forget the stored record: the data is cleared and the next write gets a new id.

        The record is deleted when the session is saved, unless the caller has
        already deleted it (``deleted=True``).
        """
        if self.key is not None and not deleted:
            self.discard.append((self.key, self.meta))
        dict.clear(self)
        self.key = None
        self.version = None
        self.meta = None
        self.raw = {}
        self.new = True
        self.rotate_requested = False
        self.meta_changed = False
        self.pending.clear()
        self.modified = True
        self.accessed = True

    def get_raw(self, key: str, default: Any = None) -> Any:
        """Read a value without marking the session accessed (for Cloakroom itself)."""
        return dict.get(self, key, default)

    # -- reads -----------------------------------------------------------------
    # (dict.method(self, ...) rather than super().method(...): the same method, as
    # dict comes first in the MRO, without building a super object on every call.)

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.accessed = True
        return dict.__len__(self)

    def keys(self) -> Any:
        self.accessed = True
        return dict.keys(self)

    def values(self) -> Any:
        self.accessed = True
        return dict.values(self)

    def items(self) -> Any:
        self.accessed = True
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self.accessed = True
        return dict(dict.items(self))

    # -- writes ----------------------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        self.accessed = self.modified = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self.accessed = self.modified = True
        dict.__delitem__(self, key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        if not dict.__contains__(self, key):
            self.modified = True
        return dict.setdefault(self, key, default)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        self.accessed = True
        if dict.__contains__(self, key):
            self.modified = True
            return dict.pop(self, key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[str, Any]:
        self.accessed = self.modified = True
        return dict.popitem(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.accessed = self.modified = True
        dict.update(self, *args, **kwargs)

    def __ior__(self, other: Any) -> ServerSession:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        """Clear the data and end the server session (see the class docstring)."""
        self.end()

    def __repr__(self) -> str:
        handle = self.key or "new"
        return f"<{type(self).__name__} {handle} {dict.__repr__(self)}>"


class UnavailableSession(ServerSession):
    """Stands in for the session while its store is failing.

    Any use of it raises the error chosen by ``CLOAKROOM_ON_STORE_ERROR``
    (by default :class:`~flask_cloakroom.errors.SessionUnavailable`, HTTP
    503), so views that never touch the session keep working during an outage.
    If the hook chose to go on anonymously, it behaves as an empty session
    whose changes are not saved.
    """

    def __init__(self, error: Exception, on_use: Any) -> None:
        super().__init__()
        self.error = error
        self._on_use = on_use
        self.degraded = False

    def _check(self) -> None:
        if not self.degraded:
            self._on_use(self)  # raises, or sets self.degraded


def _guarded(name: str) -> Any:
    inner = getattr(ServerSession, name)

    def method(self: UnavailableSession, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return inner(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in (
    "__getitem__", "get", "__contains__", "__iter__", "__len__", "keys", "values", "items",
    "copy", "__setitem__", "__delitem__", "setdefault", "pop", "popitem", "update", "clear",
):  # fmt: skip
    setattr(UnavailableSession, _name, _guarded(_name))
