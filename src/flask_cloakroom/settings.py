"""Configuration: every ``CLOAKROOM_*`` key, defined once, validated once.

:data:`OPTIONS` is the single definition of the configuration keys: their
type, default, documentation and parser.  :func:`load_settings` reads an app's
config into a frozen :class:`Settings` at ``init_app`` time; any unknown
``CLOAKROOM_*`` key or bad value raises :class:`~flask_cloakroom.errors.ConfigError`
naming the key and the fix.  The configuration reference in the docs is
generated from :data:`OPTIONS`.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from werkzeug.http import dump_cookie

from .activity import EVENT_KINDS, LOGGED_KINDS, TrustedProxies
from .crypto import parse_key
from .errors import ConfigError
from .rules import parse_rules
from .stores.base import BUSY_POLL_US, PURGE_PACE, Store, busy_poll_micros

PREFIX = "CLOAKROOM_"


@dataclass(frozen=True, slots=True)
class Option:
    """The definition of one ``CLOAKROOM_*`` configuration key."""

    name: str
    type: str
    default: Any
    doc: str
    example: str
    parse: Callable[[str, Any], Any]

    @property
    def key(self) -> str:
        return PREFIX + self.name


def _duration(key: str, value: Any) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(
            key,
            f"expected a datetime.timedelta or a number of seconds, got {value!r} "
            f"({type(value).__name__}). Example: {key} = timedelta(minutes=30)",
        )
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ConfigError(key, f"must be zero or more seconds, got {value!r}")
    return seconds


def _positive_duration(key: str, value: Any) -> float:
    seconds = _duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"must be longer than zero, got {value!r}")
    return seconds


def _positive_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, f"expected a whole number above zero, got {value!r}")
    return value


def _store(key: str, value: Any) -> Any:
    if value is None or isinstance(value, Store) or _is_client(value):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and "://" in value:
        return value
    raise ConfigError(
        key,
        f"expected a store URL such as 'sqlite:///sessions.db', 'memory://', "
        f"'file:///var/lib/app/sessions', 'postgresql+psycopg://...' or a "
        f"flask_cloakroom.stores.Store instance, got {value!r}",
    )


def _is_client(value: Any) -> bool:
    """Whether ``value`` is a ready database client Cloakroom can wrap (redis-py, SQLAlchemy)."""
    module = type(value).__module__
    return module.startswith(("redis.", "sqlalchemy."))


def _redis_prefix(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.isascii() or "{" in value or "}" in value:
        raise ConfigError(
            key,
            f"expected a short ASCII text without braces (braces pick Redis Cluster hash "
            f"slots), got {value!r}. Example: 'myapp:sessions:'",
        )
    return value


def _non_negative_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(key, f"expected a whole number, zero or more, got {value!r}")
    return value


def _pace(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(
            key, f"expected a number (times a batch's time), got {value!r}. Example: {key} = 2.0"
        )
    if not 0 <= value <= 100:  # NaN fails this too; the CLI's --pace has the same range
        raise ConfigError(key, f"must be from 0 (no rest) to 100, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected True or False, got {value!r}")
    return value


def _encryption_keys(key: str, value: Any) -> tuple[tuple[str, bytes], ...]:
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ConfigError(key, f"expected a list of keys (the first encrypts), got {value!r}")
    keys = []
    for position, text in enumerate(value):
        try:
            keys.append(parse_key(text))
        except ValueError as error:
            raise ConfigError(
                key,
                f"entry {position}: {error}. Make a key with `flask cloakroom keygen` or "
                "flask_cloakroom.crypto.generate_key()",
            ) from None
    ids = [kid for kid, _ in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError(key, "two keys have the same id: give each key its own 'id:' prefix")
    return tuple(keys)


def _optional_callable(key: str, value: Any) -> Callable[..., Any] | None:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    raise ConfigError(key, f"expected a function or None, got {value!r}")


def _optional_positive_int(key: str, value: Any) -> int | None:
    return None if value is None else _positive_int(key, value)


def _trusted_proxies(key: str, value: Any) -> TrustedProxies:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple) and value:
        try:
            return tuple(ipaddress.ip_network(v) for v in value)
        except (ValueError, TypeError) as error:
            raise ConfigError(key, f"{error}. Example: ['10.0.0.0/8', '172.16.0.0/12']") from None
    raise ConfigError(
        key,
        f"expected how many proxies stand in front of the app (0 = trust no "
        f"X-Forwarded-For) or a list of their networks, got {value!r}",
    )


def _event_kinds(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or any(k not in EVENT_KINDS for k in value):
        raise ConfigError(key, f"expected a list of event kinds from {', '.join(EVENT_KINDS)}")
    return tuple(value)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(
                key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return str(value)

    return parse


def _rules(key: str, value: Any) -> dict[str, dict[str, Any]]:
    return parse_rules(value)


def _optional_text(key: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ConfigError(key, f"expected an endpoint name or None, got {value!r}")


def _identifier(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.replace("_", "").isalnum() or not value.isascii():
        raise ConfigError(key, f"expected a table name of letters, digits and _, got {value!r}")
    return value


def _on_store_error(key: str, value: Any) -> Callable[[Exception], Any] | None:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    raise ConfigError(key, f"expected a callable taking the StoreError, or None; got {value!r}")


OPTIONS: tuple[Option, ...] = (
    Option(
        "STORE",
        "str | Store | redis.Redis | sqlalchemy.Engine | None",
        None,
        "Where sessions are kept: a store URL, a Store instance, or a ready client "
        "(a redis-py ``Redis``/``RedisCluster``, or an SQLAlchemy ``Engine``). The "
        "default is an SQLite file, ``cloakroom.sqlite3``, in the app's instance folder. "
        "URLs: ``memory://``, ``sqlite:///path``, ``file:///dir``, any SQLAlchemy URL "
        "(``postgresql+psycopg://...``, ``mysql+pymysql://...``), Redis: "
        "``redis://``, ``rediss://``, ``unix://``, "
        "``redis+sentinel://host:port,host:port/service``, "
        "``redis+cluster://host:port,host:port``; and ``cookie://`` to keep each "
        "session, encrypted, in its cookie (no server state; see docs/encryption.md).",
        '"postgresql+psycopg://app@db/app"',
        _store,
    ),
    Option(
        "IDLE_TIMEOUT",
        "timedelta | float",
        timedelta(minutes=30),
        "A session not used for this long is dead (enforced on the server). Precise to "
        "within CLOAKROOM_TOUCH_INTERVAL: activity is recorded at most that often.",
        "timedelta(minutes=30)",
        _positive_duration,
    ),
    Option(
        "ABSOLUTE_TIMEOUT",
        "timedelta | float",
        timedelta(hours=12),
        "Every session is dead this long after it began (after login, for a logged-in "
        "session), however active it is.",
        "timedelta(hours=12)",
        _positive_duration,
    ),
    Option(
        "REMEMBER_IDLE_TIMEOUT",
        "timedelta | float",
        timedelta(days=14),
        "The idle timeout of sessions started with ``login(..., remember=True)``.",
        "timedelta(days=14)",
        _positive_duration,
    ),
    Option(
        "REMEMBER_ABSOLUTE_TIMEOUT",
        "timedelta | float",
        timedelta(days=30),
        "The absolute timeout of sessions started with ``login(..., remember=True)``.",
        "timedelta(days=30)",
        _positive_duration,
    ),
    Option(
        "TOUCH_INTERVAL",
        "timedelta | float",
        timedelta(seconds=60),
        "A request that only reads the session records its last-seen time at most this "
        "often, so most requests write nothing. Must be under half the idle timeouts.",
        "timedelta(seconds=60)",
        _duration,
    ),
    Option(
        "MAX_RECORD_SIZE",
        "int",
        64 * 1024,
        "The largest encoded session, in bytes. A bigger session is refused with "
        "RecordTooLarge when it would be written; the stored session stays as it was.",
        "65536",
        _positive_int,
    ),
    Option(
        "DECODED_CACHE_SIZE",
        "int",
        1024,
        "How many sessions' last payload each process remembers in decoded form, so that "
        "a record read again unchanged is not decrypted and parsed again (payloads up to "
        "4 KB). It holds what the process's own requests already read or wrote; 0 turns "
        "it off.",
        "0",
        _non_negative_int,
    ),
    Option(
        "SQL_TABLE",
        "str",
        "cloakroom_sessions",
        "The table the SQL store creates and uses (SQLite, PostgreSQL, MySQL/MariaDB).",
        '"cloakroom_sessions"',
        _identifier,
    ),
    Option(
        "SQL_ASYNC_COMMIT",
        "bool",
        False,
        "PostgreSQL only: commit session writes without waiting for them to reach the "
        "disk (synchronous_commit = off on the store's own connections), for faster "
        "writes. A crash of the database server (not of the app) can lose the writes of "
        "its last moments (up to about three times wal_writer_delay: 0.6 s by default): "
        "those sessions read back as they were before. Logouts, revocations and every "
        "other deletion stay durable, and nothing is ever corrupted. Other databases: "
        "a ConfigError. See docs/stores.md.",
        "True",
        _bool,
    ),
    Option(
        "ENCRYPTION_KEYS",
        "list[str] | None",
        None,
        "Encrypt every stored session with AES-256-GCM. A list of keys, each URL-safe "
        "base64 of 32 random bytes, optionally written 'id:key' to name them in your "
        "configuration (ids are not stored); the first encrypts, all decrypt. To rotate, "
        "put a new key first, run `flask cloakroom rekey` (or cloak.rekey()), then drop "
        "the old key. Unset: no encryption.",
        '["2024b:q2m...=", "2023a:Zk1...="]',
        _encryption_keys,
    ),
    Option(
        "ENCRYPTION_ACCEPT_PLAINTEXT",
        "bool",
        False,
        "While turning encryption on for an existing store: also read records written "
        "before it (they are encrypted on their next write, or by rekey). Turn it off "
        "again afterwards: while on, someone who can write to the store can plant "
        "unencrypted records.",
        "True",
        _bool,
    ),
    Option(
        "HASH_USER_IDS",
        "bool",
        False,
        "Index sessions by a keyed hash of the user id (derived from SECRET_KEY) instead "
        "of the id itself, so the store holds no readable user ids. The id is still "
        "inside the (encrypted) payload, so listing and revoking work as before.",
        "True",
        _bool,
    ),
    Option(
        "REDIS_PREFIX",
        "str",
        "cloakroom:",
        "The prefix of every Redis key Cloakroom writes, so several apps can share one "
        "Redis. No braces (they choose Redis Cluster hash slots).",
        '"shop:sessions:"',
        _redis_prefix,
    ),
    Option(
        "REDIS_WAIT_REPLICAS",
        "int",
        0,
        "After each write, wait (up to half of CLOAKROOM_STORE_TIMEOUT, so the reply "
        "arrives within the socket timeout) until this many Redis replicas have it (Redis "
        "WAIT), so an acknowledged session, logout or revocation survives a failover; if "
        "fewer acknowledge in time, the request still succeeds and a warning is logged. "
        "0 does not wait: a failover can lose the last writes.",
        "1",
        _non_negative_int,
    ),
    Option(
        "REDIS_CLIENT_CACHE",
        "int",
        0,
        "Keep up to this many session records in each worker process and serve "
        "read-only requests from them, with no Redis round trip, until Redis says a "
        "record changed (server-assisted client-side caching: CLIENT TRACKING, Redis "
        "6.0+). A revoked or changed session is never served once Redis's message has "
        "reached the process. Standalone Redis only (not Cluster or Sentinel); one extra "
        "connection per process. 0 turns it off. See docs/redis.md.",
        "10000",
        _non_negative_int,
    ),
    Option(
        "BUSY_POLL",
        "int",
        BUSY_POLL_US,
        "Microseconds a Redis or PostgreSQL connection asks for the server's answer "
        "again and again before it sleeps until the answer comes. A server on the same "
        "machine answers in that time, so the worker is never put to sleep and woken "
        "again: about 30 µs less a round trip on a virtual machine. A wait that runs out "
        "sleeps as before, and later waits (of that statement, on PostgreSQL) skip the "
        "polling for a while, so a distant server or a slow statement costs almost no "
        "CPU; and a worker that has been waiting for a CPU more than half the time "
        "(more busy workers than cores) sleeps instead of polling until that passes. "
        "0 turns it off; at most 1000. Redis: plain TCP and Unix sockets on Linux "
        "(not TLS). PostgreSQL: through psycopg 3. See docs/redis.md and docs/stores.md.",
        "0",
        busy_poll_micros,
    ),
    Option(
        "TRUSTED_PROXIES",
        "int | list[str]",
        0,
        "How to find the client's IP behind proxies: the number of proxies in front of "
        "the app, each of which appends to X-Forwarded-For, or the list of their "
        "networks. 0 ignores X-Forwarded-For, which any client can forge.",
        '1  # or ["10.0.0.0/8"]',
        _trusted_proxies,
    ),
    Option(
        "GEOLOCATE",
        "Callable[[str], str | None] | None",
        None,
        "A function from an IP address to a place name (a city or a country), shown "
        "with sessions and used by the distant_ips rule. Called at login and when a "
        "session's IP changes, never on other requests.",
        "lambda ip: geoip.country(ip)",
        _optional_callable,
    ),
    Option(
        "ACTIVITY_RETENTION",
        "timedelta | float",
        timedelta(days=90),
        "How long the store keeps the activity log (logins, logouts, revocations, "
        "anomalies). Older events are pruned as new ones arrive and by purge.",
        "timedelta(days=30)",
        _positive_duration,
    ),
    Option(
        "PURGE_PACE",
        "float",
        PURGE_PACE,
        "How long a purge (flask cloakroom purge, cloak.purge_expired()) rests after each "
        "batch it deletes, in multiples of the time the batch took, so the app's requests "
        "do not queue behind it on a busy database. 2.0 keeps the store free two thirds "
        "of the time, 1.0 half; 0 purges back to back, fastest. The CLI's --pace and "
        "purge_expired(pace=) override it.",
        "3.0",
        _pace,
    ),
    Option(
        "ACTIVITY_KINDS",
        "list[str]",
        LOGGED_KINDS,
        "The event kinds kept in the store's activity log. Every kind is still sent to "
        "signals and the logger. 'created' is left out by default: it would log every "
        "anonymous visitor.",
        '["login", "logout", "revoked", "anomaly"]',
        _event_kinds,
    ),
    Option(
        "RULES",
        "dict[str, str | dict | None]",
        None,
        "Turn the unusual-activity rules on or off and choose their actions, merged "
        "over the defaults: ip_change=log, ua_change=revoke, distant_ips=notify, "
        "new_device=notify, new_network=log, login_burst=notify. See docs/activity.md.",
        '{"ua_change": "require_reauth", "ip_change": None}',
        _rules,
    ),
    Option(
        "MAX_SESSIONS_PER_USER",
        "int | None",
        None,
        "The most live sessions one user may have. At a login over the limit, "
        "CLOAKROOM_SESSION_LIMIT_POLICY decides. None: no limit.",
        "5",
        _optional_positive_int,
    ),
    Option(
        "SESSION_LIMIT_POLICY",
        "str",
        "evict_oldest",
        "What a login over CLOAKROOM_MAX_SESSIONS_PER_USER does: 'evict_oldest' ends the "
        "least recently used sessions (an 'evicted' event each), 'refuse' makes "
        "login() raise TooManySessions.",
        '"refuse"',
        _choice("evict_oldest", "refuse"),
    ),
    Option(
        "CREDENTIAL_FINGERPRINT",
        "Callable[[str], str | None] | None",
        None,
        "A function from a user id to something that changes when the user's "
        "credentials do (a password hash, a counter). Sessions made under another "
        "fingerprint end on their next request. Called on each request of a "
        "logged-in session.",
        "lambda user_id: User.query.get(user_id).password_hash",
        _optional_callable,
    ),
    Option(
        "REAUTH_VIEW",
        "str | None",
        None,
        "The endpoint fresh_login_required redirects to (with ?next=) when a login is "
        "too old or a rule asked for re-authentication. None: respond 401.",
        '"auth.login"',
        _optional_text,
    ),
    Option(
        "ADOPT_FLASK_COOKIES",
        "bool",
        False,
        "Move sessions from Flask's cookie session into Cloakroom without logging anyone "
        "out: a valid Flask session cookie (same SECRET_KEY or fallbacks, within "
        "PERMANENT_SESSION_LIFETIME) becomes a server-side session. A stolen old cookie "
        "stays usable until it expires: turn this off once the switch is done.",
        "True",
        _bool,
    ),
    Option(
        "ADOPT_FLASK_SESSION",
        "bool",
        False,
        "Accept Flask-Session's cookies for sessions copied over with "
        "cloak.import_flask_session(); each is re-issued in Cloakroom's format.",
        "True",
        _bool,
    ),
    Option(
        "ADOPT_USER_KEY",
        "str | None",
        None,
        "The session key that names the logged-in user in adopted sessions (Flask-Login "
        "uses '_user_id'): adopted sessions are bound to that user.",
        '"_user_id"',
        _optional_text,
    ),
    Option(
        "METRICS",
        "bool",
        False,
        "Export Prometheus metrics (events by kind, live sessions, store latency) with "
        "prometheus-client: pip install 'flask-cloakroom[metrics]'.",
        "True",
        _bool,
    ),
    Option(
        "STORE_TIMEOUT",
        "timedelta | float",
        timedelta(seconds=1),
        "How long a store operation may take before the request gives up with a 503: "
        "connect and socket timeouts for stores opened from a URL, SQLite's busy "
        "timeout, and the wait for a pooled connection. Stores you build yourself "
        "keep their own settings. After an attempt to connect fails, the SQL and Redis "
        "stores make no other for 50 to 500 ms, and never for less than the attempt "
        "took: the requests in between get the 503 at once.",
        "timedelta(seconds=1)",
        _positive_duration,
    ),
    Option(
        "ON_STORE_ERROR",
        "Callable[[StoreError], object] | None",
        None,
        "Called when a view touches the session while the store is failing. Return None "
        "for the default (HTTP 503 with Retry-After), or a response to send instead.",
        "lambda error: ('Down for maintenance', 503)",
        _on_store_error,
    ),
    Option(
        "RETRY_AFTER",
        "int",
        5,
        "Seconds sent in the Retry-After header of the 503 a request gets when the "
        "store is unavailable.",
        "5",
        _positive_int,
    ),
)

_BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True, slots=True)
class CookieSettings:
    """Flask's ``SESSION_COOKIE_*`` settings, as Cloakroom applies them."""

    name: str
    domain: str | None
    path: str
    httponly: bool
    secure: bool
    samesite: Literal["Lax", "Strict", "None"] | None
    partitioned: bool


@dataclass(frozen=True, slots=True)
class Settings:
    """All of an app's Cloakroom settings, validated, with durations in seconds."""

    store: Any
    idle_timeout: float
    absolute_timeout: float
    remember_idle_timeout: float
    remember_absolute_timeout: float
    touch_interval: float
    max_record_size: int
    decoded_cache_size: int
    sql_table: str
    sql_async_commit: bool
    encryption_keys: tuple[tuple[str, bytes], ...]
    encryption_accept_plaintext: bool
    hash_user_ids: bool
    trusted_proxies: TrustedProxies
    geolocate: Callable[[str], str | None] | None
    activity_retention: float
    purge_pace: float
    activity_kinds: tuple[str, ...]
    rules: dict[str, dict[str, Any]]
    max_sessions_per_user: int | None
    session_limit_policy: str
    credential_fingerprint: Callable[[str], str | None] | None
    reauth_view: str | None
    adopt_flask_cookies: bool
    adopt_flask_session: bool
    adopt_user_key: str | None
    metrics: bool
    redis_prefix: str
    redis_wait_replicas: int
    redis_client_cache: int
    busy_poll: int
    store_timeout: float
    on_store_error: Callable[[Exception], Any] | None
    retry_after: int
    secret_keys: tuple[str | bytes, ...]
    cookie: CookieSettings
    #: Flask's PERMANENT_SESSION_LIFETIME in seconds (the age limit of adopted cookies).
    flask_cookie_max_age: float


def _secret_keys(config: Mapping[str, Any]) -> tuple[str | bytes, ...]:
    secret = config.get("SECRET_KEY")
    if not secret or not isinstance(secret, str | bytes):
        raise ConfigError(
            "SECRET_KEY",
            "is not set. Cloakroom signs session cookies with it: set "
            "app.config['SECRET_KEY'] to a long random value (for example "
            "secrets.token_hex(32)) before calling init_app.",
        )
    fallbacks = config.get("SECRET_KEY_FALLBACKS") or []
    if not isinstance(fallbacks, list | tuple) or not all(
        isinstance(k, str | bytes) and k for k in fallbacks
    ):
        raise ConfigError("SECRET_KEY_FALLBACKS", "must be a list of non-empty keys")
    return (secret, *fallbacks)


def _cookie(config: Mapping[str, Any]) -> CookieSettings:
    name = config.get("SESSION_COOKIE_NAME") or "session"
    if not isinstance(name, str) or not name.isascii() or any(c in name for c in ' =;,\t"'):
        raise ConfigError("SESSION_COOKIE_NAME", f"is not a valid cookie name: {name!r}")
    domain = config.get("SESSION_COOKIE_DOMAIN") or None
    path = config.get("SESSION_COOKIE_PATH") or config.get("APPLICATION_ROOT") or "/"
    # Flask's default is None (no attribute); Cloakroom's is Lax. False omits it.
    samesite: Any = config.get("SESSION_COOKIE_SAMESITE")
    if samesite is None:
        samesite = "Lax"
    elif samesite is False:
        samesite = None
    elif samesite not in ("Lax", "Strict", "None"):
        raise ConfigError(
            "SESSION_COOKIE_SAMESITE",
            f"must be 'Lax' (the default), 'Strict', 'None', or False for no attribute; "
            f"got {samesite!r}",
        )
    secure = bool(config.get("SESSION_COOKIE_SECURE", False))
    partitioned = bool(config.get("SESSION_COOKIE_PARTITIONED", False))
    if name.startswith("__Host-"):
        if domain:
            raise ConfigError(
                "SESSION_COOKIE_DOMAIN",
                f"a cookie named {name!r} (__Host- prefix) must not have a Domain: "
                "remove SESSION_COOKIE_DOMAIN or rename the cookie",
            )
        if path != "/":
            raise ConfigError(
                "SESSION_COOKIE_PATH",
                f"a cookie named {name!r} (__Host- prefix) must have Path=/, got {path!r}",
            )
        secure = True
    elif name.startswith("__Secure-"):
        secure = True
    if samesite == "None" and not secure:
        raise ConfigError(
            "SESSION_COOKIE_SECURE",
            "browsers drop SameSite=None cookies that are not Secure: set "
            "SESSION_COOKIE_SECURE = True or choose another SESSION_COOKIE_SAMESITE",
        )
    if partitioned and not secure:
        raise ConfigError(
            "SESSION_COOKIE_SECURE", "a partitioned cookie must be Secure: set it to True"
        )
    if partitioned and "partitioned" not in inspect.signature(dump_cookie).parameters:
        raise ConfigError(
            "SESSION_COOKIE_PARTITIONED",
            "needs Werkzeug 3.1 or newer (Flask 3.1): upgrade, or turn it off",
        )
    httponly = bool(config.get("SESSION_COOKIE_HTTPONLY", True))
    return CookieSettings(name, domain, path, httponly, secure, samesite, partitioned)


def load_settings(config: Mapping[str, Any]) -> Settings:
    """Read and validate an app's configuration.

    Raises :class:`ConfigError` naming the first bad key.
    """
    for key in config:
        if key.startswith(PREFIX) and key not in _BY_KEY:
            close = difflib.get_close_matches(key, _BY_KEY, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(
                key,
                f"is not a Flask-Cloakroom setting.{hint} The settings are listed in "
                "docs/configuration.md.",
            )
    values = {o.name.lower(): o.parse(o.key, config.get(o.key, o.default)) for o in OPTIONS}
    touch = values["touch_interval"]
    for idle_name, absolute_name in (
        ("idle_timeout", "absolute_timeout"),
        ("remember_idle_timeout", "remember_absolute_timeout"),
    ):
        idle, absolute = values[idle_name], values[absolute_name]
        if idle > absolute:
            raise ConfigError(
                PREFIX + idle_name.upper(),
                f"({idle:g} s) is longer than {PREFIX + absolute_name.upper()} "
                f"({absolute:g} s), so it would never apply: shorten it or raise the latter",
            )
        if touch * 2 > idle:
            raise ConfigError(
                PREFIX + "TOUCH_INTERVAL",
                f"({touch:g} s) must be at most half of {PREFIX + idle_name.upper()} "
                f"({idle:g} s), or active sessions could expire: lower it",
            )
    lifetime = config.get("PERMANENT_SESSION_LIFETIME", timedelta(days=31))
    return Settings(
        **values,
        secret_keys=_secret_keys(config),
        cookie=_cookie(config),
        flask_cookie_max_age=_duration("PERMANENT_SESSION_LIFETIME", lifetime),
    )
