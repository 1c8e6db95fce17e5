"""Watching sessions: credential fingerprints, the rules, and the checks at login.

:class:`Watch` is the part of a :class:`~flask_cloakroom.manager.SessionManager`
that compares a request with the session record already loaded (so it costs no
store round trip), applies what :mod:`flask_cloakroom.rules` found, and, at
login, looks at the user's history and enforces ``CLOAKROOM_MAX_SESSIONS_PER_USER``.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from .activity import Client, device_of
from .crypto import derive_key
from .errors import NotSupported, TooManySessions
from .rules import Finding, Rules
from .session import Meta, ServerSession
from .stores.base import Record

if TYPE_CHECKING:
    from .manager import SessionManager

logger = logging.getLogger("flask_cloakroom")

#: Keys in Meta.extra.
REAUTH = "reauth"
FINGERPRINT = "cfp"


class Watch:
    """Checks sessions against requests and logins, for one :class:`SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.settings = manager.settings
        self.rules = Rules(manager.settings.rules, manager.settings.geolocate)
        self._fingerprint_key = derive_key(
            manager.settings.secret_keys[0], "credential-fingerprint"
        )

    def fingerprint(self, user_id: str) -> str | None:
        """A keyed hash of the app's credential fingerprint of a user, or ``None``."""
        function = self.settings.credential_fingerprint
        if function is None:
            return None
        value = function(user_id)
        if value is None:
            return None
        return hmac.digest(self._fingerprint_key, str(value).encode("utf-8"), "sha256").hex()[:32]

    def check(self, session: ServerSession, now: float, client: Client) -> ServerSession:
        """Check a loaded, logged-in session against the request; no store round trip.

        Returns the session, or a fresh empty one if it had to end (credentials
        changed, or a rule revoked it).
        """
        meta = session.meta
        if meta is None or meta.user_id is None:
            return session
        if self.settings.credential_fingerprint is not None:
            current = self.fingerprint(meta.user_id)
            stored = meta.extra.get(FINGERPRINT)
            if stored is None:
                meta.extra[FINGERPRINT] = current
                session.meta_changed = True
            elif stored != current:
                return self.end_now(
                    session, now, "revoked", by="cloakroom", reason="credential_changed"
                )
        if client.ip == meta.ip and client.user_agent == meta.user_agent:
            return session  # the common case: nothing to compare
        location = meta.location
        if client.ip != meta.ip and client.ip is not None and self.settings.geolocate:
            location = self.locate(client.ip)
        findings = self.rules.check_request(meta, client.ip, client.user_agent, now, location)
        for finding in findings:
            if finding.action == "revoke":
                self.anomaly(finding, now, session.key, meta)
                return self.end_now(session, now, "revoked", by="rule", reason=finding.rule)
        for finding in findings:
            self._apply(finding, session, now)
        if client.ip is not None:
            meta.ip, meta.location = client.ip, location
        if client.user_agent != meta.user_agent:
            device = device_of(client.user_agent)
            meta.user_agent, meta.device = client.user_agent, device.label if device else None
        session.meta_changed = True
        return session

    def locate(self, ip: str) -> str | None:
        try:
            return self.settings.geolocate(ip) if self.settings.geolocate else None
        except Exception:
            logger.exception("CLOAKROOM_GEOLOCATE failed for an address; location left empty")
            return None

    def anomaly(self, finding: Finding, now: float, handle: str | None, meta: Meta) -> None:
        self.manager.emit(
            "anomaly",
            now,
            handle,
            meta,
            rule=finding.rule,
            action=finding.action,
            **finding.details,
        )

    def _apply(self, finding: Finding, session: ServerSession, now: float) -> None:
        assert session.meta is not None
        self.anomaly(finding, now, session.key, session.meta)
        if finding.action == "rotate" and session.key is not None:
            session.rotate_requested = True
            session.pending.append(("rotated", {"reason": finding.rule}))
        elif finding.action == "require_reauth":
            session.meta.extra[REAUTH] = True
            session.meta_changed = True

    def end_now(
        self, session: ServerSession, now: float, kind: str, **details: Any
    ) -> ServerSession:
        """Delete a loaded session at once and hand the request a fresh one."""
        key = session.key
        if key is not None:
            self.manager.delete_quietly(key)
        self.manager.emit(kind, now, key, session.meta, **details)
        fresh = ServerSession()
        fresh.had_cookie = True
        return fresh

    # -- writing ---------------------------------------------------------------

    def others(
        self, user_id: str, now: float, current: str | None
    ) -> list[tuple[Record, Meta]] | None:
        """The user's other live sessions, when the limit or the rules need them."""
        if self.settings.max_sessions_per_user is None and not self.rules.need_history:
            return None
        try:
            return [(r, m) for r, m in self.manager.records_of(user_id, now) if r.key != current]
        except NotSupported:
            return None

    def login_history(
        self, user_id: str, now: float, live: list[tuple[Record, Meta]] | None
    ) -> list[tuple[float, str | None, str | None]]:
        """Past logins as ``(time, ip, user agent)``: the activity log, else live sessions."""
        if not self.rules.need_history:
            return []
        if self.manager.activity.persistent and "login" in self.manager.activity.kinds:
            try:
                events = self.manager.activity.query(
                    user_id=user_id,
                    kinds=["login"],
                    since=now - self.settings.activity_retention,
                    limit=500,
                )
                return [(e.at.timestamp(), e.ip, e.user_agent) for e in events]
            except NotSupported:
                pass
        return [
            (m.auth_at if m.auth_at is not None else m.created_at, m.login_ip, m.user_agent)
            for _, m in live or []
        ]

    def enforce_limit(
        self, user_id: str, live: list[tuple[Record, Meta]] | None, now: float
    ) -> None:
        limit = self.settings.max_sessions_per_user
        if limit is None or live is None or len(live) < limit:
            return
        if self.settings.session_limit_policy == "refuse":
            raise TooManySessions(user_id, limit)
        oldest_first = sorted(live, key=lambda item: item[1].last_seen_at)
        for record, meta in oldest_first[: len(live) - limit + 1]:
            if self.manager.store.delete(record.key):
                self.manager.emit("evicted", now, record.key, meta, limit=limit)
