"""Cookie mode (``CLOAKROOM_STORE = "cookie://"``): the session travels in the cookie, encrypted.

For apps that want no server state.  Unlike Flask's own cookie session (signed
but readable by whoever holds it), the cookie is sealed with AES-256-GCM, so
it can be neither read nor altered, and the same idle and absolute timeouts
apply: they are checked from timestamps inside the ciphertext.

Keys come from ``CLOAKROOM_ENCRYPTION_KEYS`` when set, else they are derived
from ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``; either way the first key
seals and the others still open, and a cookie sealed with an older key is
re-sealed with the current one on its next response.

What this mode cannot do, because the server keeps nothing: list a user's
sessions, revoke one session, or end a stolen cookie before it expires
(``logout`` only clears the cookie in *this* browser).  A short idle timeout
limits the damage.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Iterable
from typing import Any, NoReturn

from flask.json.tag import TaggedJSONSerializer
from werkzeug.http import dump_cookie

from .activity import NO_CLIENT, Client
from .codec import Codec
from .crypto import Keyring, derive_key, key_id
from .errors import CookieTooLarge, NotSupported, RecordDecodeError
from .manager import (
    MAX_COOKIES,
    Clock,
    RekeyReport,
    SessionInfo,
    SessionManager,
    logger,
)
from .session import ServerSession
from .settings import Settings
from .stores.base import Store
from .tokens import store_key

#: The largest Set-Cookie header (name, value and attributes) browsers reliably keep.
COOKIE_LIMIT = 4093
_ID = "sid"


class CookieSessionManager(SessionManager):
    """The session lifecycle when the cookie is the store."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        serializer: TaggedJSONSerializer,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(settings, store, serializer=serializer, clock=clock)
        keys = list(settings.encryption_keys)
        if not keys:
            derived = [derive_key(s, "cookie-mode") for s in settings.secret_keys]
            keys = [(key_id(k), k) for k in derived]
        # Every cookie decodes under the same associated data: there is no session
        # key to remember a payload by, so nothing is remembered.
        self.codec = Codec(
            serializer, max_size=1 << 20, keyring=Keyring(keys), decoded_cache_size=0
        )
        self._aad = b"flask-cloakroom/cookie:" + settings.cookie.name.encode("ascii")

    # -- reading ---------------------------------------------------------------

    def open(self, cookies: Iterable[str], now: float, client: Client = NO_CLIENT) -> ServerSession:
        had_cookie = False
        for count, value in enumerate(cookies):
            if count == MAX_COOKIES:
                break
            had_cookie = True
            session = self._open_one(value, now)
            if session is not None:
                session.had_cookie = True
                return self.watch.check(session, now, client)
        session = ServerSession()
        session.had_cookie = had_cookie
        return session

    def _open_one(self, value: str, now: float) -> ServerSession | None:
        try:
            sealed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            meta, raw, current = self.codec.decode(sealed, self._aad)
            session_id = bytes.fromhex(meta.extra[_ID])
        except (binascii.Error, ValueError, KeyError, TypeError, RecordDecodeError) as error:
            logger.info("session cookie refused: %s", error)
            return None
        key = store_key(session_id)
        why = self.policy.expired(meta, now)
        if why is not None:
            self.emit(f"expired_{why}", now, key, meta)
            return None
        try:
            data = self.codec.untag(raw)
        except RecordDecodeError as error:
            logger.info("session cookie refused: %s", error)
            return None
        session = ServerSession.loaded(data, key, 0, meta, raw)
        session.session_id = session_id
        session.stale_signature = not current
        return session

    # -- writing ---------------------------------------------------------------

    def delete_quietly(self, key: str) -> None:
        return None  # nothing is stored: ending a session is expiring its cookie

    def _choose_cookie(self, session: ServerSession) -> None:
        return None  # _save has set the cookie, if one is due

    def _save(self, session: ServerSession, now: float, client: Client) -> None:
        for key, meta_of_discarded in session.discard:
            self.emit("logout", now, key, meta_of_discarded, via="session.clear()")
        session.discard.clear()
        meta = session.meta
        if not dict.__len__(session) and (meta is None or meta.user_id is None):
            session.key = None  # empty: the interface expires the cookie
            return
        renew = session.key is None or session.rotate_requested
        changed = (
            renew
            or session.modified
            or session.meta_changed
            or session.stale_signature
            or bool(session.get_raw("_permanent", False)) != session.loaded_permanent
        )
        if meta is None:
            meta = session.meta = self.new_meta(now, client)
        if not changed and not self.policy.touch_due(meta, now):
            return
        if renew or session.session_id is None:
            session.session_id = secrets.token_bytes(16)
        meta.extra[_ID] = session.session_id.hex()
        meta.last_seen_at = now
        tagged = self.codec.tag(session) if session.modified or renew else session.raw
        value = base64.urlsafe_b64encode(self.codec.encode(meta, tagged, self._aad)).decode()
        size = len(self._header(value, session))
        if size > COOKIE_LIMIT:
            raise CookieTooLarge(size, COOKIE_LIMIT, self._largest(tagged))
        session.key = store_key(session.session_id)
        session.raw = tagged
        session.rotate_requested = session.meta_changed = False
        session.cookie = value

    def _header(self, value: str, session: ServerSession) -> str:
        cookie = self.settings.cookie
        # Werkzeug < 3.1 has no "partitioned" argument: pass it only when it is set.
        extra: dict[str, Any] = {"partitioned": True} if cookie.partitioned else {}
        return dump_cookie(
            cookie.name,
            value,
            expires=self.cookie_expires(session),
            path=cookie.path,
            domain=cookie.domain,
            secure=True,
            httponly=cookie.httponly,
            samesite=cookie.samesite,
            max_size=0,  # measured here, so no warning from Werkzeug
            **extra,
        )

    def _largest(self, tagged: dict[str, object]) -> list[tuple[str, int]]:
        sizes = [(k, len(json.dumps(v))) for k, v in tagged.items()]
        return sorted(sizes, key=lambda item: item[1], reverse=True)[:3]

    def logout(self, session: ServerSession, now: float) -> None:
        if session.key is not None:
            self.emit("logout", now, session.key, session.meta)
        session.end(deleted=True)  # the browser's cookie is expired; copies stay valid

    # -- what cookie mode cannot do -----------------------------------------------

    def _refuse(self, what: str) -> NoReturn:
        raise NotSupported(
            f"cookie:// keeps each session only in its browser, so the server cannot {what}. "
            "Use a server-side store (SQLite, PostgreSQL, Redis...) for that."
        )

    def sessions(self, user_id: str, now: float, current_key: str | None) -> list[SessionInfo]:
        self._refuse("list a user's sessions")

    def revoke(
        self, handle: str, now: float, *, by: str | None = None, reason: str | None = None
    ) -> bool:
        self._refuse("revoke a session")

    def revoke_user(
        self,
        user_id: str,
        now: float,
        *,
        keep: str | None = None,
        by: str | None = None,
        reason: str | None = None,
    ) -> int:
        self._refuse("revoke a user's sessions")

    def credentials_changed(self, session: ServerSession | None, user_id: str, now: float) -> int:
        """Keep the current session valid; other cookies end through the fingerprint.

        With ``CLOAKROOM_CREDENTIAL_FINGERPRINT`` set, every other cookie of the
        user dies on its next request; without it cookie mode cannot end them.
        Returns 0: the server cannot count cookies it does not keep.
        """
        if session is not None and session.meta is not None and session.meta.user_id == user_id:
            fingerprint = self.watch.fingerprint(user_id)
            if fingerprint is not None:
                session.meta.extra["cfp"] = fingerprint
            session.meta_changed = True
            self.emit("credential_changed", now, session.key, session.meta)
        if self.settings.credential_fingerprint is None:
            logger.warning(
                "credentials of user %s changed, but cookie:// cannot end their other sessions "
                "without CLOAKROOM_CREDENTIAL_FINGERPRINT",
                user_id,
            )
        return 0

    def rekey(self, now: float, *, batch_size: int = 500) -> RekeyReport:
        self._refuse("re-encrypt sessions (each cookie is re-sealed on its next response)")

    def purge(self, now: float, *, pace: float | None = None) -> int:
        return 0
