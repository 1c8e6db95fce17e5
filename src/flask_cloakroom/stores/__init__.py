"""Session stores: the :class:`Store` contract and one module per backend.

:func:`open_store` turns a ``CLOAKROOM_STORE`` URL into a store.  Backends
with optional dependencies are imported only when used, and a missing driver
is reported with the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

from ..errors import ConfigError
from .base import BUSY_POLL_US, Record, Store

__all__ = ["Record", "Store", "open_store"]

_KEY = "CLOAKROOM_STORE"
_ASYNC_KEY = "CLOAKROOM_SQL_ASYNC_COMMIT"
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel", "redis+cluster"})
#: The schemes of stores that are not SQL databases.
_NOT_SQL = _REDIS_SCHEMES | {"memory", "cookie", "file"}
_URL_FORMS = (
    "memory://, file:///dir, sqlite:///path, postgresql+psycopg://user@host/db, "
    "mysql+pymysql://user@host/db (or pass a Store)"
)
_DRIVERS = {
    "postgresql": ("psycopg", "postgres"),
    "mysql": ("pymysql", "mysql"),
    "mariadb": ("pymysql", "mysql"),
}


def open_store(
    url: str,
    *,
    sql_table: str = "cloakroom_sessions",
    timeout: float = 1.0,
    redis_prefix: str = "cloakroom:",
    redis_wait_replicas: int = 0,
    redis_client_cache: int = 0,
    busy_poll_us: int = BUSY_POLL_US,
    sql_async_commit: bool = False,
) -> Store:
    """Open the store a ``CLOAKROOM_STORE`` URL names.

    ``memory://``, ``file:///dir``, Redis (``redis://``, ``rediss://``,
    ``unix://``, ``redis+sentinel://``, ``redis+cluster://``) and any SQLAlchemy
    URL (``sqlite:///path``, ``postgresql+psycopg://...``, ``mysql+pymysql://...``).
    ``timeout`` (seconds) bounds connecting, waiting for locks and pooled
    connections, and each operation.  ``busy_poll_us`` is how long a Redis or
    PostgreSQL connection polls for an answer before it sleeps
    (``CLOAKROOM_BUSY_POLL``).  ``sql_async_commit``: PostgreSQL's session
    writes commit without waiting for the disk (``CLOAKROOM_SQL_ASYNC_COMMIT``).
    Raises :class:`~flask_cloakroom.errors.ConfigError` for an unknown scheme, a
    missing driver, or ``sql_async_commit`` on a store other than PostgreSQL.
    """
    scheme = url.split("://", 1)[0].lower()
    if sql_async_commit and scheme in _NOT_SQL:
        raise ConfigError(_ASYNC_KEY, _not_postgres(f"a {scheme}:// store"))
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "cookie":
        from .cookie import CookieStore

        return CookieStore()
    if scheme == "file":
        from .files import FileStore

        path = url[len("file://") :]
        if not path.startswith("/"):
            raise ConfigError(
                _KEY,
                "a file store URL needs an absolute path, like "
                f"file:///var/lib/app/sessions; got {url!r}",
            )
        return FileStore(path)
    if scheme in _REDIS_SCHEMES:
        store: Store = _import_redis().open_redis_store(
            url,
            prefix=redis_prefix,
            timeout=timeout,
            wait_replicas=redis_wait_replicas,
            client_cache=redis_client_cache,
            busy_poll_us=busy_poll_us,
        )
        return store
    return _open_sql(url, scheme, sql_table, timeout, busy_poll_us, sql_async_commit)


def wrap_client(
    client: Any,
    *,
    sql_table: str = "cloakroom_sessions",
    redis_prefix: str = "cloakroom:",
    redis_wait_replicas: int = 0,
    redis_client_cache: int = 0,
    busy_poll_us: int = BUSY_POLL_US,
    timeout: float = 1.0,
    sql_async_commit: bool = False,
) -> Store:
    """Make a store around a ready client: a redis-py client or an SQLAlchemy engine."""
    module = type(client).__module__
    if module.startswith("sqlalchemy."):
        from .sql import SQLStore

        return SQLStore(
            client,
            table=sql_table,
            busy_timeout=timeout,
            busy_poll_us=busy_poll_us,
            async_commit=sql_async_commit,
        )
    if sql_async_commit:
        raise ConfigError(_ASYNC_KEY, _not_postgres(f"a {type(client).__name__}"))
    if module.startswith("redis."):
        store: Store = _import_redis().RedisStore(
            client,
            prefix=redis_prefix,
            wait_replicas=redis_wait_replicas,
            wait_timeout=timeout,
            client_cache=redis_client_cache,
            busy_poll_us=busy_poll_us,
        )
        return store
    raise ConfigError(_KEY, f"cannot make a store from a {type(client).__name__}")


def _import_redis() -> Any:
    try:
        redis_store = importlib.import_module("flask_cloakroom.stores.redis")
    except ImportError as error:
        raise ConfigError(
            _KEY, "the Redis store needs redis-py: pip install 'flask-cloakroom[redis]'"
        ) from error
    return redis_store


def _not_postgres(what: str) -> str:
    return (
        f"is for PostgreSQL (its synchronous_commit), and the store is {what}: "
        "remove the key, or use a postgresql+psycopg:// store"
    )


def _open_sql(
    url: str, scheme: str, sql_table: str, timeout: float, busy_poll_us: int, async_commit: bool
) -> Store:
    try:
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError as error:  # pragma: no cover - SQLAlchemy is a dependency
        raise ConfigError(_KEY, "SQL stores need SQLAlchemy: pip install sqlalchemy") from error
    try:
        parsed = make_url(url)
        parsed.get_dialect()  # the dialect module only; the driver is imported below
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise ConfigError(
            _KEY,
            f"{scheme!r} is not a known store, or its URL is malformed ({error}): use "
            + _URL_FORMS,
        ) from error
    from sqlalchemy import create_engine

    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.host:
        raise ConfigError(
            _KEY,
            f"an SQLite URL names no host ({parsed.host!r}): write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db",
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            _KEY,
            "an in-memory SQLite database lives in a single connection and cannot hold "
            "sessions: use memory:// for a store in memory, or sqlite:///path/to/file.db",
        )
    if backend == "sqlite":
        assert parsed.database is not None  # refused above
        folder = os.path.dirname(os.path.abspath(parsed.database))
        if not os.path.isdir(folder):
            raise ConfigError(_KEY, f"the folder of the SQLite file does not exist: {folder}")
    options = _engine_options(backend, parsed.get_driver_name(), timeout)
    given = parsed.query.get("options")
    if "options" in options.get("connect_args", {}) and given:
        # The URL's own libpq options (?options=-c search_path=app) come after the
        # store's, so they are kept, and win where both set the same parameter.
        own = " ".join(given) if isinstance(given, tuple) else given
        options["connect_args"]["options"] += " " + own
    try:
        engine = create_engine(parsed, **options)
    except ArgumentError as error:
        raise ConfigError(
            _KEY, f"the store URL is malformed ({error}); see {_URL_FORMS}"
        ) from error
    except ImportError as error:
        driver = parsed.get_driver_name()
        module, extra = _DRIVERS.get(backend, (driver, None))
        if extra is None:
            fix = f"install the {driver} package"
        elif driver == module:
            fix = f"pip install 'flask-cloakroom[{extra}]'"
        else:
            fix = (
                f"install {driver}, or use {backend}+{module}:// and "
                f"pip install 'flask-cloakroom[{extra}]'"
            )
        raise ConfigError(
            _KEY, f"the database driver for {scheme!r} is not installed: {fix}"
        ) from error
    from .sql import SQLStore

    return SQLStore(
        engine,
        table=sql_table,
        busy_timeout=timeout,
        busy_poll_us=busy_poll_us,
        async_commit=async_commit,
    )


def _engine_options(backend: str, driver: str, timeout: float) -> dict[str, Any]:
    """Connection settings that keep every operation within ``timeout`` seconds."""
    whole = max(1, math.ceil(timeout))
    millis = int(timeout * 1000)
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args = {"timeout": timeout, "check_same_thread": False}
    elif backend == "postgresql" and driver == "psycopg":
        connect_args = {
            "connect_timeout": max(2, whole),  # libpq's minimum is 2 seconds
            "tcp_user_timeout": millis,
            "options": f"-c statement_timeout={millis}",
        }
    elif backend in ("mysql", "mariadb") and driver == "pymysql":
        connect_args = {  # PyMySQL takes fractions of a second
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "write_timeout": timeout,
            # Bound waits for row locks (update_locked) by the store timeout too
            # (whole seconds: the server's variable is an integer).
            "init_command": f"SET SESSION innodb_lock_wait_timeout = {whole}",
        }
    return {"pool_timeout": timeout, "connect_args": connect_args}
