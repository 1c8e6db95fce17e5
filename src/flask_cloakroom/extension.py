"""The Flask extension: :class:`Cloakroom`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    has_request_context,
    redirect,
    request,
    url_for,
)
from flask import session as flask_session
from flask.sessions import session_json_serializer
from flask.typing import ResponseReturnValue

from .activity import Event
from .cookiemode import CookieSessionManager
from .errors import ConfigError, NoSession, StoreError
from .interface import CloakroomSessionInterface, refuse
from .manager import Clock, RekeyReport, SessionInfo, SessionManager
from .session import ServerSession, UnavailableSession
from .settings import load_settings
from .stores import Store, open_store, wrap_client
from .stores.cookie import CookieStore
from .tokens import is_store_key

if TYPE_CHECKING:
    from .adoption import ImportReport

EXTENSION_KEY = "cloakroom"
_P = ParamSpec("_P")
_R = TypeVar("_R")


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
            "redis_client_cache": settings.redis_client_cache,
            "busy_poll_us": settings.busy_poll,
            "sql_async_commit": settings.sql_async_commit,
        }
        if settings.sql_async_commit and isinstance(store, Store):
            raise ConfigError(
                "CLOAKROOM_SQL_ASYNC_COMMIT",
                "applies to the store Cloakroom opens from CLOAKROOM_STORE or an SQLAlchemy "
                "engine; for a store you built, pass SQLStore(engine, async_commit=True) "
                "and leave this key unset",
            )
        if isinstance(store, str):
            store = open_store(store, **options)
        elif not isinstance(store, Store):
            store = wrap_client(store, **options)
        cookie_mode = isinstance(store, CookieStore)
        if cookie_mode and settings.max_sessions_per_user is not None:
            raise ConfigError(
                "CLOAKROOM_MAX_SESSIONS_PER_USER",
                "cannot be enforced with cookie://, which keeps no list of a user's "
                "sessions: remove it or use a server-side store",
            )
        metrics = None
        if settings.metrics:
            from .metrics import Metrics, instrument

            metrics = Metrics(app.name, store)
            store = instrument(store, metrics)
        kind = CookieSessionManager if cookie_mode else SessionManager
        manager = kind(settings, store, serializer=session_json_serializer, clock=self._clock)
        if metrics is not None:
            manager.activity.observers.append(metrics.observe_event)
        app.extensions[EXTENSION_KEY] = manager
        app.session_interface = CloakroomSessionInterface(manager)
        from .cli import cloakroom_group  # imported here: nothing of it on the request path

        app.cli.add_command(cloakroom_group)

    def admin_blueprint(
        self,
        *,
        authorize: Callable[[], bool] | None = None,
        actor: Callable[[], str | None] | None = None,
        name: str = "cloakroom_admin",
        url_prefix: str = "/cloakroom",
    ) -> Blueprint:
        """The admin dashboard, as a blueprint to register where the app chooses.

        ::

            app.register_blueprint(
                cloak.admin_blueprint(authorize=lambda: current_user.is_admin),
                url_prefix="/admin",
            )

        ``authorize`` is called on every dashboard request and must return
        true to let it through; without it every request gets 403.  ``actor``
        names the operator in ``revoked`` events (``by="admin:<name>"``); by
        default the current session's user id.  See docs/operations.md.
        """
        from .admin import make_blueprint

        return make_blueprint(
            self, authorize=authorize, actor=actor, name=name, url_prefix=url_prefix
        )

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

    def _writable_session(self) -> ServerSession:
        """The current session, for an operation that must reach the store.

        While the store is failing this answers the request as
        ``CLOAKROOM_ON_STORE_ERROR`` says (503 by default): a login, logout or
        rotation must never seem to succeed without taking effect.
        """
        session = self._session()
        if isinstance(session, UnavailableSession):
            refuse(self._manager(), session.error)
        return session

    def _readable_session(self) -> ServerSession:
        """The current session, for reading what the store said about it.

        While the store is failing, the session could not be loaded: this
        answers the request as ``CLOAKROOM_ON_STORE_ERROR`` says (503 by
        default) rather than let a logged-in user look logged out.  If the
        hook chose :data:`~flask_cloakroom.ANONYMOUS`, the session reads as
        anonymous, as ``flask.session`` does.
        """
        session = self._session()
        if isinstance(session, UnavailableSession):
            session._check()  # what any read of flask.session does: refuse, or go on anonymous
        return session

    def _guard(self, work: Callable[[], _R]) -> _R:
        """Run a store operation; inside a request, a store failure becomes the 503."""
        try:
            return work()
        except StoreError as error:
            if not has_request_context():
                raise
            refuse(self._manager(), error)
            raise  # pragma: no cover - refuse() always raises here

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
        login is dead once the response is sent.  Login time, IP, User-Agent,
        device and location are recorded, and the login rules are checked.
        ``remember=True`` makes the cookie outlive the browser and applies the
        ``CLOAKROOM_REMEMBER_*`` timeouts.

        Raises :class:`~flask_cloakroom.TooManySessions` (session limit with the
        ``refuse`` policy) or :class:`~flask_cloakroom.LoginRefused` (a login
        rule whose action is ``revoke``); the session is then left as it was.
        """
        manager = self._manager()
        session = self._writable_session()
        user = _user_text(user_id)
        self._guard(
            lambda: manager.login(
                session, user, remember=remember, now=manager.now(), client=session.client
            )
        )

    def confirm_login(self) -> None:
        """Mark the current login fresh again, after the user re-entered their password.

        Clears a re-authentication asked for by a rule, resets
        :meth:`login_age`, and rotates the session id.
        """
        manager = self._manager()
        manager.confirm_login(self._writable_session(), manager.now())

    def logout(self) -> None:
        """End the current session: delete its record now, clear its data, expire the cookie.

        Anything stored in the session later in the same request (a flashed
        "goodbye") goes into a new anonymous session.
        """
        manager = self._manager()
        session = self._writable_session()
        self._guard(lambda: manager.logout(session, manager.now()))

    def rotate(self) -> None:
        """Give the current session a new id, keeping its data.

        The old id stops working when the response is sent.
        """
        session = self._writable_session()
        if session.key is not None and not session.rotate_requested:
            session.rotate_requested = True
            session.accessed = True
            session.pending.append(("rotated", {"reason": "rotate"}))

    @property
    def handle(self) -> str | None:
        """The current session's public handle, or ``None`` if it is not stored yet."""
        return self._readable_session().key

    @property
    def user_id(self) -> str | None:
        """The user id the current session is bound to, or ``None``.

        While the store is failing, reading it answers the request as
        ``CLOAKROOM_ON_STORE_ERROR`` says (503 by default), like reading
        ``flask.session``: a logged-in user never looks logged out.
        """
        meta = self._readable_session().meta
        return None if meta is None else meta.user_id

    def login_age(self) -> timedelta | None:
        """How long ago the current session logged in (or confirmed its login).

        ``None`` when nobody is logged in, or when a rule asked for
        re-authentication: treat that as "too old".
        """
        manager = self._manager()
        seconds = manager.login_age(self._readable_session(), manager.now())
        return None if seconds is None else timedelta(seconds=seconds)

    def fresh_login_required(
        self, max_age: timedelta | float = timedelta(minutes=10)
    ) -> Callable[[Callable[_P, _R]], Callable[_P, _R | ResponseReturnValue]]:
        """Decorate a sensitive view: it needs a login at most ``max_age`` old.

        Otherwise the user is sent to ``CLOAKROOM_REAUTH_VIEW`` with
        ``?next=<this url>`` (or gets a 401 if that is not set); once they
        sign in again (:meth:`login` or :meth:`confirm_login`) the view runs.
        """
        limit = max_age.total_seconds() if isinstance(max_age, timedelta) else float(max_age)

        def decorate(view: Callable[_P, _R]) -> Callable[_P, _R | ResponseReturnValue]:
            @functools.wraps(view)
            def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R | ResponseReturnValue:
                age = self.login_age()
                if age is not None and age.total_seconds() <= limit:
                    return view(*args, **kwargs)
                target = self._manager().settings.reauth_view
                if target is None:
                    abort(401)
                return redirect(url_for(target, next=request.full_path.rstrip("?")))

            return guarded

        return decorate

    def credentials_changed(self, user_id: str | int | None = None) -> int:
        """Call after a password (or other credential) change: end the user's other sessions.

        The current session stays valid (and is re-bound to the new
        credential fingerprint, if ``CLOAKROOM_CREDENTIAL_FINGERPRINT`` is
        set); a ``credential_changed`` event is sent.  ``user_id`` defaults to
        the current session's user.  Returns how many sessions ended.
        """
        manager = self._manager()
        session = self._writable_session() if has_request_context() else None
        if user_id is None:
            if session is None or session.meta is None or session.meta.user_id is None:
                raise NoSession("credentials_changed() needs a user id outside a logged-in request")
            user = session.meta.user_id
        else:
            user = _user_text(user_id)
        return self._guard(lambda: manager.credentials_changed(session, user, manager.now()))

    # -- any session -----------------------------------------------------------

    def sessions(self, user_id: str | int) -> list[SessionInfo]:
        """The live sessions of a user, most recently used first."""
        manager = self._manager()
        user = _user_text(user_id)
        return self._guard(lambda: manager.sessions(user, manager.now(), self._current_key()))

    def revoke(self, handle: str, *, by: str | None = None, reason: str | None = None) -> bool:
        """End the session named by ``handle``; return whether it existed.

        Takes effect at once: the browser holding it is anonymous on its next
        request, and a request already in progress cannot save it back.
        ``by`` and ``reason`` go into the ``revoked`` event.
        """
        if not isinstance(handle, str) or not is_store_key(handle):
            return False
        manager = self._manager()
        ended = self._guard(lambda: manager.revoke(handle, manager.now(), by=by, reason=reason))
        if handle == self._current_key():
            self._session().end(deleted=True)
        return ended

    def revoke_user(
        self,
        user_id: str | int,
        *,
        keep_current: bool = False,
        by: str | None = None,
        reason: str | None = None,
    ) -> int:
        """End every session of a user; return how many ended.

        ``keep_current=True`` spares the current request's session (after the
        user changed their password, say).  Use it when an account is disabled
        or its credentials change.  ``by`` and ``reason`` go into the events.
        """
        manager = self._manager()
        user = _user_text(user_id)
        current = self._current_key()
        keep = current if keep_current else None
        count = self._guard(
            lambda: manager.revoke_user(user, manager.now(), keep=keep, by=by, reason=reason)
        )
        if current is not None and not keep_current:
            session = self._session()
            if session.meta is not None and session.meta.user_id == user:
                session.end(deleted=True)
        return count

    def activity(
        self,
        user_id: str | int | None = None,
        *,
        since: datetime | None = None,
        before: datetime | None = None,
        kinds: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Events from the activity log, newest first (optionally of one user).

        Page backwards with ``before`` set to the last event's ``at``.
        """
        manager = self._manager()
        user = None if user_id is None else _user_text(user_id)
        return self._guard(
            lambda: manager.activity.query(
                user_id=user,
                since=None if since is None else since.timestamp(),
                before=None if before is None else before.timestamp(),
                kinds=kinds,
                limit=limit,
            )
        )

    def import_flask_session(
        self, source: Any, *, key_prefix: str = "session:", table: str = "sessions"
    ) -> ImportReport:
        """Copy Flask-Session 0.8's stored sessions into this app's Cloakroom store.

        ``source`` is the Redis URL/client or SQLAlchemy URL/engine Flask-Session
        used; see :func:`flask_cloakroom.adoption.import_flask_session`.  Then set
        ``CLOAKROOM_ADOPT_FLASK_SESSION = True`` so existing cookies keep working.
        """
        from .adoption import import_flask_session

        return import_flask_session(self._manager(), source, key_prefix=key_prefix, table=table)

    def purge_expired(self, *, pace: float | None = None) -> int:
        """Delete expired records from the store (and old activity); return how many.

        The store deletes in batches; after each one the purge rests ``pace`` times
        as long as the batch took (0 for no rest). None takes ``CLOAKROOM_PURGE_PACE``
        (default 1.0: the purge keeps its connection busy half the time, so the app's
        requests do not queue behind it).
        """
        manager = self._manager()
        return manager.purge(manager.now(), pace=pace)

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
