"""Switching to Cloakroom without logging anyone out.

Two sources of existing sessions can be taken over:

* **Flask's cookie session** (``CLOAKROOM_ADOPT_FLASK_COOKIES = True``): a
  request that arrives with a valid Flask signed session cookie (same
  ``SECRET_KEY`` or one of ``SECRET_KEY_FALLBACKS``, Flask's own serializer
  and ``PERMANENT_SESSION_LIFETIME`` as its maximum age) gets that data in a
  new server-side session, and the old cookie is replaced.
* **Flask-Session 0.8** (:func:`import_flask_session`, then
  ``CLOAKROOM_ADOPT_FLASK_SESSION = True``): its Redis keys or SQLAlchemy
  rows are copied into the Cloakroom store (never unpickled: pickled records
  are counted and skipped), keyed by a hash of the Flask-Session id, so the
  browsers' existing Flask-Session cookies open them; each is re-issued in
  Cloakroom's format (with a fresh id) on its next request.

Both emit an ``adopted`` event.  With ``CLOAKROOM_ADOPT_USER_KEY`` (for
example Flask-Login's ``"_user_id"``) an adopted session is also bound to the
user that key names, so ``cloak.user_id``, ``sessions()`` and revocation
work for it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer

from .errors import ConfigError
from .session import Meta, ServerSession
from .tokens import store_key

if TYPE_CHECKING:
    from .activity import Client
    from .manager import SessionManager

_FLASK_SESSION_ID = b"flask-cloakroom/flask-session-id:"


def flask_session_id(sid: str) -> bytes:
    """The Cloakroom session id that stands for a Flask-Session id (32 bytes)."""
    return hashlib.sha256(_FLASK_SESSION_ID + sid.encode("utf-8")).digest()


class Adoption:
    """Recognises cookies of Flask's cookie session and of Flask-Session."""

    def __init__(self, manager: SessionManager) -> None:
        settings = manager.settings
        self.manager = manager
        self.flask_cookies = settings.adopt_flask_cookies
        self.flask_session = settings.adopt_flask_session
        self.user_key = settings.adopt_user_key
        # itsdangerous takes keys oldest first; Flask signs with SECRET_KEY.
        keys: list[bytes] = [
            k.encode("utf-8") if isinstance(k, str) else k
            for k in (*reversed(settings.secret_keys[1:]), settings.secret_keys[0])
        ]
        self._cookie_serializer = URLSafeTimedSerializer(
            keys,
            salt="cookie-session",
            serializer=manager.codec.serializer,
            signer_kwargs={"key_derivation": "hmac", "digest_method": hashlib.sha1},
        )
        self._max_age = int(settings.flask_cookie_max_age)
        self._sid_signers = [
            Signer(k, salt="flask-session", key_derivation="hmac") for k in settings.secret_keys
        ]

    def adopt(self, values: list[str], now: float, client: Client) -> ServerSession | None:
        """A session for cookie values that are not Cloakroom's, or ``None``."""
        for value in values:
            if self.flask_session:
                session = self._from_flask_session(value, now, client)
                if session is not None:
                    return session
            if self.flask_cookies:
                session = self._from_flask_cookie(value, now, client)
                if session is not None:
                    return session
        return None

    def _from_flask_session(self, value: str, now: float, client: Client) -> ServerSession | None:
        for sid in self._flask_session_ids(value):
            session_id = flask_session_id(sid)
            session = self.manager.load(store_key(session_id), now)
            if session is not None:
                session.session_id = session_id
                session.had_cookie = True
                session.rotate_requested = True  # re-issued in Cloakroom's format, new id
                session.pending.append(("adopted", {"source": "flask-session"}))
                return self.manager.watch.check(session, now, client)
        return None

    def _flask_session_ids(self, value: str) -> Iterator[str]:
        """The Flask-Session ids a cookie value may carry (signed or not)."""
        if not value or len(value) > 256:
            return
        for signer in self._sid_signers:
            try:
                yield signer.unsign(value).decode("utf-8")
                return
            except (BadSignature, UnicodeDecodeError):
                continue
        yield value

    def _from_flask_cookie(self, value: str, now: float, client: Client) -> ServerSession | None:
        try:
            data = self._cookie_serializer.loads(value, max_age=self._max_age)
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not data:
            return None
        session = ServerSession()
        dict.update(session, data)
        session.modified = True
        session.had_cookie = True
        session.meta = self.new_meta(data, now, client)
        session.pending.append(("adopted", {"source": "flask-cookie"}))
        return session

    def new_meta(self, data: dict[str, Any], now: float, client: Client | None) -> Meta:
        """Meta for an adopted session, bound to its user if ``CLOAKROOM_ADOPT_USER_KEY`` says."""
        meta = self.manager.new_meta(now, client) if client else Meta(now, now)
        user = data.get(self.user_key) if self.user_key else None
        if isinstance(user, str | int) and not isinstance(user, bool) and str(user):
            meta.user_id = str(user)
            meta.auth_at = now
            meta.login_ip = meta.ip
        return meta


# -- importing Flask-Session's stored sessions ------------------------------------


@dataclass(slots=True)
class ImportReport:
    """What :func:`import_flask_session` did."""

    examined: int = 0
    imported: int = 0
    already_there: int = 0
    expired: int = 0
    pickled: int = 0
    undecodable: int = 0


#: Flask-Session's sessions as the import reads them: id, data, seconds left.
_Rows = Generator[tuple[str, bytes | None, float | None], None, None]


def _decoders() -> tuple[Any, Any]:
    try:
        import msgspec
    except ImportError as error:
        raise ConfigError(
            "import_flask_session",
            "reading Flask-Session's msgpack records needs msgspec (Flask-Session's own "
            "serializer): pip install msgspec",
        ) from error
    return msgspec.msgpack.Decoder(), msgspec.DecodeError


def _decode(raw: bytes, decoder: Any, decode_error: type[Exception]) -> dict[str, Any] | str:
    """Flask-Session 0.8 data (msgpack, else JSON), or why it was skipped. Never unpickles."""
    try:
        data = decoder.decode(raw)
    except decode_error:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            # Pickle starts with PROTO (0x80) and a protocol number.
            return (
                "pickled"
                if raw[:1] == b"\x80" and raw[1:2] in b"\x02\x03\x04\x05"
                else "undecodable"
            )
    return data if isinstance(data, dict) else "undecodable"


def _redis_rows(source: Any, prefix: str) -> _Rows:
    import redis

    client = redis.Redis.from_url(source) if isinstance(source, str) else source
    pattern = prefix.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?") + "*"
    try:
        for name in client.scan_iter(match=pattern, count=500):
            key = name.decode() if isinstance(name, bytes) else str(name)
            pipe = client.pipeline(transaction=False)
            pipe.get(name)
            pipe.pttl(name)
            raw, ttl = pipe.execute()
            remaining = None if ttl is None or ttl < 0 else ttl / 1000
            yield key[len(prefix) :], raw, remaining
    finally:
        if client is not source:  # made here from a URL: its connections go too
            client.close()


def _sql_rows(source: Any, table: str, prefix: str, now: float) -> _Rows:
    from sqlalchemy import (
        Column,
        DateTime,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Table,
        create_engine,
        select,
    )

    engine = create_engine(source) if isinstance(source, str) else source
    sessions = Table(
        table,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("session_id", String(255)),
        Column("data", LargeBinary),
        Column("expiry", DateTime),
    )
    last = -1
    try:
        while True:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(sessions).where(sessions.c.id > last).order_by(sessions.c.id).limit(500)
                ).all()
            if not rows:
                return
            for row in rows:
                last = row.id
                sid = row.session_id or ""
                if not sid.startswith(prefix):
                    continue
                expiry = row.expiry  # Flask-Session writes naive UTC datetimes
                remaining = None if expiry is None else expiry.replace(tzinfo=UTC).timestamp() - now
                yield sid[len(prefix) :], row.data, remaining
    finally:
        if engine is not source:  # made here from a URL: its pooled connections go too
            engine.dispose()


def import_flask_session(
    manager: SessionManager,
    source: Any,
    *,
    key_prefix: str = "session:",
    table: str = "sessions",
) -> ImportReport:
    """Copy Flask-Session 0.8 sessions into Cloakroom's store.

    ``source`` is a Redis URL or client (``redis://...``) or an SQLAlchemy URL
    or engine of the database with Flask-Session's ``table``.  Each live
    session becomes a Cloakroom session keyed by a hash of its Flask-Session
    id; set ``CLOAKROOM_ADOPT_FLASK_SESSION = True`` so the browsers' cookies
    find them.  Running it twice imports nothing twice.  Pickled records
    (Flask-Session before 0.7) are never unpickled: they are counted in
    ``report.pickled`` and skipped.
    """
    decoder, decode_error = _decoders()
    now = manager.now()
    is_redis = (
        isinstance(source, str) and source.startswith(("redis://", "rediss://", "unix://"))
    ) or (type(source).__module__.startswith("redis."))
    rows = (
        _redis_rows(source, key_prefix) if is_redis else _sql_rows(source, table, key_prefix, now)
    )
    adoption = Adoption(manager)
    report = ImportReport()
    with contextlib.closing(rows):  # what the rows' source opened is closed on an error too
        for sid, raw, remaining in rows:
            report.examined += 1
            if raw is None or (remaining is not None and remaining <= 0):
                report.expired += 1
                continue
            data = _decode(bytes(raw), decoder, decode_error)
            if isinstance(data, str):
                setattr(report, data, getattr(report, data) + 1)
                continue
            meta = adoption.new_meta(data, now, None)
            key = store_key(flask_session_id(sid))
            record = manager._record(key, meta, manager.codec.tag(data), 1)
            if manager.store.save(record, expected=None, now=now):
                report.imported += 1
            else:
                report.already_there += 1
    return report
