"""Flask's session interface for Cloakroom: the cookie on one side, the manager on the other.

This module is the only one that knows about HTTP: which cookie to read,
when to set or delete it and with which attributes, ``Vary: Cookie``, and
what a client sees when the store is down.  It knows nothing about SQL or
Redis: it talks to a :class:`~flask_cloakroom.manager.SessionManager`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flask import Flask, Request, Response, request
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.exceptions import HTTPException

from .activity import Client, client_ip
from .errors import SessionUnavailable, StoreError, StoreResting
from .manager import SessionManager
from .session import ANONYMOUS, ServerSession, UnavailableSession

if TYPE_CHECKING:
    from werkzeug.sansio.response import Response as BaseResponse

logger = logging.getLogger("flask_cloakroom")
#: Builds a :class:`Client` from a tuple: half the time of its constructor.
_new_client = tuple.__new__


class CloakroomSessionInterface(SessionInterface):
    """Loads the session named by the request's cookie and saves it after the view."""

    session_class = ServerSession

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self._cookie_name = manager.settings.cookie.name
        self._trusted_proxies = manager.settings.trusted_proxies

    # -- Flask's hooks ---------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        manager = self.manager
        values = cookie_values(request.environ.get("HTTP_COOKIE"), self._cookie_name)
        client = self.client(request)
        try:
            session = manager.open(values, manager.now(), client)
        except StoreError as error:
            _log_store_error(error, "session store unavailable while loading a session: %s", error)
            return UnavailableSession(error, self._on_unavailable)
        session.client = client
        return session

    def client(self, request: Request) -> Client:
        """The request's client: its IP (behind trusted proxies only) and User-Agent."""
        # Straight from the WSGI environ: what request.headers would return, for less.
        environ = request.environ
        trusted = self._trusted_proxies
        forwarded = environ.get("HTTP_X_FORWARDED_FOR") if trusted else None
        agent = environ.get("HTTP_USER_AGENT")
        return _new_client(
            Client,
            (
                client_ip(environ.get("REMOTE_ADDR"), forwarded, trusted),
                agent[:512] if agent else None,
            ),
        )

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, ServerSession):  # pragma: no cover - Flask's null session
            return
        if session.accessed:
            _vary_on_cookie(response)
        if isinstance(session, UnavailableSession):
            return
        manager = self.manager
        try:
            manager.save(session, manager.now(), session.client)
        except StoreError as error:
            _log_store_error(
                error, "session store unavailable while saving session %s: %s", session.key, error
            )
            self._fail(app, response, error)
            return
        self._set_cookie(session, response)

    # -- cookies ---------------------------------------------------------------

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        """Whether the browser gets a cookie with this response (decided by the save)."""
        return isinstance(session, ServerSession) and session.cookie is not None

    def _set_cookie(self, session: ServerSession, response: BaseResponse) -> None:
        if session.cookie is None and not (session.key is None and session.had_cookie):
            return  # the common case: the browser's cookie is still right
        cookie = self.manager.settings.cookie
        secure = cookie.secure or request.is_secure
        extra: dict[str, Any] = {"partitioned": True} if cookie.partitioned else {}
        if session.cookie is not None:
            response.set_cookie(
                cookie.name,
                session.cookie,
                expires=self.manager.cookie_expires(session),
                path=cookie.path,
                domain=cookie.domain,
                secure=secure,
                httponly=cookie.httponly,
                samesite=cookie.samesite,
                **extra,
            )
        elif session.key is None and session.had_cookie:
            response.delete_cookie(
                cookie.name,
                path=cookie.path,
                domain=cookie.domain,
                secure=secure,
                httponly=cookie.httponly,
                samesite=cookie.samesite,
                **extra,
            )

    # -- store failures --------------------------------------------------------

    def _on_unavailable(self, session: UnavailableSession) -> None:
        """Called on the first use of the session while the store is failing."""
        if refuse(self.manager, session.error, anonymous_ok=True):
            session.degraded = True

    def _fail(self, app: Flask, response: Response, error: StoreError) -> None:
        """Turn the response into the store-error response: the session was not saved."""
        hook = self.manager.settings.on_store_error
        chosen = hook(error) if hook is not None else None
        if chosen is ANONYMOUS:
            return  # the app accepts that this request's session changes are lost
        if chosen is None:
            exc = SessionUnavailable(self.manager.settings.retry_after)
            exc.__cause__ = error
            try:
                chosen = app.handle_user_exception(exc)
            except HTTPException as raised:  # pragma: no cover - handler re-raised
                chosen = raised
        replacement = app.make_response(chosen)
        response.status_code = replacement.status_code
        response.headers.clear()
        response.headers.extend(replacement.headers)
        response.direct_passthrough = False
        response.set_data(replacement.get_data())


def _log_store_error(error: StoreError, message: str, *args: object) -> None:
    """Log a store failure met by a request: at ERROR, unless the store made no attempt
    because it rests after a failed one (logged already), which is DEBUG: an outage
    would otherwise log a line for every request it answers at once."""
    level = logging.DEBUG if isinstance(error, StoreResting) else logging.ERROR
    logger.log(level, message, *args)


def cookie_values(header: str | None, name: str) -> list[str]:
    """The values of every cookie called ``name`` in a ``Cookie`` header, in order.

    Faster than parsing every cookie of the request: Cloakroom only needs its
    own, and its values are plain base64 text (quotes are removed all the same).
    """
    if not header or name not in header:
        return []
    found = []
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found.append(value)
    return found


def _vary_on_cookie(response: BaseResponse) -> None:
    """Add ``Cookie`` to ``Vary``, unless some ``Vary`` header already names it.

    A second ``Vary`` line means the same as a comma-separated list (RFC 9110,
    section 5.3).  This runs on every response that read the session, so with
    Werkzeug's :class:`~werkzeug.datastructures.Headers` (whose ``_list`` of
    name/value pairs has been there since its first releases) it reads and
    appends the pairs itself: ``getlist()`` and ``add()`` cost three times as
    much, for checks a constant header does not need.  Any other kind of
    headers object goes through the public methods.
    """
    headers = response.headers
    pairs = getattr(headers, "_list", None)
    if type(pairs) is not list:  # a Headers unlike Werkzeug 2.3-3.1's
        for value in headers.getlist("Vary"):
            if "cookie" in value.lower():
                return
        headers.add("Vary", "Cookie")
        return
    for name, value in pairs:  # a loop, not any() over a generator: faster
        if (name == "Vary" or name.lower() == "vary") and "cookie" in value.lower():
            return
    pairs.append(("Vary", "Cookie"))


def refuse(manager: SessionManager, error: Exception, *, anonymous_ok: bool = False) -> bool:
    """Answer a store failure during a request as ``CLOAKROOM_ON_STORE_ERROR`` says.

    Raises an HTTP exception carrying the hook's response, or
    :class:`SessionUnavailable` (503).  Returns ``True`` only when the hook chose
    :data:`ANONYMOUS` and the caller can go on without the store (``anonymous_ok``).
    """
    hook = manager.settings.on_store_error
    if hook is not None:
        chosen = hook(error)
        if chosen is ANONYMOUS and anonymous_ok:
            return True
        if chosen is not None and chosen is not ANONYMOUS:
            from flask import current_app

            raise HTTPException(response=current_app.make_response(chosen))
    raise SessionUnavailable(manager.settings.retry_after) from error
