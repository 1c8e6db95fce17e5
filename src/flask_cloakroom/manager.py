"""The session lifecycle, apart from HTTP: load, save, rotate, end, list, revoke.

One :class:`SessionManager` serves one Flask app.  It ties a store to the
codec, the timeout policy and the cookie signer, and holds the rules that
make server-side sessions safe:

* an unknown, expired or undecodable record is never adopted: the request
  gets a fresh, empty session and any later write gets a new id;
* a read-only request does one store read and no write, except a touch of
  the last-seen time at most once per touch interval;
* a changed session is written with a conditional write on its version; if
  another request wrote first, this request's changes are re-applied key by
  key onto the fresh record and the write is retried, so concurrent requests
  lose nothing; a session deleted meanwhile (logout, revoke) stays deleted;
* each step of a session's life is an :class:`~flask_cloakroom.activity.Event`,
  and the rules of :mod:`flask_cloakroom.rules` are checked against the record
  already loaded, so watching costs no extra round trip.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask.json.tag import TaggedJSONSerializer

from .activity import NO_CLIENT, ActivityLog, Client, Event, device_of

if TYPE_CHECKING:
    from .adoption import Adoption
from .codec import Codec, Decoded
from .crypto import Keyring, derive_key
from .errors import (
    LoginRefused,
    RecordDecodeError,
    StoreError,
    StoreUnavailable,
)
from .merges import MergeQueue
from .policy import Policy
from .session import Meta, ServerSession
from .settings import Settings
from .stores.base import Record, Store, paced
from .tokens import CookieSigner, new_session_id, store_key
from .watch import FINGERPRINT, REAUTH, Watch

logger = logging.getLogger("flask_cloakroom")

Clock = Callable[[], datetime]

#: A conflicting write is merged and retried until CLOAKROOM_STORE_TIMEOUT has passed,
#: but at least this many times.
MIN_WRITE_ATTEMPTS = 8
#: Retries wait a random time up to BACKOFF * 2**attempt seconds, at most BACKOFF_CAP,
#: so requests racing on one session spread out instead of colliding again.
BACKOFF = 0.0005
BACKOFF_CAP = 0.02


def _backoff(attempt: int) -> None:
    time.sleep(random.random() * min(BACKOFF_CAP, BACKOFF * (1 << attempt)))


def _aad(key: str, user: str | None) -> bytes:
    """The associated data of a record's payload: its key and its user id, so a
    sealed payload copied onto another session, or moved to another user, does
    not open (a NUL cannot appear in a store key)."""
    # Store keys are ASCII (hex), so one UTF-8 encoding gives the same bytes.
    return key.encode() if user is None else f"{key}\0{user}".encode()


#: How many cookies of the session's name are checked in one request.
MAX_COOKIES = 4


@dataclass(frozen=True, slots=True)
class _Pending:
    """A request's changes waiting to be merged into a busy session (merges.py)."""

    changes: tuple[dict[str, Any], set[str]]
    #: The request's view of the client, if it changed it (it wins over the stored one).
    meta: Meta | None
    now: float


def _apply_into(changes: tuple[dict[str, Any], set[str]], data: dict[str, Any]) -> None:
    """Apply a request's changes (the keys it set, the keys it deleted) onto ``data``."""
    changed, deleted = changes
    data.update(changed)
    for key in deleted:
        data.pop(key, None)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A public description of one session, for "your sessions" pages and operators.

    ``handle`` names the session without revealing its id: it is safe to put
    in a page, a URL or a log, and it is what :meth:`Cloakroom.revoke` takes.
    ``current`` is true for the session of the request being handled.
    """

    handle: str
    user_id: str | None
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    login_at: datetime | None
    remember: bool
    ip: str | None
    login_ip: str | None
    user_agent: str | None
    current: bool
    device: str | None = None
    location: str | None = None


@dataclass(slots=True)
class RekeyReport:
    """What :meth:`Cloakroom.rekey() <flask_cloakroom.Cloakroom.rekey>` did."""

    examined: int = 0
    rewritten: int = 0
    current: int = 0
    changed_meanwhile: int = 0
    unreadable: int = 0


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class SessionManager:
    """Everything Cloakroom does with sessions for one app."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        serializer: TaggedJSONSerializer,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        keyring = Keyring(settings.encryption_keys) if settings.encryption_keys else None
        self.codec = Codec(
            serializer,
            max_size=settings.max_record_size,
            keyring=keyring,
            accept_plaintext=settings.encryption_accept_plaintext,
            decoded_cache_size=settings.decoded_cache_size,
        )
        # Keyed hashes of user ids, one per SECRET_KEY (current first), if asked for.
        self._user_keys = (
            [derive_key(s, "user-index") for s in settings.secret_keys]
            if settings.hash_user_ids
            else []
        )
        self.policy = Policy(
            idle=settings.idle_timeout,
            absolute=settings.absolute_timeout,
            remember_idle=settings.remember_idle_timeout,
            remember_absolute=settings.remember_absolute_timeout,
            touch_interval=settings.touch_interval,
        )
        self.signer = CookieSigner(settings.secret_keys)
        self._clock = clock
        self.activity = ActivityLog(
            store,
            keyring=keyring,
            kinds=settings.activity_kinds,
            retention=settings.activity_retention,
            user_index=self.user_index,
        )
        self.watch = Watch(self)
        self._merges: MergeQueue[_Pending, tuple[Record, Meta, dict[str, Any]] | None] = (
            MergeQueue()
        )
        self.adoption: Adoption | None = None
        if settings.adopt_flask_cookies or settings.adopt_flask_session:
            from .adoption import Adoption

            self.adoption = Adoption(self)

    def now(self) -> float:
        """The current time as a Unix timestamp, from the injected clock if any."""
        if self._clock is None:
            return time.time()
        return self._clock().timestamp()

    def user_index(self, user_id: str) -> str:
        """The value a user's sessions are indexed under in the store.

        The user id itself, or with ``CLOAKROOM_HASH_USER_IDS`` a keyed hash of it
        (so a store dump does not say whose sessions are whose).
        """
        if not self._user_keys:
            return user_id
        return self._hash_user(self._user_keys[0], user_id)

    def user_indexes(self, user_id: str) -> list[str]:
        """Every index value the user's sessions may be under (one per secret key)."""
        if not self._user_keys:
            return [user_id]
        return [self._hash_user(k, user_id) for k in self._user_keys]

    @staticmethod
    def _hash_user(key: bytes, user_id: str) -> str:
        return "h:" + hmac.digest(key, user_id.encode("utf-8"), "sha256").hex()[:40]

    # -- reading ---------------------------------------------------------------

    def open(self, cookies: Iterable[str], now: float, client: Client = NO_CLIENT) -> ServerSession:
        """Return the session named by the request's cookie values.

        Cookies that fail verification cost no store traffic.  The session is
        checked against ``client`` (credential fingerprint, rules).  Raises
        :class:`StoreError` if the store cannot be read.
        """
        had_cookie = False
        foreign: list[str] = []
        for count, value in enumerate(cookies):
            if count == MAX_COOKIES:
                break
            had_cookie = True
            unsigned = self.signer.unsign(value)
            if unsigned is None:
                foreign.append(value)
                continue
            session = self.load(unsigned.key, now)
            if session is None:
                break
            session.session_id = unsigned.session_id
            session.stale_signature = unsigned.stale_key
            session.had_cookie = True
            return self.watch.check(session, now, client)
        if foreign and self.adoption is not None:
            adopted = self.adoption.adopt(foreign, now, client)
            if adopted is not None:
                return adopted
        session = ServerSession()
        session.had_cookie = had_cookie
        return session

    def load(self, key: str, now: float) -> ServerSession | None:
        """Load and check the live session stored under ``key``, or return ``None``."""
        record = self.store.load(key)
        if record is None:
            return None
        decoded = self._decode(record)
        if decoded is None:
            return None
        meta, raw, _ = decoded
        why = self.policy.expired(meta, now)
        if why is not None:
            self.delete_quietly(key)
            self.emit(f"expired_{why}", now, key, meta)
            return None
        try:
            data = self.codec.untag(raw)
        except RecordDecodeError as error:
            self._unreadable(key, error)
            return None
        return ServerSession.loaded(data, key, record.version, meta, raw)

    def _decode(self, record: Record) -> Decoded | None:
        try:
            return self.codec.decode(
                record.payload, _aad(record.key, record.user_id), user_id=record.user_id
            )
        except RecordDecodeError as error:
            self._unreadable(record.key, error)
            return None

    @staticmethod
    def _unreadable(key: str, error: RecordDecodeError) -> None:
        logger.warning(
            "session %s: stored record is unreadable and is treated as absent: %s", key, error
        )

    def delete_quietly(self, key: str) -> None:
        """Delete a record; a store failure is logged, not raised (the caller goes on)."""
        try:
            self.store.delete(key)
        except StoreError as error:
            logger.warning("session %s: could not delete the expired record: %s", key, error)

    # -- watching --------------------------------------------------------------

    def emit(
        self,
        kind: str,
        now: float,
        handle: str | None,
        meta: Meta | None,
        **details: Any,
    ) -> None:
        """Describe a step of a session's life as an :class:`Event` and send it out."""
        self.activity.emit(
            Event(
                kind=kind,
                at=_utc(now),
                handle=handle,
                user_id=None if meta is None else meta.user_id,
                ip=None if meta is None else meta.ip,
                user_agent=None if meta is None else meta.user_agent,
                device=None if meta is None else meta.device,
                location=None if meta is None else meta.location,
                details=details,
            )
        )

    def save(self, session: ServerSession, now: float, client: Client = NO_CLIENT) -> None:
        """Write what the request did to the session, in as few store calls as possible.

        Afterwards ``session.cookie`` holds the cookie value to send, if the browser
        needs one, and ``session.key`` is ``None`` if the session no longer exists.
        Events of the request (login, rotation, creation) are sent once written.
        """
        created = session.key is None
        self._save(session, now, client)
        if session.key is not None:
            if created and not any(kind == "login" for kind, _ in session.pending):
                self.emit("created", now, session.key, session.meta)
            for kind, details in session.pending:
                self.emit(kind, now, session.key, session.meta, **details)
        session.pending.clear()
        self._choose_cookie(session)

    def _choose_cookie(self, session: ServerSession) -> None:
        """Set ``session.cookie`` when the browser needs the (signed) cookie again."""
        if (
            session.key is not None
            and session.session_id is not None
            and (
                session.reissue
                or session.stale_signature
                or bool(session.get_raw("_permanent", False)) != session.loaded_permanent
            )
        ):
            session.cookie = self.signer.sign(session.session_id)

    def login_age(self, session: ServerSession, now: float) -> float | None:
        """Seconds since the session's login; ``None`` if not logged in or re-auth is due."""
        meta = session.meta
        if meta is None or meta.user_id is None or meta.auth_at is None:
            return None
        if meta.extra.get(REAUTH):
            return None
        return max(0.0, now - meta.auth_at)

    def cookie_expires(self, session: ServerSession) -> datetime | None:
        """When the browser should drop the cookie: a permanent session's absolute expiry."""
        if session.meta is None or not session.get_raw("_permanent", False):
            return None
        return _utc(self.policy.absolute_expiry(session.meta))

    def new_meta(self, now: float, client: Client) -> Meta:
        """Meta for a session that starts now, from ``client``."""
        device = device_of(client.user_agent)
        return Meta(
            created_at=now,
            last_seen_at=now,
            ip=client.ip,
            user_agent=client.user_agent,
            device=device.label if device else None,
        )

    def _save(self, session: ServerSession, now: float, client: Client) -> None:
        for key, meta_of_discarded in session.discard:
            if self.store.delete(key):
                self.emit("logout", now, key, meta_of_discarded, via="session.clear()")
        session.discard.clear()
        meta = session.meta
        has_content = bool(dict.__len__(session)) or (meta is not None and meta.user_id is not None)
        if session.key is None:
            if has_content:
                if meta is None:
                    meta = self.new_meta(now, client)
                meta.last_seen_at = now
                self._create(session, meta, self.codec.tag(session), now)
            return
        assert meta is not None, "a stored session always has meta"
        if session.rotate_requested:
            self._rotate(session, meta, self.codec.tag(session), now)
        elif session.modified:
            if not has_content:
                self.store.delete(session.key)
                session.key = None
                return
            meta.last_seen_at = now
            self._update(session, meta, self.codec.tag(session), now)
        elif session.meta_changed:
            meta.last_seen_at = now
            self._update(session, meta, session.raw, now)
        elif self.policy.touch_due(meta, now):
            meta.last_seen_at = now
            record = self._record(session.key, meta, session.raw, (session.version or 0) + 1)
            if self.store.save(record, expected=session.version, now=now):
                session.version = record.version
            # On a conflict another request has just written: nothing to touch.

    def _record(self, key: str, meta: Meta, tagged: dict[str, Any], version: int) -> Record:
        """The record of a session: its payload, and beside it what the store needs.

        The record's user id is bound into the payload's associated data; when it
        is the user id itself (not hashed) the payload leaves it out.
        """
        user = None if meta.user_id is None else self.user_index(meta.user_id)
        payload = self.codec.encode(meta, tagged, _aad(key, user), user_id=user)
        return Record(key, user, self.policy.expires_at(meta), version, payload)

    def _stored(
        self, session: ServerSession, record: Record, meta: Meta, tagged: dict[str, Any]
    ) -> None:
        session.key = record.key
        session.version = record.version
        session.meta = meta
        session.raw = tagged
        session.new = False
        session.rotate_requested = False
        session.meta_changed = False

    def _create(
        self, session: ServerSession, meta: Meta, tagged: dict[str, Any], now: float
    ) -> None:
        for _ in range(3):  # a clash of 256-bit random ids does not happen; be tidy anyway
            session_id = new_session_id()
            record = self._record(store_key(session_id), meta, tagged, 1)
            if self.store.save(record, expected=None, now=now):
                self._stored(session, record, meta, tagged)
                session.session_id = session_id
                session.reissue = True
                return
        raise StoreError("could not create a session: the store refused three new keys")

    def _rotate(
        self, session: ServerSession, meta: Meta, tagged: dict[str, Any], now: float
    ) -> None:
        old_key = session.key
        assert old_key is not None
        assert session.version is not None
        meta.last_seen_at = now
        for _ in self._attempts():
            session_id = new_session_id()
            record = self._record(store_key(session_id), meta, tagged, 1)
            if self.store.rotate(old_key, record, expected=session.version, now=now):
                self._stored(session, record, meta, tagged)
                session.session_id = session_id
                session.reissue = True
                return
            fresh = self._fresh(old_key, now)
            if fresh is None:
                # The old session ended meanwhile; a login still gets its session.
                self._create(session, meta, tagged, now)
                return
            version, _, fresh_raw = fresh
            changes = self._changes(session.raw, tagged)
            tagged = dict(fresh_raw)
            _apply_into(changes, tagged)
            session.raw, session.version = fresh_raw, version
        raise StoreUnavailable(
            f"session {old_key}: gave up rotating after conflicts for "
            f"{self.settings.store_timeout:g} s (too many concurrent writes)"
        )

    def _update(
        self, session: ServerSession, meta: Meta, tagged: dict[str, Any], now: float
    ) -> None:
        """Write a changed session; on a lost race, merge under the store's lock."""
        key = session.key
        assert key is not None
        assert session.version is not None
        record = self._record(key, meta, tagged, session.version + 1)
        if self.store.save(record, expected=session.version, now=now):
            self._stored(session, record, meta, tagged)
            return
        # Another request wrote since this one loaded the session.  Re-apply this
        # request's changes onto what is stored now, holding the store's lock, so
        # that a busy session cannot make this request lose the race again; the
        # requests of this process doing the same merge as a batch (merges.py).
        pending = _Pending(
            self._changes(session.raw, tagged),  # worked out before the lock
            meta if session.meta_changed else None,
            now,
        )
        outcome = self._merges.merge(
            key,
            pending,
            lambda batch: self._merge_batch(key, batch),
            # The batch ahead is one locked update: its wait for the store's lock and
            # its store calls are each bounded by the store timeout.
            timeout=2 * self.settings.store_timeout,
        )
        if outcome is None:
            logger.info("session %s ended during the request; its changes are dropped", key)
            session.key = None
            return
        stored, fresh_meta, data = outcome
        # Each request of the batch gets its own copies of what was stored.
        own_meta = dataclasses.replace(fresh_meta, extra=dict(fresh_meta.extra))
        self._stored(session, stored, own_meta, dict(data))

    def _merge_batch(
        self, key: str, batch: list[_Pending]
    ) -> tuple[Record, Meta, dict[str, Any]] | None:
        """Apply the changes of ``batch`` (in order) onto the stored session, under the
        store's lock; ``None`` if the session has ended meanwhile."""
        now = max(pending.now for pending in batch)
        merged: list[tuple[Meta, dict[str, Any]]] = []

        def change(current: Record | None) -> Record | None:
            merged.clear()
            decoded = None if current is None else self._decode(current)
            if current is None or decoded is None or self.policy.expired(decoded.meta, now):
                return None  # logged out, revoked or expired meanwhile: that is final
            fresh_meta = decoded.meta
            fresh_meta.last_seen_at = max(fresh_meta.last_seen_at, now)
            data = dict(decoded.raw)
            for pending in batch:
                seen = pending.meta
                if seen is not None:  # that request's view of the client wins
                    fresh_meta.ip, fresh_meta.location = seen.ip, seen.location
                    fresh_meta.user_agent, fresh_meta.device = seen.user_agent, seen.device
                    fresh_meta.extra.update(seen.extra)
                _apply_into(pending.changes, data)
            merged.append((fresh_meta, data))
            return self._record(key, fresh_meta, data, current.version + 1)

        stored = self.store.update_locked(key, change, now=now)
        if stored is None:
            return None
        return stored, *merged[0]

    def _attempts(self) -> Iterator[int]:
        """Attempt numbers for a write that may conflict: retries back off, with jitter,
        until the store timeout has passed (but at least MIN_WRITE_ATTEMPTS times)."""
        deadline = time.monotonic() + self.settings.store_timeout
        attempt = 0
        while attempt < MIN_WRITE_ATTEMPTS or time.monotonic() < deadline:
            if attempt:
                _backoff(attempt)
            yield attempt
            attempt += 1

    def _fresh(self, key: str, now: float) -> tuple[int, Meta, dict[str, Any]] | None:
        record = self.store.load(key)
        if record is None:
            return None
        decoded = self._decode(record)
        if decoded is None or self.policy.expired(decoded.meta, now) is not None:
            return None
        return record.version, decoded.meta, decoded.raw

    @staticmethod
    def _changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """What this request changed (``before`` -> ``after``): the keys it set, and
        the keys it deleted.  Computed once, outside any lock."""
        changed = {
            key: value for key, value in after.items() if key not in before or before[key] != value
        }
        return changed, before.keys() - after.keys()

    # -- identity --------------------------------------------------------------

    def login(
        self,
        session: ServerSession,
        user_id: str,
        *,
        remember: bool,
        now: float,
        client: Client,
    ) -> None:
        """Bind the session to a user; it gets a new id when it is saved.

        Applies ``CLOAKROOM_MAX_SESSIONS_PER_USER`` (evicting or raising
        :class:`TooManySessions`) and the login rules (a rule whose action is
        ``revoke`` raises :class:`LoginRefused`).
        """
        if session.meta is not None and session.meta.user_id not in (None, user_id):
            session.end()  # another user's session: start clean, keep nothing of theirs
        watch = self.watch
        live = watch.others(user_id, now, session.key)
        findings = watch.rules.check_login(
            client.ip, client.user_agent, now, watch.login_history(user_id, now, live)
        )
        for finding in findings:
            if finding.action == "revoke":
                attempt = self.new_meta(now, client)
                attempt.user_id = user_id
                watch.anomaly(finding, now, None, attempt)
                raise LoginRefused(finding.rule, finding.details)
        watch.enforce_limit(user_id, live, now)
        meta = session.meta
        if meta is None:
            meta = session.meta = self.new_meta(now, client)
        device = device_of(client.user_agent)
        meta.user_id = user_id
        meta.auth_at = now
        meta.remember = remember
        meta.ip = meta.login_ip = client.ip
        meta.user_agent = client.user_agent
        meta.device = device.label if device else None
        meta.location = watch.locate(client.ip) if client.ip and self.settings.geolocate else None
        meta.extra.pop(REAUTH, None)
        fingerprint = watch.fingerprint(user_id)
        if fingerprint is not None:
            meta.extra[FINGERPRINT] = fingerprint
        if remember:
            session.permanent = True
        session.rotate_requested = session.key is not None
        session.modified = session.accessed = True
        session.pending.append(("login", {"remember": remember}))
        for finding in findings:
            details = {"rule": finding.rule, "action": finding.action, **finding.details}
            session.pending.append(("anomaly", details))
            if finding.action == "require_reauth":
                meta.extra[REAUTH] = True

    def confirm_login(self, session: ServerSession, now: float) -> None:
        """Mark the login fresh again after the user re-entered their credentials."""
        meta = session.meta
        if meta is None or meta.user_id is None:
            raise LoginRefused("not_logged_in", {"reason": "there is no login to confirm"})
        meta.auth_at = now
        meta.extra.pop(REAUTH, None)
        session.rotate_requested = session.key is not None
        session.meta_changed = session.accessed = True
        session.pending.append(("login", {"confirmed": True}))

    def credentials_changed(self, session: ServerSession | None, user_id: str, now: float) -> int:
        """After a password change: end the user's other sessions, keep this one valid.

        Returns how many sessions ended.
        """
        current = None
        if session is not None and session.meta is not None and session.meta.user_id == user_id:
            current = session.key
            fingerprint = self.watch.fingerprint(user_id)
            if fingerprint is not None:
                session.meta.extra[FINGERPRINT] = fingerprint
            session.meta_changed = True
            self.emit("credential_changed", now, current, session.meta)
        else:
            meta = Meta(created_at=now, last_seen_at=now, user_id=user_id)
            self.emit("credential_changed", now, None, meta)
        return self.revoke_user(
            user_id, now, keep=current, by="cloakroom", reason="credential_changed"
        )

    def logout(self, session: ServerSession, now: float) -> None:
        """End the session now: its record is deleted and its data cleared."""
        key = session.key
        if key is not None and self.store.delete(key):
            self.emit("logout", now, key, session.meta)
        session.end(deleted=True)

    # -- many sessions ---------------------------------------------------------

    def describe(self, record: Record, now: float, current_key: str | None) -> SessionInfo | None:
        """Describe a stored record, or return ``None`` if it is unreadable or dead."""
        decoded = self._decode(record)
        if decoded is None or self.policy.expired(decoded.meta, now) is not None:
            return None
        return self._info(record.key, decoded.meta, current_key)

    def _info(self, key: str, meta: Meta, current_key: str | None) -> SessionInfo:
        return SessionInfo(
            handle=key,
            user_id=meta.user_id,
            created_at=_utc(meta.created_at),
            last_seen_at=_utc(meta.last_seen_at),
            expires_at=_utc(self.policy.expires_at(meta)),
            login_at=None if meta.auth_at is None else _utc(meta.auth_at),
            remember=meta.remember,
            ip=meta.ip,
            login_ip=meta.login_ip,
            user_agent=meta.user_agent,
            current=key == current_key,
            device=meta.device,
            location=meta.location,
        )

    def records_of(self, user_id: str, now: float) -> list[tuple[Record, Meta]]:
        """The live, readable records of a user, checked against their decoded user id."""
        out: list[tuple[Record, Meta]] = []
        seen: set[str] = set()
        for index in self.user_indexes(user_id):
            for record in self.store.user_records(index, now=now):
                if record.key in seen:
                    continue
                seen.add(record.key)
                decoded = self._decode(record)
                if (
                    decoded is not None
                    and decoded.meta.user_id == user_id
                    and self.policy.expired(decoded.meta, now) is None
                ):
                    out.append((record, decoded.meta))
        return out

    def sessions(self, user_id: str, now: float, current_key: str | None) -> list[SessionInfo]:
        """The live sessions of a user, most recently used first."""
        out = [self._info(r.key, meta, current_key) for r, meta in self.records_of(user_id, now)]
        out.sort(key=lambda i: i.last_seen_at, reverse=True)
        return out

    def revoke(
        self, handle: str, now: float, *, by: str | None = None, reason: str | None = None
    ) -> bool:
        """Delete the session named by ``handle``; return whether it existed."""
        record = self.store.load(handle)
        if record is None or not self.store.delete(handle):
            return False
        decoded = self._decode(record)
        self.emit("revoked", now, handle, decoded.meta if decoded else None, by=by, reason=reason)
        return True

    def purge(self, now: float, *, pace: float | None = None) -> int:
        """Delete expired records (and activity older than its retention); return how many.

        After each batch the purge rests ``pace`` times as long as the batch took
        (:func:`~flask_cloakroom.stores.base.paced`); None: ``CLOAKROOM_PURGE_PACE``.
        """
        if pace is None:
            pace = self.settings.purge_pace
        purged = self.store.purge_expired(now=now, progress=paced(None, pace))
        self.activity.prune(now)
        return purged

    def revoke_user(
        self,
        user_id: str,
        now: float,
        *,
        keep: str | None = None,
        by: str | None = None,
        reason: str | None = None,
    ) -> int:
        """Delete every session of a user except ``keep``; return how many ended."""
        ending = [(r, m) for r, m in self.records_of(user_id, now) if r.key != keep]
        count = self.store.delete_many([r.key for r, _ in ending])
        for record, meta in ending:
            self.emit("revoked", now, record.key, meta, by=by, reason=reason)
        return count

    def rekey(self, now: float, *, batch_size: int = 500) -> RekeyReport:
        """Rewrite every live record not sealed under the current encryption key.

        Old-key and plaintext records are re-encrypted under the first key of
        ``CLOAKROOM_ENCRYPTION_KEYS`` (and re-indexed under the current
        ``SECRET_KEY`` when user ids are hashed).  Afterwards old keys can be
        dropped.  Safe to run while the app serves requests: each rewrite is a
        conditional write, and a record changed meanwhile was re-encrypted by
        that change anyway.
        """
        report = RekeyReport()
        cursor: str | None = None
        while True:
            page, cursor = self.store.scan(cursor=cursor, limit=batch_size)
            for record in page:
                report.examined += 1
                decoded = self._decode(record)
                if decoded is None:
                    report.unreadable += 1
                    continue
                if self.policy.expired(decoded.meta, now) is not None:
                    continue
                index = (
                    None if decoded.meta.user_id is None else self.user_index(decoded.meta.user_id)
                )
                if decoded.current and record.user_id == index:
                    report.current += 1
                    continue
                fresh = self._record(record.key, decoded.meta, decoded.raw, record.version + 1)
                if self.store.save(fresh, expected=record.version, now=now):
                    report.rewritten += 1
                else:
                    report.changed_meanwhile += 1
            if cursor is None:
                return report
