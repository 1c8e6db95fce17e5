"""What the performance benchmarks share: the bench app, servers, gunicorn, wrk, counters.

Used by ``benchmarks/run.py`` (every variant side by side), ``benchmarks/layer.py``
(the session layer's own CPU, in process), ``benchmarks/scale.py`` (a million
sessions), ``benchmarks/client_cache.py``, and ``benchmarks/load.py`` and
``benchmarks/soak.py`` (errors under load, a store restarted under load).

* **The bench app** (:func:`create_app`): the same three views on every session
  layer: ``POST /login`` puts a user, a cart and preferences in the session,
  ``GET /read`` only reads them, ``POST /write`` changes one value.  Both say
  ``user=<id>`` in their body, ``user=None`` when the session was lost, which the
  wrk script counts.  What it runs on is an :class:`AppSpec`, passed to gunicorn
  workers as JSON in ``CLOAKROOM_PERF_APP`` (``gunicorn '_apps:create_app()'``).
* **Throwaway servers** (:class:`Servers`): Redis, a Redis Cluster and PostgreSQL
  from the test suite's harness (``tests/servers.py``: binaries on PATH or pip
  packages, free loopback ports, removed at the end).  PostgreSQL is restarted with
  ``fsync=on`` and ``full_page_writes=on``: the harness turns them off for speed,
  and a durable commit is part of what is measured here.  :func:`store_server` gives
  one store of a kind (an SQLite file, or a throwaway PostgreSQL, MariaDB or Redis
  server as the harness makes it), which can be stopped and started again.
* **gunicorn and wrk** (:func:`start_gunicorn`, :class:`Wrk`): gunicorn from
  the running Python's virtualenv, wrk from PATH (checked, with how to get it).
* **Memory** (:func:`rss_kib`): a process's resident set size, from ``/proc``.
* **In process** (:class:`Browser`): a request through the WSGI callable,
  with the cookie kept between calls.
* **Counting store traffic**: Redis commands and round trips on the wire
  (``redis_round_trips.py``'s counting connection), Redis ``INFO commandstats``,
  SQLite's statement trace and PostgreSQL's statement log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, session
from flask.sessions import SecureCookieSession, SessionInterface, SessionMixin
from werkzeug.test import EnvironBuilder

from flask_cloakroom import Cloakroom
from flask_cloakroom.stores import Store
from flask_cloakroom.stores.base import BUSY_POLL_US

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
LOOPBACK = "127.0.0.1"
SECRET = "perf-benchmark-secret-" + "p" * 26
#: The browser every request claims to be (activity tracking records and compares it).
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
#: A fixed encryption key, so every process of a run shares it (benchmarks only!).
ENCRYPTION_KEY = "perf:cGVyZiBiZW5jaG1hcmsga2V5LCBub3Qgc2VjcmV0ISE="
ENV_SPEC = "CLOAKROOM_PERF_APP"
#: Every unusual-activity rule, turned off for the "activity off" variants.
RULES_OFF: dict[str, None] = dict.fromkeys(
    ("ip_change", "ua_change", "distant_ips", "new_device", "new_network", "login_burst")
)
CART = ["tea", "pen", "notebook"]
#: CLOAKROOM_REDIS_CLIENT_CACHE of the variants with the client-side cache.
CLIENT_CACHE = 10_000
#: Seconds the bare Redis round trips poll for their reply before sleeping (the store's
#: default CLOAKROOM_BUSY_POLL), so that the limit stays a limit.
BUSY_POLL = BUSY_POLL_US / 1_000_000
PREFS = {"theme": "dark", "lang": "en"}


# -- the bench app -----------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    """What a bench app runs on.

    ``layer``: ``none`` (a session interface that loads and saves nothing: the floor),
    ``bare-trips`` (the floor plus the bare round trips a session needs on ``store``:
    :class:`BareTripsInterface`), ``cookie`` (Flask's own), ``flask-session``
    (Flask-Session 0.8 on ``store``, a ``redis://`` or SQLAlchemy URL) or ``cloakroom``
    (on ``store``, any ``CLOAKROOM_STORE`` URL).  ``activity=False`` turns the
    unusual-activity rules and the activity log off.  ``client_cache`` (Redis only) turns on
    ``CLOAKROOM_REDIS_CLIENT_CACHE`` (see ``client_cache.py``).  ``redis_lane=False``
    (standalone Redis only) sends the store's commands through redis-py's own
    ``execute_command`` and pipelines, as before the store had its lane.
    ``decoded_cache=False`` decodes every record read, as before the codec remembered
    each session's last payload (``CLOAKROOM_DECODED_CACHE_SIZE = 0``).  ``config`` is
    added to the app's configuration (``CLOAKROOM_IDLE_TIMEOUT``, say).
    """

    layer: str
    store: str = ""
    encrypted: bool = False
    activity: bool = True
    prefix: str = "cloakroom-perf:"
    table: str = "cloakroom_perf"
    client_cache: bool = False
    redis_lane: bool = True
    decoded_cache: bool = True
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AppSpec:
        return cls(**json.loads(text))


class StaticSessionInterface(SessionInterface):
    """A session layer that costs nothing: every request gets the logged-in data,
    nothing is loaded, signed or saved.  The floor of the benchmarks."""

    def open_session(self, app: Flask, request: Any) -> SessionMixin:
        return SecureCookieSession({"user_id": "alice", "cart": list(CART), "prefs": dict(PREFS)})

    def save_session(self, app: Flask, session: SessionMixin, response: Any) -> None:
        return None


class BareTripsInterface(StaticSessionInterface):
    """The floor plus the bare store round trips a session needs, and nothing else:
    the physical limit of a session layer on that store.

    A read-only request makes one round trip, a modifying one two: on Redis a ``GET``
    (and a ``SET`` of a 300-byte value) on a plain socket, no client library, polled
    for the reply before sleeping as the store's lane is by default; on
    PostgreSQL a ``SELECT`` by primary key (and an ``UPDATE`` committed durably) as
    prepared statements on libpq, polled for as the store's are by default.  Each
    worker process opens its own connection on its first request.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name  # the Redis key, or the table, of this variant
        self._pid = -1
        self._trip: Callable[[bool], None] | None = None

    def open_session(self, app: Flask, request: Any) -> SessionMixin:
        if self._pid != os.getpid():
            self._trip = self._connect()
            self._pid = os.getpid()
        assert self._trip is not None
        self._trip(False)
        if request.method == "POST":
            self._trip(True)
        return super().open_session(app, request)

    def _connect(self) -> Callable[[bool], None]:
        from urllib.parse import urlsplit

        value = b"v" * 300
        if self.url.startswith("redis://"):
            parts = urlsplit(self.url)
            sock = socket.create_connection((parts.hostname or LOOPBACK, parts.port or 6379))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = self.name.encode()
            get = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
            put = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(key), key, len(value), value,
            )  # fmt: skip

            def redis_trip(write: bool) -> None:
                sock.sendall(put if write else get)
                reply = b""
                deadline = time.perf_counter() + BUSY_POLL
                while not reply and time.perf_counter() < deadline:  # as the store's lane
                    with contextlib.suppress(BlockingIOError):
                        reply = sock.recv(65536, socket.MSG_DONTWAIT)
                reply = reply or sock.recv(65536)
                if not reply or reply[:1] == b"-":
                    raise RuntimeError(f"Redis answered {reply[:80]!r}")

            redis_trip(True)
            return redis_trip
        import psycopg
        from psycopg import sql
        from sqlalchemy.engine import make_url

        from flask_cloakroom.stores.sql_pq import PQCursor, PQStatement

        url = make_url(self.url)
        conn = psycopg.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
        )
        table = sql.Identifier(self.name)
        create = "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, version int, payload bytea)"
        conn.execute(sql.SQL(create).format(table))
        insert = "INSERT INTO {} VALUES ('k', 1, %s) ON CONFLICT (key) DO NOTHING"
        conn.execute(sql.SQL(insert).format(table), (value,))
        # Prepared statements on libpq, polled for as the store's are by default.
        cursor = PQCursor(conn, {}, {}, BUSY_POLL)
        quoted = table.as_bytes(conn)
        select = PQStatement(
            b"bare_select",
            b"SELECT version, payload FROM %s WHERE key = 'k'" % quoted,
            (),
            returns_rows=True,
        )
        update = PQStatement(
            b"bare_update",
            b"UPDATE %s SET version = version + 1, payload = $1 WHERE key = 'k'" % quoted,
            ("payload",),
            returns_rows=False,
        )

        def postgres_trip(write: bool) -> None:
            if write:
                cursor.execute(update, (value,))
            else:
                cursor.execute(select)
                cursor.fetchone()

        return postgres_trip


def create_app(
    spec: AppSpec | None = None,
    *,
    store: Store | None = None,
    redis_client: Any = None,
) -> Flask:
    """The bench app on ``spec`` (default: the JSON in ``CLOAKROOM_PERF_APP``).

    ``store`` replaces the store Cloakroom would open from ``spec.store``, and
    ``redis_client`` the client Flask-Session would make: the benchmarks pass
    counting ones.
    """
    if spec is None:
        spec = AppSpec.from_json(os.environ[ENV_SPEC])
    app = Flask(__name__, instance_path=os.environ.get("CLOAKROOM_PERF_INSTANCE") or None)
    app.config.update(SECRET_KEY=SECRET)
    cloak: Cloakroom | None = None
    if spec.layer == "none":
        app.session_interface = StaticSessionInterface()
    elif spec.layer == "bare-trips":
        app.session_interface = BareTripsInterface(
            spec.store, spec.table if spec.store.startswith("postgres") else spec.prefix
        )
    elif spec.layer == "cookie":
        pass
    elif spec.layer == "flask-session":
        _flask_session(app, spec, redis_client)
    elif spec.layer == "cloakroom":
        cloak = _cloakroom(app, spec, store)
    else:
        raise ValueError(f"unknown session layer {spec.layer!r}")

    def user() -> str | None:
        if cloak is not None:
            return cloak.user_id
        found: str | None = session.get("user_id")
        return found

    @app.get("/health")
    def health() -> str:
        return "ok"  # never touches the session

    @app.post("/login")
    def login() -> str:
        from flask import request

        name = request.args.get("user", "alice")
        session["cart"] = list(CART)
        session["prefs"] = dict(PREFS)
        if cloak is not None:
            cloak.login(name)
        else:
            session["user_id"] = name
        return f"welcome user={name}"

    @app.get("/read")
    def read() -> str:
        cart = session.get("cart", [])
        prefs = session.get("prefs", {})
        count = session.get("n", 0)
        return f"hello user={user()} ({len(cart)} items, theme {prefs.get('theme')}, n={count})"

    @app.post("/write")
    def write() -> str:
        count = session.get("n", 0) + 1
        session["n"] = count
        return f"saved {count} for user={user()}"

    return app


def _cloakroom(app: Flask, spec: AppSpec, store: Store | None) -> Cloakroom:
    app.config.update(
        CLOAKROOM_REDIS_PREFIX=spec.prefix,
        CLOAKROOM_SQL_TABLE=spec.table,
    )
    if spec.encrypted:
        app.config["CLOAKROOM_ENCRYPTION_KEYS"] = [ENCRYPTION_KEY]
    if not spec.activity:
        app.config["CLOAKROOM_RULES"] = RULES_OFF
        app.config["CLOAKROOM_ACTIVITY_KINDS"] = []
    if not spec.decoded_cache:
        app.config["CLOAKROOM_DECODED_CACHE_SIZE"] = 0
    app.config.update(spec.config)
    if spec.client_cache:
        app.config["CLOAKROOM_REDIS_CLIENT_CACHE"] = CLIENT_CACHE
    if store is None:
        app.config["CLOAKROOM_STORE"] = spec.store
    cloak = Cloakroom(app) if store is None else Cloakroom(app, store=store)
    if not spec.redis_lane:
        from flask_cloakroom.stores.redis import RedisStore

        redis_store = app.extensions["cloakroom"].store
        redis_store = getattr(redis_store, "inner", redis_store)  # an InstrumentedStore's
        assert isinstance(redis_store, RedisStore) and not redis_store.cluster
        redis_store._lane = None
    return cloak


def _flask_session(app: Flask, spec: AppSpec, redis_client: Any) -> None:
    import warnings

    from flask_session import Session

    app.config["SESSION_KEY_PREFIX"] = spec.prefix
    if spec.store.startswith("redis://"):
        import redis

        app.config["SESSION_TYPE"] = "redis"
        app.config["SESSION_REDIS"] = redis_client or redis.Redis.from_url(spec.store)
    else:
        from flask_sqlalchemy import SQLAlchemy

        app.config["SQLALCHEMY_DATABASE_URI"] = spec.store
        app.config["SESSION_TYPE"] = "sqlalchemy"
        app.config["SESSION_SQLALCHEMY_TABLE"] = spec.table
        app.config["SESSION_SQLALCHEMY"] = SQLAlchemy(app)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        Session(app)


# -- in process ------------------------------------------------------------------------


class Browser:
    """Requests through an app's WSGI callable (no server), keeping the session cookie."""

    def __init__(self, app: Flask, *, user_agent: str = USER_AGENT) -> None:
        self.app = app
        self.cookie_name = str(app.config["SESSION_COOKIE_NAME"])
        self.cookie = ""
        self.user_agent = user_agent
        self._environs: dict[tuple[str, str], dict[str, Any]] = {}

    def request(self, method: str, path: str) -> str:
        """Run one request; return the body.  Raises on a status other than 2xx."""
        base = self._environs.get((method, path))
        if base is None:
            extra: Any = {"REMOTE_ADDR": LOOPBACK}
            base = EnvironBuilder(
                method=method,
                path=path,
                headers=[("User-Agent", self.user_agent)],
                environ_base=extra,
            ).get_environ()
            self._environs[(method, path)] = base
        environ = dict(base)
        environ["wsgi.input"] = io.BytesIO(b"")
        if self.cookie:
            environ["HTTP_COOKIE"] = f"{self.cookie_name}={self.cookie}"
        seen: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
            seen.append(status)
            seen.append(headers)
            return None

        chunks = self.app.wsgi_app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        status, headers = str(seen[0]), seen[1]
        if not status.startswith("2"):
            raise RuntimeError(f"{method} {path}: {status} {body[:300]!r}")
        for name, value in headers:
            if name.lower() == "set-cookie" and value.startswith(self.cookie_name + "="):
                cookie = value.split(";", 1)[0].split("=", 1)[1]
                self.cookie = "" if "Max-Age=0" in value else cookie.strip('"')
        return body.decode()

    def login(self, user: str = "alice") -> None:
        self.request("POST", f"/login?user={user}")
        body = self.request("GET", "/read")
        if f"user={user}" not in body:
            raise RuntimeError(f"not logged in after /login: {body!r}")


# -- counting store traffic --------------------------------------------------------------


def redis_command_calls(clients: Iterable[Any]) -> int:
    """Commands the Redis servers executed so far, scripts' inner calls included."""
    total = 0
    for client in clients:
        stats = client.info("commandstats")
        total += sum(
            int(entry["calls"])
            for name, entry in stats.items()
            if name not in ("cmdstat_info", "cmdstat_ping")
        )
    return total


def count_sqlite_statements(store: Store, counter: list[int]) -> None:
    """Count the statements an SQL store's SQLite connections execute into ``counter[0]``."""
    from sqlalchemy import event

    engine = store.engine  # type: ignore[attr-defined]

    def trace(statement: str) -> None:
        if not statement.lstrip().upper().startswith("PRAGMA"):
            counter[0] += 1

    def on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.set_trace_callback(trace)

    event.listen(engine, "connect", on_connect)


_PG_STATEMENT = re.compile(r"LOG:\s+(statement|execute [^:]*):")


class PostgresStatementLog:
    """Statements the PostgreSQL server received, read from its log.

    The database named by ``database`` logs every statement (``log_statement =
    all``); :meth:`count` is the number of statements logged since :meth:`mark`.
    This sees exactly what reached the server: implicit ``BEGIN``/``COMMIT`` too.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._offset = 0

    def mark(self) -> None:
        self._offset = self.log_path.stat().st_size

    def count(self) -> int:
        time.sleep(0.05)  # the server writes its log asynchronously
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            text = log.read().decode(errors="replace")
        return len(_PG_STATEMENT.findall(text))


# -- throwaway servers -------------------------------------------------------------------


def _harness_module() -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from tests import servers
    except ImportError as error:  # pytest is what it lacks, usually
        raise SystemExit(
            f"the test suite's server harness (tests/servers.py) cannot be imported: {error}. "
            "Install pytest in this virtualenv: pip install pytest"
        ) from None
    return servers


class Servers:
    """Throwaway Redis, Redis Cluster and PostgreSQL servers, removed by :meth:`close`."""

    def __init__(self, wanted: Iterable[str]) -> None:
        self.module = _harness_module()
        self.harness = self.module._harness()
        self.redis: Any = None
        self.cluster: Any = None
        self.postgres: Any = None
        self.sources: dict[str, str] = {}
        wanted = set(wanted)
        try:
            if "redis" in wanted:
                self.redis = self.module.ControllableRedis(self.harness)
                self.sources["redis"] = self._version(self.redis.client())
            if "redis_cluster" in wanted:
                self.cluster = self.module.ControllableRedisCluster(self.harness)
                self.sources["redis_cluster"] = "3 masters, " + self._version(
                    self.cluster.node_client(0)
                )
            if "postgres" in wanted:
                self.postgres = durable_postgres(self.module.ControllablePostgres(self.harness))
                with self.postgres.connect() as conn:
                    version = conn.execute("SHOW server_version").fetchone()[0]
                self.sources["postgres"] = f"PostgreSQL {version}, fsync on"
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _version(client: Any) -> str:
        try:
            return f"Redis {client.info('server')['redis_version']}"
        finally:
            client.close()

    def extra_redis(self) -> Any:
        """Another throwaway standalone Redis server."""
        return self.module.ControllableRedis(self.harness)

    def create_database(self, name: str, **settings: str) -> str:
        """A new PostgreSQL database (with per-database settings); its SQLAlchemy URL."""
        with self.postgres.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            for key, value in settings.items():
                conn.execute(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
        with self.postgres.connect(name) as conn:
            for key, value in settings.items():
                got = conn.execute(f"SHOW {key}").fetchone()[0]
                if got != value:
                    raise RuntimeError(f"database {name}: {key} is {got}, not {value}")
        return str(self.postgres.url_for(name))

    def close(self) -> None:
        self.harness.cleanup()


def durable_postgres(server: Any) -> Any:
    """Restart a harness PostgreSQL with durable commits (fsync, full page writes) and
    more shared buffers; the harness turns fsync off to make tests fast."""
    server.stop()
    argv = server.process.argv
    replace = {
        "fsync=off": "fsync=on",
        "full_page_writes=off": "full_page_writes=on",
        "shared_buffers=32MB": "shared_buffers=256MB",
    }
    server.process.argv = [replace.get(arg, arg) for arg in argv]
    if "fsync=on" not in server.process.argv:
        raise RuntimeError(f"cannot make the harness's PostgreSQL durable: {argv}")
    server.start()
    with server.connect() as conn:
        fsync = conn.execute("SHOW fsync").fetchone()[0]
        commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
    if (fsync, commit) != ("on", "on"):
        raise RuntimeError(f"PostgreSQL is not durable: fsync={fsync}, commit={commit}")
    return server


def flush_redis(client: Any) -> None:
    client.flushall()


#: The kinds of :func:`store_server`.
STORE_KINDS = ("sqlite", "postgres", "mysql", "redis")


@dataclass
class StoreServer:
    """One store for the bench app: where it came from, the app's spec on it (a table
    and a Redis prefix of its own), and for a server, how to stop and start it."""

    kind: str
    source: str
    spec: AppSpec
    stop: Callable[[], None] | None = None
    start: Callable[[], None] | None = None


@contextlib.contextmanager
def store_server(kind: str, scratch: Path) -> Iterator[StoreServer]:
    """An empty store of ``kind`` (one of :data:`STORE_KINDS`) for the Cloakroom layer:
    an SQLite file in ``scratch``, or a throwaway server of the test suite's harness
    (the harness's settings: PostgreSQL without fsync), removed afterwards."""
    table, prefix = f"cloakroom_bench_{token()}", f"cloakroom-bench:{token()}:"
    if kind == "sqlite":
        path = scratch / "sessions.sqlite3"
        spec = AppSpec("cloakroom", f"sqlite:///{path}", prefix=prefix, table=table)
        yield StoreServer(kind, str(path), spec)
        return
    module = _harness_module()
    harness = module._harness()
    name = f"controllable_{kind}"
    try:
        server: Any = harness.get(name, module._FACTORIES[name])
    except module.BackendUnavailable as error:
        raise SystemExit(f"no {kind} server could be started: {error}") from None
    try:
        spec = AppSpec("cloakroom", server.url, prefix=prefix, table=table)
        source = harness.status[name].source or kind
        yield StoreServer(kind, source, spec, stop=server.stop, start=server.start)
    finally:
        harness.cleanup()


# -- gunicorn and wrk ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_gunicorn() -> str:
    """gunicorn beside the running Python (the benchmark's virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "gunicorn"
    if beside.exists():
        return str(beside)
    found = shutil.which("gunicorn")
    if found:
        return found
    raise SystemExit(
        "gunicorn is needed, in the benchmark's own virtualenv:\n"
        "  python3 -m venv /tmp/perf-venv\n"
        "  /tmp/perf-venv/bin/pip install -e '.[all]' gunicorn flask-session==0.8.0 "
        "flask-sqlalchemy matplotlib pyinstrument pytest\n"
        "then run this script with /tmp/perf-venv/bin/python"
    )


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    raise SystemExit(
        "wrk is needed: apt-get install -y wrk (Debian, Ubuntu), brew install wrk (macOS), "
        "or build it from https://github.com/wg/wrk"
    )


@dataclass
class Gunicorn:
    """A gunicorn serving the bench app on one spec."""

    spec: AppSpec
    workers: int
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def signal_stop(self) -> None:
        """Ask gunicorn for a quick shutdown (SIGQUIT), without waiting."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGQUIT)

    def stop(self) -> None:
        self.signal_stop()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def worker_pids(self) -> list[int]:
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]


def start_gunicorn(
    spec: AppSpec, *, workers: int, scratch: Path, program: str, worker_class: str = "sync"
) -> Gunicorn:
    """Start gunicorn on a free loopback port; see :func:`wait_ready`."""
    port = free_port()
    log = scratch / f"gunicorn-{port}.log"
    instance = scratch / f"instance-{port}"
    env = dict(os.environ)
    env[ENV_SPEC] = spec.to_json()
    env["CLOAKROOM_PERF_INSTANCE"] = str(instance)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    argv = [
        program,
        "--workers", str(workers),
        "--worker-class", worker_class,
        "--bind", f"{LOOPBACK}:{port}",
        "--backlog", "2048",
        "--timeout", "60",
        "--graceful-timeout", "5",
        "--log-level", "warning",
        "--error-logfile", str(log),
        "--chdir", str(HERE),
        "_apps:create_app()",
    ]  # fmt: skip
    with open(log, "ab") as output:
        process = subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=output, stderr=subprocess.STDOUT
        )
    return Gunicorn(spec, workers, process, port, log)


def wait_ready(server: Gunicorn, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"gunicorn for {server.spec} exited:\n{tail}")
        with contextlib.suppress(OSError):
            if (
                http_request(server.port, "GET", "/health")[0] == 200
                and len(server.worker_pids()) == server.workers
            ):
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"gunicorn for {server.spec} did not come up within {timeout:g} s")
        time.sleep(0.1)


def http_request(
    port: int, method: str, path: str, cookie: str | None = None, timeout: float = 10
) -> tuple[int, str, str | None]:
    """One request on a new connection: status, body, and the session cookie set, if any."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"User-Agent": USER_AGENT}
        if cookie:
            headers["Cookie"] = f"session={cookie}"
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        new = None
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            if name == "session":
                new = rest.split(";", 1)[0].strip('"') or None
        return response.status, body, new
    finally:
        conn.close()


def log_in(port: int, users: Iterable[str]) -> list[str]:
    """Log each user in (a fresh session each); their cookies, checked by a read."""
    cookies = []
    for name in users:
        status, body, cookie = http_request(port, "POST", f"/login?user={name}")
        if status != 200:
            raise SystemExit(f"login of {name} on port {port} failed: HTTP {status} {body[:300]}")
        cookie = cookie or ""  # the static layer sets none
        status, body, _ = http_request(port, "GET", "/read", cookie)
        if status != 200 or f"user={name}" not in body:
            raise SystemExit(f"{name} is not logged in on port {port}: {status} {body[:300]}")
        cookies.append(cookie)
    return cookies


_LUA = r"""
-- Written by benchmarks/_apps.py.  Each request carries the next logged-in client's
-- cookie (round robin) and a browser User-Agent; every write_every-th request is a
-- POST /write (0: never).  Responses are counted by status, and bodies saying
-- "user=None" (the session was lost) are counted as anonymous.
local cookies = {}
local current = 0
local method, path, agent, write_every = "GET", "/read", "", 0
local count = 0
non2xx = 0
anonymous = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    cookies[#cookies + 1] = line
  end
  method, path, agent = args[2], args[3], args[4]
  write_every = tonumber(args[5] or "0")
  current = math.random(#cookies)
end

function request()
  current = current % #cookies + 1
  local headers = {["User-Agent"] = agent}
  if #cookies[current] > 0 then
    headers["Cookie"] = "session=" .. cookies[current]
  end
  count = count + 1
  if write_every > 0 and count % write_every == 0 then
    return wrk.format("POST", "/write", headers, "")
  end
  return wrk.format(method, path, headers, "")
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif string.find(body, "user=None", 1, true) then
    anonymous = anonymous + 1
  end
end

function done(summary, latency, requests)
  local bad, anon = 0, 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
    anon = anon + thread:get("anonymous")
  end
  io.write(string.format(
    'CLOAKROOM-PERF {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"p999_us": %d, "max_us": %d, "mean_us": %f, "non2xx": %d, "anonymous": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, bad, anon))
end
"""


@dataclass
class WrkResult:
    """One wrk run."""

    requests: int
    seconds: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    non_2xx: int
    anonymous: int
    socket_errors: int
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failures(self) -> int:
        return self.non_2xx + self.anonymous + self.socket_errors


@dataclass
class Wrk:
    """wrk with the bench script, in a scratch folder."""

    program: str
    scratch: Path
    connections: int = 8
    threads: int = 1
    _files: dict[tuple[str, ...], Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.script = self.scratch / "cloakroom-perf.lua"
        self.script.write_text(_LUA)

    def run(
        self,
        port: int,
        cookies: list[str],
        *,
        method: str,
        path: str,
        seconds: int,
        connections: int | None = None,
        write_every: int = 0,
    ) -> WrkResult:
        key = tuple(cookies)
        cookie_file = self._files.get(key)
        if cookie_file is None:
            cookie_file = self.scratch / f"cookies-{len(self._files)}.txt"
            cookie_file.write_text("\n".join(cookies) + "\n")
            self._files[key] = cookie_file
        argv = [
            self.program,
            f"-t{self.threads}",
            f"-c{connections or self.connections}",
            f"-d{max(1, seconds)}s",
            "--timeout=10s",
            "-s", str(self.script),
            f"http://{LOOPBACK}:{port}",
            "--", str(cookie_file), method, path, USER_AGENT, str(write_every),
        ]  # fmt: skip
        started = time.time()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        ended = time.time()
        for line in done.stdout.splitlines():
            if line.startswith("CLOAKROOM-PERF "):
                data = json.loads(line.removeprefix("CLOAKROOM-PERF "))
                break
        else:
            raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return WrkResult(
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            p50_us=data["p50_us"],
            p90_us=data["p90_us"],
            p99_us=data["p99_us"],
            p999_us=data["p999_us"],
            max_us=data["max_us"],
            mean_us=data["mean_us"],
            non_2xx=data["non2xx"],
            anonymous=data["anonymous"],
            socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
            started=started,
            ended=ended,
        )


# -- the machine -----------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions(extra: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Versions of the libraries and tools in play."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in (
        "flask",
        "werkzeug",
        "flask-cloakroom",
        "flask-session",
        "sqlalchemy",
        "redis",
        "hiredis",
        "psycopg",
        "cryptography",
        "gunicorn",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    for name, argv in (extra or {}).items():
        out[name] = tool_version(argv)
    out["flask-cloakroom source"] = source_identity()
    return out


def source_identity() -> str:
    """Which flask_cloakroom is measured: its folder, and a hash of its Python files
    (plus the git commit, and whether the tree differs from it, for a checkout)."""
    import hashlib

    import flask_cloakroom

    folder = Path(flask_cloakroom.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    text = f"{folder} (sources {digest.hexdigest()[:12]})"
    head = subprocess.run(
        ["git", "-C", str(folder), "log", "-1", "--format=%h"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode == 0 and head.stdout.strip():
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        text += f", git {head.stdout.strip()}{' + local changes' if dirty else ''}"
    return text


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def rss_kib(pid: int) -> int | None:
    """A process's resident set size in KiB, or ``None`` if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_times() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values), idle


def cpu_busy(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs were over ``seconds`` (0.0 to 1.0), from /proc/stat."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    spent = total1 - total0
    return 0.0 if spent <= 0 else 1.0 - (idle1 - idle0) / spent


def _stat_fields(path: str | Path) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` file after the command's name."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def _jiffies(pid: int) -> int:
    """CPU time (jiffies) of one process, from /proc."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return int(fields[11]) + int(fields[12])


def _tree_jiffies(root: int) -> int:
    """CPU time (jiffies) of ``root`` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(Path(entry.path, "stat"))
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        # utime, stime, cutime, cstime: children that were waited for count too
        times[int(entry.name)] = sum(int(v) for v in fields[11:15])
    total = 0
    for pid, spent in times.items():
        node = pid
        while node > 1:
            if node == root:
                total += spent
                break
            node = parents.get(node, 0)
    return total


class ForeignLoad:
    """Samples, every second, how busy the CPUs are with processes that are not this
    benchmark's (this process and its descendants: gunicorn, wrk, the servers).

    ``samples`` are fractions of the whole machine (0.0 to 1.0)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ForeignLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        me = os.getpid()
        try:
            total0, idle0 = _cpu_times()
            mine0 = _tree_jiffies(me)
        except (OSError, ValueError, IndexError):
            return
        while not self._stop.wait(1.0):
            try:
                total1, idle1 = _cpu_times()
                mine1 = _tree_jiffies(me)
            except (OSError, ValueError, IndexError):
                return
            spent = total1 - total0
            if spent > 0:
                busy = spent - (idle1 - idle0)
                self.samples.append(max(0.0, (busy - (mine1 - mine0)) / spent))
            total0, idle0, mine0 = total1, idle1, mine1

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {
            "median": quantile(self.samples, 0.5),
            "p90": quantile(self.samples, 0.9),
            "max": max(self.samples),
        }


def wait_for_quiet(minutes: float, *, threshold: float = 0.15, window: int = 10) -> bool:
    """Wait up to ``minutes`` until the machine has been idle (CPUs less than
    ``threshold`` busy) for ``window`` seconds in a row; whether it was."""
    deadline = time.monotonic() + minutes * 60
    calm = 0
    while time.monotonic() < deadline:
        calm = calm + 1 if cpu_busy(1.0) < threshold else 0
        if calm >= window:
            return True
    return False


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def save_results(result: dict[str, Any], path: Path | None, stem: str) -> Path:
    """Write ``result`` as JSON to ``path``, or to ``RESULTS/<stem>-<time>.json``."""
    out = path or RESULTS / f"{stem}-{timestamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def finish_run(
    stem: str, record: dict[str, Any], path: Path | None, started: float, failures: list[str]
) -> int:
    """Save a run's ``record`` with the machine, the source and the failures; say where
    and how long it took; the exit status (1 if any request failed)."""
    record = {
        "machine": machine(),
        "source": source_identity(),
        "cpus": os.cpu_count(),
        **record,
        "failures": failures,
    }
    saved = save_results(record, path, stem)
    print(f"\nresults: {saved}\ntook {time.monotonic() - started:.0f} s")
    if failures:
        print("FAILED requests:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def scratch_dir(name: str) -> contextlib.AbstractContextManager[str]:
    import tempfile

    return tempfile.TemporaryDirectory(prefix=f"cloakroom-{name}-")


def token() -> str:
    return secrets.token_hex(3)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by the nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
