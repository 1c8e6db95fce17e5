"""Per-request cost of the session layer, in process, every variant side by side.

Calls each app's WSGI callable directly (no network, no server), so what is
measured is the session layer plus Flask itself.  Variants run interleaved in
rounds, and each figure is the median over rounds, so a noisy neighbour hurts
all variants alike.  Ratios are throughput against Flask's own cookie session
measured in the same run (above 1.00 = faster than the cookie session).

    python benchmarks/inprocess.py            # about a minute
    python benchmarks/inprocess.py --quick    # a few seconds

PostgreSQL, MySQL and Redis variants run when CLOAKROOM_BENCH_POSTGRES_URL,
CLOAKROOM_BENCH_MYSQL_URL or CLOAKROOM_BENCH_REDIS_URL name a server (the
benchmark creates its own table / key prefix there and removes it).
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

from flask import Flask, session
from werkzeug.test import EnvironBuilder

from flask_cloakroom import Cloakroom, generate_key
from flask_cloakroom.stores import Store, open_store
from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.memory import MemoryStore

SECRET = "benchmark-secret-" + "x" * 24
KEY = generate_key()


@dataclass
class Variant:
    """One way of keeping sessions, wrapped in a tiny app with two views."""

    name: str
    app: Flask
    store: InstrumentedStore | None = None
    cookie: str = ""
    times: dict[str, list[float]] = field(default_factory=lambda: {"read": [], "write": []})
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)


def build_app(configure: Callable[[Flask], None], *, use_session: bool = True) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET)
    configure(app)

    @app.get("/read")
    def read() -> str:
        if not use_session:
            return "hello alice (3 items)"
        return f"hello {session.get('user')} ({len(session.get('cart', []))} items)"

    @app.post("/write")
    def write() -> str:
        if use_session:
            session["n"] = session.get("n", 0) + 1
        return "ok"

    @app.post("/start")
    def start() -> str:
        session["user"] = "alice"
        session["cart"] = ["tea", "pen", "notebook"]
        session["prefs"] = {"theme": "dark", "lang": "en"}
        return "ok"

    return app


def cloakroom(store: Store, **config: Any) -> tuple[Flask, InstrumentedStore]:
    counting = InstrumentedStore(store)

    def configure(app: Flask) -> None:
        app.config.update(config)
        Cloakroom(app, store=counting)

    return build_app(configure), counting


_ENVIRONS: dict[tuple[str, str], dict[str, Any]] = {}


def call(app: Flask, method: str, path: str, cookie: str) -> tuple[str, str]:
    """Run one request through the WSGI app; return the body and any new cookie."""
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
    return body.decode(), cookie


def _server_store(url: str) -> Callable[[], Store]:
    def make() -> Store:
        tag = secrets.token_hex(3)
        return open_store(url, sql_table=f"bench_{tag}", redis_prefix=f"cloakroom-bench:{tag}:")

    return make


def variants(tmp: str) -> list[Variant]:
    out = [Variant("views ignore the session", build_app(lambda app: None, use_session=False))]
    out.append(Variant("flask cookie session", build_app(lambda app: None)))
    stores: list[tuple[str, Callable[[], Store]]] = [
        ("memory", MemoryStore),
        ("sqlite", lambda: open_store(f"sqlite:///{tmp}/bench-{secrets.token_hex(3)}.db")),
    ]
    for label, env in (
        ("postgres", "CLOAKROOM_BENCH_POSTGRES_URL"),
        ("mysql", "CLOAKROOM_BENCH_MYSQL_URL"),
        ("redis", "CLOAKROOM_BENCH_REDIS_URL"),
    ):
        url = os.environ.get(env)
        if url:
            stores.append((label, _server_store(url)))
    for label, make in stores:
        for encrypted in (False, True):
            config = {"CLOAKROOM_ENCRYPTION_KEYS": [KEY]} if encrypted else {}
            app, counting = cloakroom(make(), **config)
            suffix = " + encryption" if encrypted else ""
            out.append(Variant(f"cloakroom {label}{suffix}", app, counting))

    def cookie_mode(app: Flask) -> None:
        app.config["CLOAKROOM_STORE"] = "cookie://"
        Cloakroom(app)

    out.append(Variant("cloakroom cookie:// (encrypted)", build_app(cookie_mode)))
    return out


def run(all_variants: Iterable[Variant], *, rounds: int, per_round: int) -> None:
    chosen = list(all_variants)
    for v in chosen:
        _, v.cookie = call(v.app, "POST", "/start", "")
        for _ in range(50):  # warm caches, pools and compiled statements
            call(v.app, "GET", "/read", v.cookie)
    for _ in range(rounds):
        for v in chosen:
            for scenario, method in (("read", "GET"), ("write", "POST")):
                if v.store is not None:
                    v.store.reset()
                started = time.perf_counter()
                for _ in range(per_round):
                    _, v.cookie = call(v.app, method, f"/{scenario}", v.cookie)
                v.times[scenario].append((time.perf_counter() - started) / per_round)
                if v.store is not None:
                    v.ops[scenario] = (
                        v.store.reads / per_round,
                        v.store.writes / per_round,
                    )


def report(chosen: list[Variant]) -> None:
    base = next(v for v in chosen if v.name == "flask cookie session")
    med = {(v.name, s): statistics.median(v.times[s]) for v in chosen for s in ("read", "write")}
    head = f"{'variant':36} {'read µs':>9} {'ratio':>6} {'write µs':>9} {'ratio':>6}"
    print(head + "  store reads/writes per request")
    for v in chosen:
        cells = []
        for s in ("read", "write"):
            mine = med[(v.name, s)]
            cells += [f"{mine * 1e6:9.1f}", f"{med[(base.name, s)] / mine:6.2f}"]
        ops = " ".join(f"{s}={r:g}/{w:g}" for s, (r, w) in v.ops.items()) or "-"
        print(f"{v.name:36} {' '.join(cells)}  {ops}")
    print(
        "\nratio = Flask cookie session's time / this variant's time, same run "
        "(1.00 = as fast; above 1 = faster)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of a minute")
    args = parser.parse_args()
    rounds, per_round = (5, 200) if args.quick else (15, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        chosen = variants(tmp)
        run(chosen, rounds=rounds, per_round=per_round)
        print(
            f"Python {sys.version.split()[0]}, {rounds} rounds x {per_round} requests per variant"
        )
        report(chosen)
        for v in chosen:
            if v.store is not None:
                v.store.close()


if __name__ == "__main__":
    main()
