"""Busy polling on and off, with as many gunicorn workers as you like.

``CLOAKROOM_BUSY_POLL`` makes a worker ask its socket for the store's answer for up to
100 µs before it sleeps.  That pays when a CPU would otherwise idle while the worker
waits, and costs when other runnable threads want that CPU, as with more busy workers
than cores (gunicorn's usual advice is 2 x cores + 1).  So a worker that has been
waiting for a CPU more than half the time does not poll (``stores.base.cpu_crowded``).

For each worker count this serves Cloakroom with encryption on Redis and on
PostgreSQL, polling at the default and off, each by its own gunicorn, and runs wrk on
them in pairs (polling, then off, or the other way round), in rounds.  It prints the
throughputs, polling over off per pair, and the share of the time each worker was on a
CPU and waiting for one (from ``/proc/<pid>/schedstat``).

Run (the perf virtualenv of ``run.py``; the machine otherwise idle)::

    /tmp/perf-venv/bin/python benchmarks/polling.py                  # 1, 2 and 5 workers
    /tmp/perf-venv/bin/python benchmarks/polling.py --workers 3,9 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _apps import (
    AppSpec,
    Gunicorn,
    Servers,
    Wrk,
    cpu_busy,
    find_gunicorn,
    find_wrk,
    finish_run,
    http_request,
    log_in,
    machine,
    scratch_dir,
    start_gunicorn,
    token,
    wait_ready,
)

from flask_cloakroom.stores.base import BUSY_POLL_US

SCENARIOS = {"read": ("GET", "/read"), "write": ("POST", "/write")}
STORES = ("redis", "postgres")
POLLS = (BUSY_POLL_US, 0)


@dataclass
class Served:
    """One store at one polling setting, served by its gunicorn."""

    server: Gunicorn
    cookies: list[str] = field(default_factory=list)
    rates: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})
    on_cpu: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})
    waiting: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})


def schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds ``pid`` (its main thread) spent on a CPU and waiting for one."""
    fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(fields[0]), int(fields[1])


def measure(served: Served, wrk: Wrk, scenario: str, seconds: int) -> int:
    """One wrk run; the share of time on and waiting for a CPU; the failures."""
    method, path = SCENARIOS[scenario]
    pids = served.server.worker_pids()
    before = {pid: schedstat(pid) for pid in pids}
    started = time.monotonic_ns()
    result = wrk.run(served.server.port, served.cookies, method=method, path=path, seconds=seconds)
    wall = time.monotonic_ns() - started
    after = {pid: schedstat(pid) for pid in pids}
    served.rates[scenario].append(result.rate)
    for index, shares in enumerate((served.on_cpu, served.waiting)):
        spent = statistics.mean((after[p][index] - before[p][index]) / wall for p in pids)
        shares[scenario].append(spent)
    return result.failures


def run_workers(
    workers: int, urls: dict[str, str], scratch: Path, rounds: int, seconds: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every store at both polling settings with ``workers`` workers, in pairs."""
    program = find_gunicorn()
    served: dict[tuple[str, int], Served] = {}
    failures: list[str] = []
    try:
        for store in STORES:
            for poll in POLLS:
                spec = AppSpec(
                    "cloakroom",
                    urls[store],
                    encrypted=True,
                    prefix=f"cloakroom-polling:{token()}:",
                    table=f"cloakroom_polling_{token()}",
                    config={"CLOAKROOM_BUSY_POLL": poll},
                )
                server = start_gunicorn(spec, workers=workers, scratch=scratch, program=program)
                served[store, poll] = Served(server)
        for s in served.values():
            wait_ready(s.server)
            s.cookies = log_in(s.server.port, [f"user{i}" for i in range(8)])
            for index in range(100):  # warm pools, prepared statements, scripts
                cookie = s.cookies[index % 8]
                http_request(s.server.port, "GET", "/read", cookie)
                http_request(s.server.port, "POST", "/write", cookie)
        wrk = Wrk(find_wrk(), scratch)
        for index in range(rounds):
            for store in STORES:
                for scenario in SCENARIOS:
                    order = POLLS if index % 2 == 0 else POLLS[::-1]
                    for poll in order:
                        failed = measure(served[store, poll], wrk, scenario, seconds)
                        if failed:
                            failures.append(f"{workers} workers, {store}, poll {poll}: {failed}")
    finally:
        for s in served.values():
            s.server.signal_stop()
        for s in served.values():
            s.server.stop()
    rows = []
    for store in STORES:
        polled, slept = served[store, POLLS[0]], served[store, 0]
        for scenario in SCENARIOS:
            pairs = [
                a / b for a, b in zip(polled.rates[scenario], slept.rates[scenario], strict=True)
            ]
            rows.append(
                {
                    "workers": workers,
                    "store": store,
                    "scenario": scenario,
                    "polling_rate": statistics.median(polled.rates[scenario]),
                    "off_rate": statistics.median(slept.rates[scenario]),
                    "polling_over_off": statistics.median(pairs),
                    "pairs": pairs,
                    "polling_on_cpu": statistics.median(polled.on_cpu[scenario]),
                    "polling_waiting": statistics.median(polled.waiting[scenario]),
                    "off_on_cpu": statistics.median(slept.on_cpu[scenario]),
                    "off_waiting": statistics.median(slept.waiting[scenario]),
                }
            )
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,5", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--output", type=Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not Path("/proc/self/schedstat").exists():
        raise SystemExit("polling.py reads /proc/<pid>/schedstat: it runs on Linux only")
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    started = time.monotonic()
    info = machine()
    print(f"machine: {info['cpus']} CPUs, {info['cpu']}, Python {info['python']}")
    print(f"CPU busy before the run: {cpu_busy(1.0):.0%}")
    servers = Servers({"redis", "postgres"})
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        with scratch_dir("polling") as tmp:
            urls = {"redis": servers.redis.url, "postgres": servers.create_database("cl_polling")}
            for workers in counts:
                got, failed = run_workers(workers, urls, Path(tmp), args.rounds, args.duration)
                rows += got
                failures += failed
                print(f"  {workers} workers done", flush=True)
    finally:
        servers.close()
    print()
    print(
        f"{'workers':>7} {'store':9} {'req':5} {'polling/s':>9} {'off/s':>7} {'polling/off':>11}"
        f"  {'a worker on a CPU / waiting for one (polling; off)':50}"
    )
    for r in rows:
        pairs = " ".join(f"{p:.2f}" for p in r["pairs"])
        print(
            f"{r['workers']:>7} {r['store']:9} {r['scenario']:5} {r['polling_rate']:9.0f} "
            f"{r['off_rate']:7.0f} {r['polling_over_off']:11.2f}  "
            f"{r['polling_on_cpu']:.0%} / {r['polling_waiting']:.0%}; "
            f"{r['off_on_cpu']:.0%} / {r['off_waiting']:.0%}   (pairs {pairs})"
        )
    record = {
        "busy_poll_us": BUSY_POLL_US,
        "rounds": args.rounds,
        "duration": args.duration,
        "rows": rows,
    }
    return finish_run("polling", record, args.output, started, failures)


if __name__ == "__main__":
    sys.exit(main())
