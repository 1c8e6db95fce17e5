"""What ``load.py`` and ``soak.py`` share: a store, gunicorn, clients, wrk, memory samples.

* Stores: an SQLite file in a scratch folder, or a throwaway PostgreSQL, MariaDB or
  Redis server from the test suite's harness (``tests/servers.py``: binaries on PATH
  or pip packages, free loopback ports, removed at the end), which can be stopped and
  started again.
* gunicorn serving ``benchmarks/_app.py`` on loopback, found next to the running Python
  (install it in the benchmark's virtualenv, not in the project's dependencies).
* Logged-in clients: each logs in once; their cookies go to a file wrk reads.
* wrk with a Lua script that sends each request with the next client's cookie, counts
  responses by status and prints one JSON line at the end.
* Resident memory (VmRSS) of gunicorn's master and workers, from ``/proc``.

Linux only (``/proc``).  wrk: ``apt-get install wrk`` (Debian, Ubuntu), ``brew install
wrk``, or build it from https://github.com/wg/wrk.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # for tests.servers, the test suite's server harness
    sys.path.insert(0, str(REPO))

LOOPBACK = "127.0.0.1"
STORES = ("sqlite", "postgres", "mysql", "redis")


# -- machine ---------------------------------------------------------------------------


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
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


# -- stores ----------------------------------------------------------------------------


@dataclass
class StoreServer:
    """A store for the app: its URL, app settings, and (for servers) stop and start."""

    kind: str
    url: str
    env: dict[str, str]
    source: str
    stop: Callable[[], None] | None = None
    start: Callable[[], None] | None = None


@contextlib.contextmanager
def store_server(kind: str, scratch: Path) -> Iterator[StoreServer]:
    """An empty store of ``kind``; servers are throwaway and removed afterwards."""
    table = "cloakroom_bench_" + secrets.token_hex(3)
    if kind == "sqlite":
        path = scratch / "sessions.sqlite3"
        yield StoreServer(kind, f"sqlite:///{path}", {"CLOAKROOM_BENCH_TABLE": table}, str(path))
        return
    from tests import servers  # the test suite's harness (needs pytest installed)

    harness = servers._harness()
    name = f"controllable_{kind}"
    try:
        server: Any = harness.get(name, servers._FACTORIES[name])
    except servers.BackendUnavailable as error:
        raise SystemExit(f"no {kind} server could be started: {error}") from None
    try:
        env = {"CLOAKROOM_BENCH_TABLE": table}
        if kind == "redis":
            env["CLOAKROOM_BENCH_PREFIX"] = f"cloakroom-bench:{secrets.token_hex(3)}:"
        yield StoreServer(
            kind,
            server.url,
            env,
            harness.status[name].source or kind,
            stop=server.stop,
            start=server.start,
        )
    finally:
        harness.cleanup()


# -- gunicorn --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def find_gunicorn(given: str | None) -> str:
    """gunicorn: as given, else next to this Python, else on PATH."""
    if given:
        return given
    beside = Path(sys.executable).parent / "gunicorn"
    if beside.exists():
        return str(beside)
    found = shutil.which("gunicorn")
    if found:
        return found
    raise SystemExit(
        "gunicorn is needed: python -m venv /tmp/cloakroom-bench && "
        "/tmp/cloakroom-bench/bin/pip install -e '.[test]' gunicorn, then run this "
        "script with /tmp/cloakroom-bench/bin/python"
    )


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    raise SystemExit(
        "wrk is needed: apt-get install wrk (Debian/Ubuntu), brew install wrk (macOS), "
        "or build https://github.com/wg/wrk"
    )


@dataclass
class Gunicorn:
    """A running gunicorn: its master process and port."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def workers(self) -> list[int]:
        """The worker processes' ids (children of the master)."""
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return sorted(int(p) for p in text.split())


@contextlib.contextmanager
def gunicorn(
    store: StoreServer,
    scratch: Path,
    *,
    program: str,
    workers: int = 2,
    worker_class: str = "sync",
) -> Iterator[Gunicorn]:
    """gunicorn serving the benchmark app on ``store``, stopped afterwards."""
    port = free_port()
    log = scratch / f"gunicorn-{store.kind}.log"
    env = dict(os.environ)
    env.update(store.env)
    env.update(CLOAKROOM_BENCH_STORE=store.url, CLOAKROOM_BENCH_DIR=str(scratch / "instance"))
    argv = [
        program,
        "--workers", str(workers),
        "--worker-class", worker_class,
        "--bind", f"{LOOPBACK}:{port}",
        "--backlog", "2048",
        "--timeout", "30",
        "--graceful-timeout", "5",
        "--log-level", "warning",
        "--error-logfile", str(log),
        "--chdir", str(HERE),
        "_app:app",
    ]  # fmt: skip
    with open(log, "ab") as output:  # the app's own log lines go there too
        process = subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=output, stderr=subprocess.STDOUT
        )
    server = Gunicorn(process, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise SystemExit(f"gunicorn exited:\n{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/health")[0] == 200 and len(server.workers()) == workers:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("gunicorn did not come up within 30 s")
            time.sleep(0.1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def request(
    port: int, method: str, path: str, cookie: str | None = None, timeout: float = 10
) -> tuple[int, str | None]:
    """One request on a new connection: the status and the session cookie set, if any."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Cookie": f"session={cookie}"} if cookie else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        response.read()
        new = None
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            if name == "session":
                new = rest.split(";", 1)[0] or None
        return response.status, new
    finally:
        conn.close()


def log_in(port: int, count: int) -> list[str]:
    """Log ``count`` clients in (user0, user1, ...); their session cookies."""
    cookies = []
    for i in range(count):
        status, cookie = request(port, "POST", f"/login/user{i}")
        if status != 200 or cookie is None:
            raise SystemExit(f"login of user{i} failed: HTTP {status}")
        cookies.append(cookie)
    return cookies


# -- wrk -------------------------------------------------------------------------------

_LUA = r"""
-- Sends each request with the next logged-in client's cookie (round robin), a write
-- (POST) every write_every-th request, counts responses by status, and prints a
-- JSON summary line at the end.  Written by benchmarks/_servers.py.
local cookies = {}
local current = 0
local count = 0
local read_path, write_path, write_every = "/read", "/write", 0
statuses = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then cookies[#cookies + 1] = line end
  end
  read_path, write_path, write_every = args[2], args[3], tonumber(args[4])
  current = math.random(#cookies)
end

function request()
  count = count + 1
  current = current % #cookies + 1
  local headers = {["Cookie"] = "session=" .. cookies[current]}
  if write_every > 0 and count % write_every == 0 then
    return wrk.format("POST", write_path, headers, "")
  end
  return wrk.format("GET", read_path, headers)
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    parts[#parts + 1] = string.format('"%s": %d', status, n)
  end
  io.write(string.format(
    'CLOAKROOM-WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, table.concat(parts, ", ")))
end
"""


@dataclass
class WrkResult:
    """One wrk run, from its JSON summary line."""

    requests: int
    seconds: float
    socket_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    @property
    def errors(self) -> int:
        """Everything that was not a 2xx: other statuses, socket errors and timeouts."""
        return self.non_2xx + self.socket_errors + self.timeouts


class Wrk:
    """Runs wrk against a gunicorn with the logged-in clients' cookies."""

    def __init__(self, program: str, cookies: list[str], scratch: Path) -> None:
        self.program = program
        self.script = scratch / "cloakroom.lua"
        self.script.write_text(_LUA)
        self.cookies = scratch / "cookies.txt"
        self.cookies.write_text("\n".join(cookies) + "\n")

    def run(
        self,
        port: int,
        *,
        seconds: float,
        connections: int,
        threads: int = 2,
        write_every: int = 0,
        timeout: float = 5.0,
    ) -> WrkResult:
        """``write_every``: 0 = only reads, 1 = only writes, n = one write in n requests."""
        argv = [
            self.program,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout:g}s",
            "-s", str(self.script),
            f"http://{LOOPBACK}:{port}",
            "--", str(self.cookies), "/read", "/write", str(write_every),
        ]  # fmt: skip
        started = time.time()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        ended = time.time()
        for line in done.stdout.splitlines():
            if line.startswith("CLOAKROOM-WRK "):
                data = json.loads(line.removeprefix("CLOAKROOM-WRK "))
                break
        else:
            raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return WrkResult(
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            socket_errors=data["connect"] + data["read"] + data["write"],
            timeouts=data["timeout"],
            p50_ms=data["p50_us"] / 1000,
            p90_ms=data["p90_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            max_ms=data["max_us"] / 1000,
            statuses={int(k): v for k, v in data["statuses"].items()},
            started=started,
            ended=ended,
        )


# -- memory ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    """A process's resident set size in KiB, or ``None`` if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def scratch_dir(name: str) -> contextlib.AbstractContextManager[str]:
    """A scratch folder for one run, removed afterwards."""
    return tempfile.TemporaryDirectory(prefix=f"cloakroom-{name}-")
