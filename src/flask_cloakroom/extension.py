"""The Flask extension: :class:`Cloakroom`."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, current_app, has_request_context, request
from flask import session as flask_session
from flask.sessions import session_json_serializer

from .cookiemode import CookieSessionManager
from .errors import ConfigError, NoSession
from .interface import CloakroomSessionInterface
from .manager import Clock, RekeyReport, SessionInfo, SessionManager
from .session import ServerSession
from .settings import load_settings
from .stores import Store, open_store, wrap_client
from .stores.cookie import CookieStore
from .tokens import is_store_key

EXTENSION_KEY = "cloakroom"


class Cloakroom:
    """Server-side sessions for Flask.

    ::

        cloak = Cloakroom(app)          # or Cloakroom() and later cloak.init_app(app)

    After that ``flask.session`` is stored on the server and the browser only
    holds a signed ticket.  The methods below act on the current request's
    session (``login``, ``logout``, ``rotate``, ``user_id``) or on any session
    of the current app (``sessions``, ``revoke``, ``revoke_user``,
    ``purge_expired``).

    ``store`` is used by apps that do not set ``CLOAKROOM_STORE``.  ``clock``
    (a callable returning an aware UTC :class:`~datetime.datetime`) replaces
    the system clock, for tests.  One ``Cloakroom`` can serve several apps;
    it keeps no reference to them: each app's state lives in
    ``app.extensions["cloakroom"]``.
    """

    def __init__(
        self, app: Flask | None = None, *, store: Store | None = None, clock: Clock | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the app's configuration and install Cloakroom's session interface.

        Raises :class:`~flask_cloakroom.errors.ConfigError` naming the setting
        at fault.
        """
        settings = load_settings(app.config)
        if settings.store is not None and self._store is not None:
            raise ConfigError(
                "CLOAKROOM_STORE",
                "is set, and a store was also passed to Cloakroom(store=...): keep one of them",
            )
        store = settings.store if settings.store is not None else self._store
        if store is None:
            os.makedirs(app.instance_path, exist_ok=True)
            path = os.path.join(app.instance_path, "cloakroom.sqlite3")
            store = f"sqlite:///{path}"
        options: dict[str, Any] = {
            "sql_table": settings.sql_table,
            "timeout": settings.store_timeout,
            "redis_prefix": settings.redis_prefix,
            "redis_wait_replicas": settings.redis_wait_replicas,
        }
        if isinstance(store, str):
            store = open_store(store, **options)
        elif not isinstance(store, Store):
            store = wrap_client(store, **options)
        kind = CookieSessionManager if isinstance(store, CookieStore) else SessionManager
        manager = kind(settings, store, serializer=session_json_serializer, clock=self._clock)
        app.extensions[EXTENSION_KEY] = manager
        app.session_interface = CloakroomSessionInterface(manager)

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _manager() -> SessionManager:
        try:
            manager: SessionManager = current_app.extensions[EXTENSION_KEY]
        except KeyError:
            raise NoSession(
                "Cloakroom is not set up on this app: call cloak.init_app(app) first"
            ) from None
        return manager

    @staticmethod
    def _session() -> ServerSession:
        if not has_request_context():
            raise NoSession(
                "this needs the session of a request, and there is no request here: call it "
                "from a view, or use test_request_context() in scripts and tests"
            )
        session = flask_session._get_current_object()  # type: ignore[attr-defined]
        if not isinstance(session, ServerSession):
            raise NoSession(
                "the current session is not a Cloakroom session: was the app's "
                "session_interface replaced after cloak.init_app(app)?"
            )
        return session

    def _current_key(self) -> str | None:
        if not has_request_context():
            return None
        session = flask_session._get_current_object()  # type: ignore[attr-defined]
        return session.key if isinstance(session, ServerSession) else None

    @property
    def store(self) -> Store:
        """The current app's store."""
        return self._manager().store

    # -- the current session ---------------------------------------------------

    def login(self, user_id: str | int, *, remember: bool = False) -> None:
        """Bind the current session to ``user_id`` and give it a new id.

        The data already in the session is kept (a cart survives login), unless
        the session belonged to another user, in which case it starts empty.
        The new id defeats session fixation: the id the browser had before the
        login is dead once the response is sent.  Login time, IP and
        User-Agent are recorded.  ``remember=True`` makes the cookie outlive
        the browser and applies the ``CLOAKROOM_REMEMBER_*`` timeouts.
        """
        manager = self._manager()
        session = self._session()
        agent = request.headers.get("User-Agent")
        manager.login(
            session,
            _user_text(user_id),
            remember=remember,
            now=manager.now(),
            ip=request.remote_addr,
            ua=agent[:512] if agent else None,
        )

    def logout(self) -> None:
        """End the current session: delete its record now, clear its data, expire the cookie.

        Anything stored in the session later in the same request (a flashed
        "goodbye") goes into a new anonymous session.
        """
        self._manager().logout(self._session())

    def rotate(self) -> None:
        """Give the current session a new id, keeping its data.

        The old id stops working when the response is sent.
        """
        session = self._session()
        if session.key is not None:
            session.rotate_requested = True
            session.accessed = True

    @property
    def handle(self) -> str | None:
        """The current session's public handle, or ``None`` if it is not stored yet."""
        return self._session().key

    @property
    def user_id(self) -> str | None:
        """The user id the current session is bound to, or ``None``."""
        meta = self._session().meta
        return None if meta is None else meta.user_id

    # -- any session -----------------------------------------------------------

    def sessions(self, user_id: str | int) -> list[SessionInfo]:
        """The live sessions of a user, most recently used first."""
        manager = self._manager()
        return manager.sessions(_user_text(user_id), manager.now(), self._current_key())

    def revoke(self, handle: str) -> bool:
        """End the session named by ``handle``; return whether it existed.

        Takes effect at once: the browser holding it is anonymous on its next
        request, and a request already in progress cannot save it back.
        """
        if not isinstance(handle, str) or not is_store_key(handle):
            return False
        ended = self._manager().revoke(handle)
        if handle == self._current_key():
            self._session().end(deleted=True)
        return ended

    def revoke_user(self, user_id: str | int, *, keep_current: bool = False) -> int:
        """End every session of a user; return how many ended.

        ``keep_current=True`` spares the current request's session (after the
        user changed their password, say).  Use it when an account is disabled
        or its credentials change.
        """
        manager = self._manager()
        user = _user_text(user_id)
        current = self._current_key()
        count = manager.revoke_user(user, manager.now(), keep=current if keep_current else None)
        if current is not None and not keep_current:
            session = self._session()
            if session.meta is not None and session.meta.user_id == user:
                session.end(deleted=True)
        return count

    def purge_expired(self) -> int:
        """Delete expired records from the store; return how many."""
        manager = self._manager()
        return manager.purge(manager.now())

    def rekey(self) -> RekeyReport:
        """Re-encrypt every live session under the first ``CLOAKROOM_ENCRYPTION_KEYS`` key.

        Run it after putting a new key first; when it reports no unreadable
        records, the old keys can be removed.  Also moves sessions onto the
        current ``SECRET_KEY``'s user index when ``CLOAKROOM_HASH_USER_IDS`` is on.
        """
        manager = self._manager()
        return manager.rekey(manager.now())


def _user_text(user_id: Any) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise TypeError(f"user ids must be str or int, got {type(user_id).__name__}")
    text = str(user_id)
    if not text or len(text) > 255:
        raise ValueError("a user id must have 1 to 255 characters")
    return text
