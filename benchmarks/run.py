"""Every session layer side by side: gunicorn + wrk throughput, latency, ratios, store traffic.

One command measures, in one run, the same small app (``_apps.py``: a logged-in
read-only ``GET /read`` and a modifying ``POST /write``) on:

* no session layer at all (the floor), Flask's own cookie session (the baseline of
  every ratio), Flask-Session 0.8 on Redis and on PostgreSQL (through SQLAlchemy);
* Cloakroom on memory, SQLite, PostgreSQL (durable, and with asynchronous commits:
  ``CLOAKROOM_SQL_ASYNC_COMMIT``), Redis and Redis Cluster; each with encryption and
  activity tracking on (the configuration the targets are for), with encryption
  off, and with both off;
* the 2-worker twins of a few variants (the workers target) and of the limits, and Redis with
  client-side caching (``CLOAKROOM_REDIS_CLIENT_CACHE``; ``client_cache.py``).

Each variant is served by its own gunicorn (sync workers) on a free loopback port,
started once; wrk then runs against them in rounds, the variants' order rotated each
round, so a noisy moment hurts them all alike.  Ratios are throughput over Flask's
cookie session's throughput, per round, then the median over rounds.  Any response
that is not a 2xx, any socket error, and any response that lost its session fails
the run.

Then, in process (deterministic, independent of noise): the store commands and round
trips of each variant's read-only and modifying request, counted on the wire (Redis),
by SQLite's statement trace and by PostgreSQL's own statement log; and the session
layer's own CPU (``layer.py``).  Results go to ``benchmarks/results/<time>.json``
and a chart to ``benchmarks/results/<time>.png``.

Set up once (wrk from the OS; the rest in a virtualenv of its own)::

    apt-get install -y wrk redis-server postgresql   # or brew install wrk redis postgresql
    python3 -m venv /tmp/perf-venv
    /tmp/perf-venv/bin/pip install -e '.[all]' gunicorn flask-session==0.8.0 \\
        flask-sqlalchemy matplotlib py-spy pytest

Run::

    /tmp/perf-venv/bin/python benchmarks/run.py --quick    # under two minutes
    /tmp/perf-venv/bin/python benchmarks/run.py            # 3 s x 3 rounds: ~20 minutes
    /tmp/perf-venv/bin/python benchmarks/run.py --only cookie,sqlite --duration 10

wrk, gunicorn and the stores share the machine: on a 2-core machine the numbers are
those of the whole stack, and the machine should be otherwise idle (the script says
how busy it was before it started).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from _apps import (
    CLIENT_CACHE,
    RESULTS,
    AppSpec,
    Browser,
    ForeignLoad,
    Gunicorn,
    PostgresStatementLog,
    Servers,
    Wrk,
    WrkResult,
    count_sqlite_statements,
    cpu_busy,
    create_app,
    find_gunicorn,
    find_wrk,
    http_request,
    log_in,
    machine,
    redis_command_calls,
    scratch_dir,
    start_gunicorn,
    timestamp,
    token,
    versions,
    wait_for_quiet,
    wait_ready,
)

from flask_cloakroom.stores import Store, open_store
from flask_cloakroom.stores.instrumented import InstrumentedStore
from flask_cloakroom.stores.memory import MemoryStore

SCENARIOS = {"read": ("GET", "/read"), "write": ("POST", "/write")}
BASELINE = "cookie"


@dataclass
class Variant:
    """One session layer on one store, served by its own gunicorn."""

    key: str
    label: str
    spec: AppSpec
    store: str = "-"
    workers: int = 1
    partner: str = BASELINE
    server: Gunicorn | None = None
    cookies: list[str] = field(default_factory=list)
    runs: dict[str, list[WrkResult]] = field(default_factory=lambda: {"read": [], "write": []})
    #: The partner's run right before or after each of this variant's runs.
    partner_runs: dict[str, list[WrkResult]] = field(
        default_factory=lambda: {"read": [], "write": []}
    )
    traffic: dict[str, dict[str, float]] = field(default_factory=dict)

    def rate(self, scenario: str) -> float:
        return statistics.median(r.rate for r in self.runs[scenario])

    def latency(self, scenario: str, which: str) -> float:
        """Median over rounds of a latency percentile, in ms."""
        values: list[float] = [getattr(r, which) for r in self.runs[scenario]]
        return statistics.median(values) / 1000


@dataclass(frozen=True)
class Target:
    """A target of issue 7, checked against this run."""

    name: str
    check: Callable[[dict[str, Variant], dict[str, Any]], tuple[float | None, bool | None]]
    wanted: str
    #: The figure of each round, for a ratio target: one bad round shows as such.
    rounds: Callable[[dict[str, Variant]], list[float]] | None = None


# -- the variants ----------------------------------------------------------------------


def make_variants(urls: dict[str, str], scratch: Path, *, client_cache: bool) -> list[Variant]:
    """Every variant, on the servers in ``urls`` (keys: redis, redis_cluster, postgres)."""
    out = [
        Variant("none", "no session layer (floor)", AppSpec("none")),
        Variant(BASELINE, "Flask cookie session", AppSpec("cookie")),
    ]
    for store, label in (("redis", "Redis"), ("postgres", "PostgreSQL")):
        if store in urls:
            name = f"bare_perf_{token()}"
            spec = AppSpec("bare-trips", urls[store], prefix=name, table=name)
            label = f"bare {label} round trips, no session layer (the limit)"
            out.append(Variant(f"limit-{store}", label, spec, store))
    if "redis" in urls:
        out.append(
            Variant(
                "fs-redis",
                "Flask-Session 0.8, Redis",
                AppSpec("flask-session", urls["redis"], prefix=f"fs-perf:{token()}:"),
                "redis",
            )
        )
    if "postgres" in urls:
        out.append(
            Variant(
                "fs-postgres",
                "Flask-Session 0.8, PostgreSQL",
                AppSpec("flask-session", urls["postgres"], table=f"fs_perf_{token()}"),
                "postgres",
            )
        )

    def cloakroom(
        key: str,
        label: str,
        store: str,
        url: str,
        *,
        shapes: tuple[str, ...] = ("enc", "plain", "off"),
        config: dict[str, Any] | None = None,
    ) -> None:
        for shape in shapes:
            spec = AppSpec(
                "cloakroom",
                url,
                encrypted=shape == "enc",
                activity=shape != "off",
                prefix=f"cloakroom-perf:{token()}:",
                table=f"cloakroom_perf_{token()}",
                config=dict(config or {}),
            )
            suffix = {
                "enc": " + encryption",
                "plain": ", no encryption",
                "off": ", no encryption, no activity",
            }[shape]
            out.append(Variant(f"{key}-{shape}", f"Cloakroom {label}{suffix}", spec, store))

    cloakroom("memory", "memory", "memory", "memory://", shapes=("enc", "plain"))
    sqlite = f"sqlite:///{scratch}/perf-{token()}.sqlite3"
    cloakroom("sqlite", "SQLite", "sqlite", sqlite)
    if "postgres" in urls:
        cloakroom("postgres", "PostgreSQL", "postgres", urls["postgres"])
        cloakroom(
            "postgres-async",
            "PostgreSQL, CLOAKROOM_SQL_ASYNC_COMMIT",
            "postgres",
            urls["postgres"],
            shapes=("enc",),
            config={"CLOAKROOM_SQL_ASYNC_COMMIT": True},
        )
        spec = AppSpec(
            "cloakroom",
            urls["postgres"],
            encrypted=True,
            table=f"cloakroom_perf_{token()}",
            config={"CLOAKROOM_BUSY_POLL": 0},
        )
        label = "Cloakroom PostgreSQL + encryption, no busy polling"
        out.append(Variant("postgres-nopoll", label, spec, "postgres"))

    def redis_encrypted(key: str, label: str, **options: Any) -> None:
        """A variant of Cloakroom on standalone Redis with encryption, and ``options``."""
        spec = AppSpec(
            "cloakroom",
            urls["redis"],
            encrypted=True,
            prefix=f"cloakroom-perf:{token()}:",
            **options,
        )
        out.append(Variant(key, f"Cloakroom Redis + encryption{label}", spec, "redis"))

    if "redis" in urls:
        cloakroom("redis", "Redis", "redis", urls["redis"])
        redis_encrypted("redis-nopoll", ", no busy polling", config={"CLOAKROOM_BUSY_POLL": 0})
        redis_encrypted("redis-nolane", ", no lane (redis-py's execute_command)", redis_lane=False)
    if "redis_cluster" in urls:
        cloakroom("cluster", "Redis Cluster", "redis-cluster", urls["redis_cluster"])
    if client_cache and "redis" in urls:
        redis_encrypted("redis-cache", " + client cache", client_cache=True)
    twins = []
    for v in out:
        if (
            v.key in (BASELINE, "sqlite-enc", "postgres-enc", "redis-enc")
            or "nopoll" in v.key
            or v.key.startswith("limit-")
        ):
            label = f"{v.label}, 2 workers"
            twins.append(Variant(f"{v.key}-x2", label, v.spec, v.store, 2, partner=v.key))
    return out + twins


#: The variants of --quick: the floor, the competitors, each store's target configuration
#: and the 2-worker twins.
QUICK = (
    "none",
    BASELINE,
    "limit-",
    "fs-",
    "memory-enc",
    "sqlite-enc",
    "postgres-enc",
    "postgres-async-enc",
    "redis-enc",
    "cluster-enc",
    "redis-cache",
)


def select(variants: list[Variant], only: str | None, *, quick: bool) -> list[Variant]:
    """The variants whose key starts with one of the comma-separated ``only`` (with
    --quick: of QUICK), and the baseline and the partners of those chosen, always."""
    wanted = [w.strip() for w in only.split(",") if w.strip()] if only else []
    if quick:
        wanted = [w for w in QUICK if not wanted or any(w.startswith(x) for x in wanted)]
    if not wanted:
        return variants
    chosen = {v.key for v in variants if any(v.key.startswith(w) for w in wanted)}
    if quick:  # the limits' 2-worker twins would take --quick past two minutes
        chosen -= {v.key for v in variants if v.key.startswith("limit-") and v.workers > 1}
    chosen.add(BASELINE)
    chosen |= {v.partner for v in variants if v.key in chosen}
    return [v for v in variants if v.key in chosen]


# -- measuring -------------------------------------------------------------------------


@contextlib.contextmanager
def serving(
    variants: list[Variant],
    scratch: Path,
    program: str,
    clients: int,
    worker_class: str = "sync",
) -> Iterator[None]:
    """Start every variant's gunicorn at once; log clients in; stop them all at the end."""
    try:
        for v in variants:
            v.server = start_gunicorn(
                v.spec, workers=v.workers, scratch=scratch, program=program,
                worker_class=worker_class,
            )  # fmt: skip
        for v in variants:
            assert v.server is not None
            wait_ready(v.server)
            # The floor's session always holds "alice": it loads and saves nothing.
            static = v.spec.layer in ("none", "bare-trips")
            users = [f"user{i}" if not static else "alice" for i in range(clients)]
            v.cookies = log_in(v.server.port, users)
            for index in range(60):  # warm pools, compiled statements, scripts
                http_request(v.server.port, "GET", "/read", v.cookies[index % clients])
                http_request(v.server.port, "POST", "/write", v.cookies[index % clients])
        yield
    finally:
        for v in variants:
            if v.server is not None:
                v.server.signal_stop()
        for v in variants:
            if v.server is not None:
                v.server.stop()


def measure(variants: list[Variant], wrk: Wrk, *, rounds: int, seconds: int) -> list[str]:
    """wrk on each variant and request kind, each run paired with a run of its partner
    (Flask's cookie session, or for a 2-worker twin its 1-worker self) right before or
    after it, ``rounds`` times, the order rotated; returns the failures.

    Pairing is what makes the ratios hold up on a machine whose load varies: the two
    runs of a pair are seconds apart, whatever happens minutes later.
    """
    by_key = {v.key: v for v in variants}
    failures: list[str] = []
    total = rounds * len(variants) * len(SCENARIOS)
    done = 0

    def run(v: Variant, scenario: str) -> WrkResult:
        assert v.server is not None
        method, path = SCENARIOS[scenario]
        result = wrk.run(v.server.port, v.cookies, method=method, path=path, seconds=seconds)
        if result.failures:
            failures.append(
                f"{v.label}, {scenario}: {result.non_2xx} non-2xx, "
                f"{result.anonymous} lost sessions, {result.socket_errors} socket errors "
                f"of {result.requests} (log: {v.server.log})"
            )
        return result

    for index in range(rounds):
        shift = index * max(1, len(variants) // max(1, rounds)) % len(variants)
        for v in variants[shift:] + variants[:shift]:
            partner = by_key[v.partner]
            for scenario in SCENARIOS:
                if (index + done // 2) % 2 == 0:
                    theirs, mine = run(partner, scenario), run(v, scenario)
                else:
                    mine, theirs = run(v, scenario), run(partner, scenario)
                v.runs[scenario].append(mine)
                v.partner_runs[scenario].append(theirs)
                done += 1
            if sys.stdout.isatty():
                print(f"\r  round {index + 1}/{rounds}: {done}/{total} pairs", end="", flush=True)
            else:
                rates = " ".join(
                    f"{s} {v.runs[s][-1].rate:.0f}/s "
                    f"({v.runs[s][-1].rate / v.partner_runs[s][-1].rate:.2f}x {v.partner})"
                    for s in SCENARIOS
                )
                print(f"  round {index + 1}/{rounds}, {done}/{total}: {v.key}: {rates}", flush=True)
    print()
    return failures


# -- counting store traffic, in process ---------------------------------------------------


def count_traffic(variants: list[Variant], servers: Servers, scratch: Path, count_db: str) -> None:
    """Store commands per request of each variant, counted in process on the wire.

    Sets ``v.traffic[scenario]`` to per-request figures: ``loads``/``writes``
    (Cloakroom's store operations), ``commands``/``round_trips`` (Redis, on the
    wire), ``server_calls`` (Redis INFO commandstats, including the commands a
    script runs), ``statements`` (SQL, as the database saw them).
    """
    import redis
    from redis.cluster import RedisCluster
    from redis_round_trips import Traffic  # puts the repository on sys.path, for tests/
    from tests.support import counting_connection

    from flask_cloakroom.stores.redis import RedisStore

    pg_log = PostgresStatementLog(servers.postgres.process.log_path) if servers.postgres else None
    requests = 20
    for v in variants:
        spec = v.spec
        if spec.layer in ("none", "bare-trips", "cookie") or v.workers > 1:
            continue
        traffic = Traffic()
        counting = counting_connection(traffic)
        sql_counter = [0]
        redis_nodes: list[Any] = []
        store: Store | None = None
        redis_client: Any = None
        url = spec.store
        if v.store == "postgres":
            url = count_db
        if v.store == "redis":
            host_port = servers.redis.host, servers.redis.port
            pool = redis.ConnectionPool(
                host=host_port[0], port=host_port[1], connection_class=counting
            )
            redis_client = redis.Redis(connection_pool=pool)
            redis_nodes = [servers.redis.client()]
        elif v.store == "redis-cluster":
            host, port = servers.cluster.nodes[0]
            redis_client = RedisCluster.from_url(
                f"redis://{host}:{port}", connection_class=counting
            )
            redis_nodes = [
                servers.cluster.node_client(i) for i in range(len(servers.cluster.nodes))
            ]
        if spec.layer == "cloakroom":
            if v.store == "memory":
                inner: Store = MemoryStore()
            elif v.store in ("redis", "redis-cluster"):
                inner = RedisStore(
                    redis_client,
                    prefix=f"cloakroom-count:{token()}:",
                    client_cache=CLIENT_CACHE if spec.client_cache else 0,
                )
            elif v.store == "sqlite":
                inner = open_store(f"sqlite:///{scratch}/count-{token()}.sqlite3")
                count_sqlite_statements(inner, sql_counter)
            else:
                # The store is built here, so a setting that opens it goes to open_store
                # (Cloakroom refuses it beside a ready store).
                config = dict(spec.config)
                async_commit = bool(config.pop("CLOAKROOM_SQL_ASYNC_COMMIT", False))
                spec = replace(spec, config=config)
                inner = open_store(
                    url, sql_table=f"cloakroom_count_{token()}", sql_async_commit=async_commit
                )
            store = InstrumentedStore(inner)
            app = create_app(spec, store=store)
        else:
            app = create_app(
                AppSpec(
                    spec.layer, url, prefix=f"fs-count:{token()}:", table=f"fs_count_{token()}"
                ),
                redis_client=redis_client,
            )
        browser = Browser(app)
        browser.login("counted")
        for _ in range(6):  # script loads, prepared statements, pool connections
            browser.request("GET", "/read")
            browser.request("POST", "/write")
        for scenario, (method, path) in SCENARIOS.items():
            if isinstance(store, InstrumentedStore):
                store.reset()
            traffic.reset()
            sql_counter[0] = 0
            calls_before = redis_command_calls(redis_nodes)
            if pg_log is not None and v.store == "postgres":
                pg_log.mark()
            for _ in range(requests):
                browser.request(method, path)
            figures: dict[str, float] = {}
            if isinstance(store, InstrumentedStore):
                figures["loads"] = store.reads / requests
                figures["writes"] = store.writes / requests
            if redis_nodes:
                figures["commands"] = traffic.commands / requests
                figures["round_trips"] = traffic.round_trips / requests
                calls = redis_command_calls(redis_nodes) - calls_before
                figures["server_calls"] = calls / requests
            if v.store == "sqlite":
                figures["statements"] = sql_counter[0] / requests
                figures["round_trips"] = figures["statements"]
            if v.store == "postgres" and pg_log is not None:
                figures["statements"] = pg_log.count() / requests
                figures["round_trips"] = figures["statements"]
            v.traffic[scenario] = figures
        if store is not None:
            store.close()
        for node in redis_nodes:
            node.close()
        if redis_client is not None:
            redis_client.close()


def traffic_text(v: Variant, scenario: str) -> str:
    figures = v.traffic.get(scenario)
    if not figures:
        return "-"
    parts = []
    if "loads" in figures:
        parts.append(f"{figures['loads']:g}r/{figures['writes']:g}w")
    trips = figures.get("round_trips")
    if trips is not None:
        text = f"{trips:g} trip{'' if trips == 1 else 's'}"
        commands = figures.get("commands")
        if commands is not None and commands != trips:
            text += f" ({commands:g} commands)"
        parts.append(text)
    return ", ".join(parts)


# -- targets ---------------------------------------------------------------------------


def ratio(variants: dict[str, Variant], key: str, scenario: str) -> float | None:
    """The variant's throughput over its partner's, median over its paired runs.

    The partner is Flask's cookie session, except for 2-worker twins (their 1-worker
    self); for those this is the cookie ratio of the 1-worker variant times the
    2-worker speed-up.
    """
    v = variants.get(key)
    if v is None or not v.runs[scenario]:
        return None
    got = statistics.median(paired_ratios(v, scenario))
    if v.partner != BASELINE:
        base = ratio(variants, v.partner, scenario)
        return None if base is None else got * base
    return got


def paired_ratios(v: Variant, scenario: str) -> list[float]:
    """The variant's throughput over its partner's, run by run (round by round)."""
    return [
        mine.rate / theirs.rate
        for mine, theirs in zip(v.runs[scenario], v.partner_runs[scenario], strict=True)
    ]


def noise(variants: dict[str, Variant], scenario: str) -> float | None:
    """How far the cookie session's paired runs against itself stray from 1 (median)."""
    v = variants.get(BASELINE)
    if v is None or not v.runs[scenario]:
        return None
    return statistics.median(abs(r - 1) for r in paired_ratios(v, scenario))


def speedup(variants: dict[str, Variant], key: str, scenario: str) -> float | None:
    """A 2-worker twin's throughput over its 1-worker self, median over paired runs."""
    v = variants.get(key)
    if v is None or v.workers == 1 or not v.runs[scenario]:
        return None
    return statistics.median(paired_ratios(v, scenario))


def _ratio_target(key: str, scenario: str, floor: float) -> Target:
    def check(variants: dict[str, Variant], _: dict[str, Any]) -> tuple[float | None, bool | None]:
        got = ratio(variants, key, scenario)
        return got, None if got is None else got >= floor

    def rounds(variants: dict[str, Variant]) -> list[float]:
        v = variants.get(key)
        return [] if v is None else paired_ratios(v, scenario)

    return Target(f"{key} {scenario}", check, f">= {floor:.2f}x cookie", rounds)


def _workers_target(key: str, scenario: str) -> Target:
    def check(variants: dict[str, Variant], _: dict[str, Any]) -> tuple[float | None, bool | None]:
        got = speedup(variants, f"{key}-x2", scenario)
        return got, None if got is None else got >= 1.6

    return Target(f"{key} {scenario}, 2 workers / 1", check, ">= 1.60x")


def _layer_target(scenario: str, most: float) -> Target:
    def check(_: dict[str, Variant], extra: dict[str, Any]) -> tuple[float | None, bool | None]:
        layer = extra.get("layer", {}).get("layer_us", {})
        got = layer.get("cloakroom memory + encryption", {}).get(scenario)
        return got, None if got is None else got <= most

    return Target(f"layer CPU, {scenario} path (µs)", check, f"<= {most:g} µs")


def _traffic_target(scenario: str) -> Target:
    wanted = {"read": (1, 0, 1), "write": (1, 1, 2)}[scenario]

    def check(variants: dict[str, Variant], _: dict[str, Any]) -> tuple[float | None, bool | None]:
        worst = None
        ok = None
        for v in variants.values():
            figures = v.traffic.get(scenario)
            if v.spec.layer != "cloakroom" or not figures:
                continue
            trips = figures.get("round_trips", figures["loads"] + figures["writes"])
            # At most what the target allows: the client cache makes fewer trips.
            got = (figures["loads"], figures["writes"], trips)
            fine = all(g <= w for g, w in zip(got, wanted, strict=True))
            ok = fine if ok is None else ok and fine
            worst = trips if worst is None else max(worst, trips)
        return worst, ok

    loads, writes, trips = wanted
    return Target(
        f"store traffic, {scenario}",
        check,
        f"{loads} read + {writes} write, {trips} round trip{'s' if trips > 1 else ''}",
    )


TARGETS = [
    _ratio_target("sqlite-enc", "read", 1.00),
    _ratio_target("sqlite-enc", "write", 0.90),
    _ratio_target("redis-enc", "read", 0.85),
    _ratio_target("redis-enc", "write", 0.75),
    _ratio_target("postgres-enc", "read", 0.80),
    _ratio_target("postgres-enc", "write", 0.45),
    _ratio_target("postgres-async-enc", "write", 0.65),
    _ratio_target("redis-cache", "read", 0.95),
    _layer_target("read", 25),
    _layer_target("write", 40),
    _traffic_target("read"),
    _traffic_target("write"),
    _workers_target(BASELINE, "read"),
    _workers_target("sqlite-enc", "read"),
    _workers_target("sqlite-enc", "write"),
    _workers_target("redis-enc", "read"),
    _workers_target("redis-enc", "write"),
    _workers_target("postgres-enc", "read"),
    _workers_target("postgres-enc", "write"),
]


#: Cloakroom's variants on a network store, and the bare round trips of that store.
LIMITS = (
    ("redis-enc", "limit-redis"),
    ("cluster-enc", "limit-redis"),
    ("postgres-enc", "limit-postgres"),
)


def limit_lines(variants: list[Variant]) -> list[str]:
    """How close Cloakroom comes to the physical limit of its store on this machine:
    its ratio next to the ratio of the store's bare round trips (``limit-*``)."""
    by_key = {v.key: v for v in variants}
    out = []
    for key, limit in LIMITS:
        cells = []
        for scenario in SCENARIOS:
            mine, bare = ratio(by_key, key, scenario), ratio(by_key, limit, scenario)
            if mine is None or bare is None:
                break
            cells.append(f"{scenario} {mine:.2f} of {bare:.2f} ({mine / bare:.0%})")
        else:
            out.append(f"{by_key[key].label}: " + "; ".join(cells))
    return out


LIMIT_HEADING = (
    "Cloakroom against the bare round trips of its store (the physical limit here), "
    "both over the cookie session:"
)


# -- reporting -------------------------------------------------------------------------


def table(variants: list[Variant]) -> list[str]:
    by_key = {v.key: v for v in variants}
    lines = [
        f"{'variant':56} {'w':>1} | {'read/s':>7} {'ratio':>5} {'p50':>5} {'p99':>5} "
        f"| {'write/s':>7} {'ratio':>5} {'p50':>5} {'p99':>5} | store traffic read; write",
    ]
    lines.append("-" * len(lines[0]) + "-" * 12)
    for v in variants:
        cells = []
        for scenario in SCENARIOS:
            got = ratio(by_key, v.key, scenario)
            cells.append(
                f"{v.rate(scenario):7.0f} {got:5.2f} {v.latency(scenario, 'p50_us'):5.2f} "
                f"{v.latency(scenario, 'p99_us'):5.2f}"
            )
        traffic = f"{traffic_text(v, 'read')}; {traffic_text(v, 'write')}"
        if v.workers > 1:
            ups = [speedup(by_key, v.key, s) or 0.0 for s in SCENARIOS]
            traffic = f"2 workers / 1: read {ups[0]:.2f}x, write {ups[1]:.2f}x"
        lines.append(f"{v.label:56} {v.workers:1} | {cells[0]} | {cells[1]} | {traffic}")
    return lines


def targets_report(variants: list[Variant], extra: dict[str, Any]) -> list[dict[str, Any]]:
    by_key = {v.key: v for v in variants}
    out = []
    for target in TARGETS:
        got, ok = target.check(by_key, extra)
        row: dict[str, Any] = {
            "target": target.name,
            "wanted": target.wanted,
            "measured": got,
            "met": ok,
        }
        if target.rounds is not None:
            row["rounds"] = target.rounds(by_key)
        out.append(row)
    return out


def rounds_text(row: dict[str, Any]) -> str:
    """A ratio target's figure round by round, for its verdict: " (rounds 0.59 0.76 0.68)"."""
    each = row.get("rounds")
    if not each or len(each) < 2:
        return ""
    return f" (rounds {' '.join(f'{x:.2f}' for x in each)})"


def chart(variants: list[Variant], path: Path, title: str) -> bool:
    """A bar chart of the throughput ratios, target lines drawn; False without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        pyplot: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no chart")
        return False
    by_key = {v.key: v for v in variants}
    shown = [v for v in variants if v.workers == 1]
    goals: dict[tuple[str, str], float] = {
        ("sqlite-enc", "read"): 1.00,
        ("sqlite-enc", "write"): 0.90,
        ("redis-enc", "read"): 0.85,
        ("redis-enc", "write"): 0.75,
        ("postgres-enc", "read"): 0.80,
        ("postgres-enc", "write"): 0.45,
        ("postgres-async-enc", "write"): 0.65,
        ("redis-cache", "read"): 0.95,
    }
    figure, axes = pyplot.subplots(
        1, 2, figsize=(13, 0.36 * len(shown) + 1.6), sharey=True, constrained_layout=True
    )
    names = [v.label for v in shown]
    positions = list(range(len(shown)))
    for ax, scenario, heading in zip(
        axes, SCENARIOS, ("read-only request", "modifying request"), strict=True
    ):
        values = [ratio(by_key, v.key, scenario) or 0.0 for v in shown]
        colours = []
        for v in shown:
            if v.spec.layer == "cloakroom":
                colours.append("#2b6cb0" if v.spec.encrypted else "#90cdf4")
            elif v.spec.layer == "flask-session":
                colours.append("#dd6b20")
            else:
                colours.append("#718096")
        ax.barh(positions, values, color=colours, height=0.7)
        for y, value in zip(positions, values, strict=True):
            ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        for y, v in zip(positions, shown, strict=True):
            goal = goals.get((v.key, scenario))
            if goal is not None:
                met = (values[y] or 0) >= goal
                ax.plot(
                    [goal, goal],
                    [y - 0.45, y + 0.45],
                    color="#2f855a" if met else "#c53030",
                    linewidth=2.5,
                )
        ax.set_title(f"{heading}: throughput / Flask cookie session", fontsize=10)
        ax.set_xlim(0, max(1.3, max(values) + 0.15))
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_yticks(positions, names, fontsize=8)
    axes[0].invert_yaxis()
    patches: Any = importlib.import_module("matplotlib.patches")
    lines: Any = importlib.import_module("matplotlib.lines")
    legend = [
        patches.Patch(color="#718096", label="no session / Flask cookie session"),
        patches.Patch(color="#dd6b20", label="Flask-Session 0.8"),
        patches.Patch(color="#2b6cb0", label="Cloakroom, encryption + activity (targets)"),
        patches.Patch(color="#90cdf4", label="Cloakroom, encryption or activity off"),
        lines.Line2D([], [], color="#2f855a", linewidth=2.5, label="target, met"),
        lines.Line2D([], [], color="#c53030", linewidth=2.5, label="target, missed"),
    ]
    # Below the plots, where it hides no bar.
    figure.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True


def legend(by_key: dict[str, Variant]) -> str:
    """What the table's columns mean, and how noisy the run was."""
    text = (
        "w: gunicorn workers. ratio: throughput / Flask cookie session's in a run right "
        "before or after (paired), median over rounds; 2-worker rows: the 1-worker ratio "
        "times their speed-up.  p50, p99: latency in ms (median over rounds).  Store "
        "traffic per request: Cloakroom's store reads/writes, and round trips as counted "
        "on the wire (Redis) or by the database (SQL)."
    )
    spread = [noise(by_key, s) for s in SCENARIOS]
    if None not in spread:
        text += (
            f"  Noise: the cookie session paired with itself strayed from 1.00 by a median "
            f"of {spread[0]:.0%} (read) and {spread[1]:.0%} (write)."
        )
    return text


def markdown(variants: list[Variant], results: list[dict[str, Any]]) -> str:
    """The results table and the targets as Markdown (for the README and the docs)."""
    by_key = {v.key: v for v in variants}
    out = [
        "| variant | workers | read-only req/s | ratio | p50 / p99 ms "
        "| modifying req/s | ratio | p50 / p99 ms | store round trips (read; write) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in variants:
        cells = [v.label, str(v.workers)]
        for scenario in SCENARIOS:
            got = ratio(by_key, v.key, scenario)
            cells += [
                f"{v.rate(scenario):,.0f}",
                "-" if got is None else f"{got:.2f}",
                f"{v.latency(scenario, 'p50_us'):.2f} / {v.latency(scenario, 'p99_us'):.2f}",
            ]
        if v.workers > 1:
            ups = [speedup(by_key, v.key, s) or 0.0 for s in SCENARIOS]
            cells.append(f"2 workers / 1: {ups[0]:.2f}x; {ups[1]:.2f}x")
        else:
            cells.append(f"{traffic_text(v, 'read')}; {traffic_text(v, 'write')}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| target | wanted | measured | |", "|---|---|---:|---|"]
    for row in results:
        got = row["measured"]
        verdict = {True: "met", False: "**missed**", None: "not measured"}[row["met"]]
        shown = "-" if got is None else f"{got:.2f}"
        out.append(f"| {row['target']} | {row['wanted']} | {shown} | {verdict}{rounds_text(row)} |")
    limits = limit_lines(variants)
    if limits:
        out += ["", LIMIT_HEADING, ""] + [f"- {line}" for line in limits]
    return "\n".join(out) + "\n\n" + legend(by_key) + "\n"


def load_record(path: Path) -> tuple[list[Variant], dict[str, Any]]:
    """The variants and the extra results of a saved run."""
    record = json.loads(path.read_text())
    variants = []
    for item in record["variants"]:
        v = Variant(
            item["key"],
            item["label"],
            AppSpec(**item["spec"]),
            workers=item["workers"],
            partner=item.get("partner", BASELINE),
            traffic=item.get("traffic", {}),
        )
        v.runs = {s: [WrkResult(**r) for r in item["runs"][s]] for s in SCENARIOS}
        v.partner_runs = {
            s: [WrkResult(**r) for r in item.get("partner_runs", item["runs"])[s]]
            for s in SCENARIOS
        }
        variants.append(v)
    return variants, record


def report_saved(path: Path) -> int:
    """``--report``: print a saved run's table, targets and Markdown; redraw its chart."""
    variants, record = load_record(path)
    print("\n".join(table(variants)))
    print("\n" + legend({v.key: v for v in variants}))
    results = targets_report(variants, record)
    print()
    print(markdown(variants, results))
    settings = record["settings"]
    info = record["machine"]
    title = (
        f"Flask-Cloakroom benchmark {record['when']}: gunicorn 1 sync worker, "
        f"wrk -c{settings['connections']} on loopback, {settings['rounds']}x"
        f"{settings['seconds']}s; {info['cpus']} CPUs {info['cpu']}"
    )
    png = path.with_suffix(".png")
    if chart(variants, png, title):
        print(f"chart: {png}")
    return 0


# -- main ------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="under two minutes in all")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per variant and request")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--clients", type=int, default=8, help="logged-in sessions per variant")
    parser.add_argument("--only", help="comma-separated variant keys (prefixes) to run")
    parser.add_argument("--no-cluster", action="store_true", help="skip Redis Cluster")
    parser.add_argument(
        "--no-client-cache", action="store_true", help="skip Redis with client-side caching"
    )
    parser.add_argument("--no-count", action="store_true", help="skip counting store traffic")
    parser.add_argument("--no-layer", action="store_true", help="skip the in-process layer CPU")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for results")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="MINUTES",
        help="first wait up to this long for an idle machine (10 s under 15%% CPU)",
    )
    parser.add_argument(
        "--report", type=Path, help="do not measure: show a saved run's JSON (and redraw its chart)"
    )
    args = parser.parse_args(argv)
    if args.report:
        return report_saved(args.report)
    seconds, rounds = (1, 1) if args.quick else (args.duration, args.rounds)
    # Stop cleanly (gunicorns, servers) on SIGTERM, and on SIGINT even when started in
    # the background (where the shell makes SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()

    wrk_program = find_wrk()
    program = find_gunicorn()
    for module in ("flask_session", "flask_sqlalchemy"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise SystemExit(
                f"{module} is needed: pip install flask-session==0.8.0 flask-sqlalchemy "
                "(in the benchmark's virtualenv)"
            ) from None
    if args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:g} min for an idle machine...", flush=True)
        if not wait_for_quiet(args.wait_quiet):
            print("the machine did not become idle; measuring anyway")
    info = machine()
    busy = cpu_busy(1.0)
    print(
        f"machine: {info['cpus']} CPUs, {info['cpu']}, {info['memory']} RAM, "
        f"Linux {info['kernel']}, Python {info['python']}"
    )
    print(f"CPU busy before the run: {busy:.0%}", end="")
    print("  (WARNING: the machine is not idle; numbers will be noisy)" if busy > 0.15 else "")
    wanted = {"redis", "postgres"} | (set() if args.no_cluster else {"redis_cluster"})
    servers = Servers(wanted)
    versions_used = versions(
        {
            "wrk": [wrk_program, "-v"],
            "redis-server": ["redis-server", "--version"],
        }
    )
    versions_used.update(servers.sources)
    stamp = timestamp()
    args.output.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    other_load: dict[str, float] = {}
    try:
        with scratch_dir("perf") as tmp:
            scratch = Path(tmp)
            count_db = servers.create_database("cloakroom_perf_count", log_statement="all")
            urls = {
                "redis": servers.redis.url,
                "postgres": servers.create_database("cloakroom_perf"),
            }
            if servers.cluster is not None:
                urls["redis_cluster"] = servers.cluster.url
            variants = select(
                make_variants(urls, scratch, client_cache=not args.no_client_cache),
                args.only,
                quick=args.quick,
            )
            print(
                f"{len(variants)} variants, {rounds} round(s) of {seconds} s per request kind, "
                f"wrk -t{args.threads} -c{args.connections}, gunicorn sync workers"
            )
            wrk = Wrk(wrk_program, scratch, connections=args.connections, threads=args.threads)
            with serving(variants, scratch, program, args.clients):
                print(f"servers up in {time.monotonic() - started:.0f} s")
                with ForeignLoad() as foreign:
                    failures = measure(variants, wrk, rounds=rounds, seconds=seconds)
                other_load = foreign.summary()
                if other_load:
                    print(
                        f"other processes' CPU use during the wrk runs (share of the machine): "
                        f"median {other_load['median']:.0%}, max {other_load['max']:.0%}"
                    )
            if not args.no_count:
                count_traffic(variants, servers, scratch, count_db)
            extra: dict[str, Any] = {}
            if not args.no_layer:
                from layer import run_layer

                print("\nthe session layer's own CPU, in process:")
                layer_rounds, per_round = (5, 200) if args.quick else (21, 500)
                extra["layer"] = run_layer(
                    rounds=layer_rounds, per_round=per_round, redis_url=servers.redis.url
                )
    finally:
        servers.close()

    print()
    lines = table(variants)
    print("\n".join(lines))
    print("\n" + legend({v.key: v for v in variants}))
    results = targets_report(variants, extra)
    print("\ntargets (issue 7):")
    for row in results:
        got = row["measured"]
        shown = "n/a" if got is None else f"{got:.2f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        print(f"  {row['target']:40} {row['wanted']:28} {shown:>8}  {verdict}{rounds_text(row)}")
    limits = limit_lines(variants)
    if limits:
        print("\n" + LIMIT_HEADING + "\n  " + "\n  ".join(limits))
    title = (
        f"Flask-Cloakroom benchmark {stamp}: gunicorn 1 sync worker, wrk -c{args.connections} "
        f"on loopback, {rounds}x{seconds}s; {info['cpus']} CPUs {info['cpu']}"
    )
    png = args.output / f"{stamp}.png"
    has_chart = chart(variants, png, title)
    record = {
        "when": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "cpu_busy_before": busy,
        "other_processes_cpu_during_wrk": other_load,
        "versions": versions_used,
        "settings": {
            "seconds": seconds,
            "rounds": rounds,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "clients": args.clients,
        },
        "variants": [
            {
                "key": v.key,
                "label": v.label,
                "workers": v.workers,
                "spec": asdict(v.spec),
                "ratio": {s: ratio({x.key: x for x in variants}, v.key, s) for s in SCENARIOS},
                "partner": v.partner,
                "runs": {s: [asdict(r) for r in v.runs[s]] for s in SCENARIOS},
                "partner_runs": {s: [asdict(r) for r in v.partner_runs[s]] for s in SCENARIOS},
                "traffic": v.traffic,
            }
            for v in variants
        ],
        "targets": results,
        "limits": limit_lines(variants),
        "failures": failures,
        "table": lines,
        **extra,
    }
    (args.output / f"{stamp}.md").write_text(markdown(variants, results))
    out = args.output / f"{stamp}.json"
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"\nresults: {out}" + (f"\nchart: {png}" if has_chart else ""))
    print(f"took {time.monotonic() - started:.0f} s")
    if failures:
        print("\nFAILED: some requests did not succeed:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
