"""Load test: gunicorn (2 sync workers) on loopback, wrk at 64 connections, per store.

For each store (an SQLite file; throwaway PostgreSQL and Redis servers started by the
script, and MariaDB on request) the script starts gunicorn serving the bench app of
``benchmarks/_apps.py``, logs in a set of clients, and runs wrk twice, each for
``--duration`` seconds: on ``GET /read`` (one store read, no write) and on ``POST
/write`` (one read and one conditional write; clients share nothing, but 64
connections over the clients' sessions do overlap).  It prints throughput, p50, p90
and p99 latency, non-2xx responses and socket errors side by side, and fails (exit
status 1) if any request was not a 2xx or found its session gone.

Set up once (wrk from your OS; gunicorn in a virtualenv of its own, not in the
project's dependencies)::

    apt-get install -y wrk                       # or: brew install wrk
    python3 -m venv /tmp/cloakroom-bench
    /tmp/cloakroom-bench/bin/pip install -e '.[test]' gunicorn

Run::

    /tmp/cloakroom-bench/bin/python benchmarks/load.py              # 60 s per run: ~7 min
    /tmp/cloakroom-bench/bin/python benchmarks/load.py --quick      # 5 s per run
    /tmp/cloakroom-bench/bin/python benchmarks/load.py --stores sqlite,mysql --duration 30

wrk, gunicorn and the store share the machine's cores: on a small machine the
numbers say how the whole stack behaves, not what gunicorn alone could do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _apps import (
    STORE_KINDS,
    Wrk,
    WrkResult,
    find_gunicorn,
    find_wrk,
    log_in,
    machine,
    scratch_dir,
    start_gunicorn,
    store_server,
    tool_version,
    wait_ready,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default="sqlite,postgres,redis", help="comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="5 s per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument("--clients", type=int, default=200, help="logged-in sessions")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds, not measured")
    parser.add_argument("--gunicorn", help="path to gunicorn (default: beside this Python)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    duration = 5.0 if args.quick else args.duration
    warmup = min(args.warmup, 2.0) if args.quick else args.warmup
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STORE_KINDS]
    if unknown:
        parser.error(f"unknown store(s) {unknown}; known: {', '.join(STORE_KINDS)}")
    program = args.gunicorn or find_gunicorn()
    wrk_program = find_wrk()

    info = machine()
    print(
        f"machine: {info['cpus']} CPU(s), {info['cpu']}, {info['memory']}, "
        f"Python {info['python']}, Linux {info['kernel']}"
    )
    versions = tool_version([program, "--version"]), tool_version([wrk_program, "-v"])
    print(f"gunicorn: {versions[0]}; wrk: {versions[1]}")
    print(
        f"{args.workers} {args.worker_class} workers, wrk -t{args.threads} "
        f"-c{args.connections}, {duration:g} s per run, {args.clients} logged-in clients"
    )
    results: dict[str, dict[str, WrkResult]] = {}
    sources: dict[str, str] = {}
    for kind in kinds:
        with scratch_dir(f"load-{kind}") as scratch_text:
            scratch = Path(scratch_text)
            with store_server(kind, scratch) as store:
                sources[kind] = store.source
                print(f"\n== {kind}: {store.source}", flush=True)
                server = start_gunicorn(
                    store.spec,
                    workers=args.workers,
                    scratch=scratch,
                    program=program,
                    worker_class=args.worker_class,
                )
                try:
                    wait_ready(server)
                    cookies = log_in(server.port, [f"user{i}" for i in range(args.clients)])
                    wrk = Wrk(
                        wrk_program, scratch, connections=args.connections, threads=args.threads
                    )
                    if warmup:
                        wrk.run(
                            server.port, cookies, method="GET", path="/read", seconds=round(warmup)
                        )
                    results[kind] = {}
                    for endpoint, method in (("read", "GET"), ("write", "POST")):
                        result = wrk.run(
                            server.port,
                            cookies,
                            method=method,
                            path=f"/{endpoint}",
                            seconds=round(duration),
                        )
                        results[kind][endpoint] = result
                        print(f"   {endpoint:<6} {line(result)}", flush=True)
                        time.sleep(1)
                finally:
                    server.stop()

    print()
    print(table(results))
    runs = [r for per_store in results.values() for r in per_store.values()]
    print(f"\nnot 2xx (statuses, socket errors, timeouts), all runs: {sum(map(not_2xx, runs))}")
    lost = sum(r.anonymous for r in runs)
    if lost:
        print(f"sessions lost (a 2xx saying user=None), all runs: {lost}")
    failures = sum(r.failures for r in runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "duration": duration,
                    "connections": args.connections,
                    "workers": args.workers,
                    "sources": sources,
                    "results": {
                        k: {e: asdict(r) for e, r in v.items()} for k, v in results.items()
                    },
                },
                indent=2,
            )
        )
    return 1 if failures else 0


def not_2xx(result: WrkResult) -> int:
    """Requests that got no 2xx: other statuses, socket errors and timeouts."""
    return result.non_2xx + result.socket_errors


def line(result: WrkResult) -> str:
    lost = f"  sessions lost {result.anonymous}" if result.anonymous else ""
    return (
        f"{result.rate:8.0f} req/s  p50 {result.p50_us / 1000:6.1f} ms  "
        f"p99 {result.p99_us / 1000:6.1f} ms  "
        f"non-2xx {result.non_2xx}  socket errors {result.socket_errors}{lost}"
    )


def table(results: dict[str, dict[str, WrkResult]]) -> str:
    """The results side by side, as a Markdown table."""
    rows = [
        "| store | endpoint | requests | req/s | p50 ms | p90 ms | p99 ms | non-2xx "
        "| socket errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, per_endpoint in results.items():
        for endpoint, r in per_endpoint.items():
            rows.append(
                f"| {kind} | {endpoint} | {r.requests:,} | {r.rate:,.0f} | {r.p50_us / 1000:.1f} | "
                f"{r.p90_us / 1000:.1f} | {r.p99_us / 1000:.1f} | {r.non_2xx} | {r.socket_errors} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
