"""Soak test: steady load for minutes, workers' memory sampled, the store restarted once.

gunicorn (2 sync workers) serves the bench app of ``benchmarks/_apps.py`` on a
throwaway PostgreSQL, Redis or MariaDB server; wrk keeps ``--connections`` connections
busy for ``--minutes`` (90 % reads, 10 % writes over the logged-in clients' sessions),
in back-to-back runs of ``--window`` seconds so that errors can be placed in time.
Meanwhile:

* the resident memory (VmRSS) of gunicorn's master and workers is sampled every
  ``--sample`` seconds;
* a probe sends one request every 0.1 s, to time the outage and the recovery finely;
* at ``--at`` (a fraction of the run; several fractions give several outages) the
  store server is stopped, kept down for ``--outage`` seconds, and started again.
  Nothing else is touched: the same gunicorn workers must recover by themselves.

The report: requests and errors per window (errors, sessions found gone among them,
are allowed only in windows that overlap the outage), when the first and last failures
happened relative to the outage, how long after the store was back the first request
succeeded, whether the workers were restarted (their process ids), and memory growth
(mean RSS of the first minute against the last, split into growth under steady load,
between the outages, and the step across each outage).  The exit status is 1 if an
error happened outside the outage, if a worker was restarted, or if the workers'
memory grew by more than ``--max-growth`` MiB under steady load.

Set up as for ``load.py`` (wrk from the OS; gunicorn in its own virtualenv), then::

    /tmp/cloakroom-bench/bin/python benchmarks/soak.py                    # 10 min, PostgreSQL
    /tmp/cloakroom-bench/bin/python benchmarks/soak.py --store redis --minutes 2
    /tmp/cloakroom-bench/bin/python benchmarks/soak.py --minutes 20 --at 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _apps import (
    Wrk,
    WrkResult,
    find_gunicorn,
    find_wrk,
    http_request,
    log_in,
    machine,
    rss_kib,
    scratch_dir,
    start_gunicorn,
    store_server,
    wait_ready,
)

#: How long after the store is back errors still count as part of the outage (s).
GRACE = 2.0


@dataclass
class Outage:
    """When the store went down and came back (Unix times)."""

    stopping: float = 0.0
    stopped: float = 0.0
    starting: float = 0.0
    started: float = 0.0


@dataclass
class Probe:
    """One probe request: when, its status (0 for a socket error), how long it took."""

    at: float
    status: int
    seconds: float


@dataclass
class Samples:
    """Memory samples: (time, {pid: RSS KiB}) for the master and each worker."""

    rss: list[tuple[float, dict[int, int]]] = field(default_factory=list)


@dataclass
class Memory:
    """One process's memory (RSS, MiB): the first and last minute's means of each
    stretch of steady load (before the first outage, between two, after the last)."""

    worker: bool
    stretches: list[tuple[float, float]]

    @property
    def steady_growth(self) -> float:
        """What the stretches grew by, together: what a leak would show."""
        return sum(last - first for first, last in self.stretches)

    @property
    def outage_steps(self) -> list[float]:
        """From the last minute before each outage to the first minute after it."""
        return [b[0] - a[1] for a, b in itertools.pairwise(self.stretches)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", choices=["postgres", "redis", "mysql"], default="postgres")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--at", type=float, nargs="+", default=[0.5], help="stop the store at these fractions"
    )
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the store is down")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--writes", type=int, default=10, help="one write in this many requests")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before measuring")
    parser.add_argument(
        "--max-growth", type=float, default=2.0, help="MiB the workers may grow under steady load"
    )
    parser.add_argument("--gunicorn")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    args = parser.parse_args(argv)
    total = args.minutes * 60
    ats = sorted(args.at)
    room = (args.outage + GRACE + 120) / total  # a minute of steady load on each side
    if ats[0] <= 0 or ats[-1] >= 1 or any(b - a < room for a, b in itertools.pairwise(ats)):
        parser.error(
            f"--at: fractions between 0 and 1, at least {room:.2f} apart for a {args.minutes:g}"
            " minute run (a minute of steady load before and after each outage)"
        )
    program = args.gunicorn or find_gunicorn()
    wrk_program = find_wrk()
    info = machine()
    print(f"machine: {info['cpus']} CPU(s), {info['cpu']}, {info['memory']}")
    print(
        f"soak: {args.minutes:g} min on {args.store}, wrk -c{args.connections} in "
        f"{args.window:g} s windows, 1 write in {args.writes}, store down {args.outage:g} s "
        f"at {', '.join(f'{at:.0%}' for at in ats)}"
    )

    with scratch_dir("soak") as scratch_text:
        scratch = Path(scratch_text)
        with store_server(args.store, scratch) as store:
            assert store.stop is not None and store.start is not None
            print(f"store: {store.source}")
            server = start_gunicorn(store.spec, workers=2, scratch=scratch, program=program)
            try:
                wait_ready(server)
                cookies = log_in(server.port, [f"user{i}" for i in range(args.clients)])
                wrk = Wrk(wrk_program, scratch, connections=args.connections, threads=args.threads)

                def run_wrk(seconds: float) -> WrkResult:
                    return wrk.run(
                        server.port,
                        cookies,
                        method="GET",
                        path="/read",
                        seconds=round(seconds),
                        write_every=args.writes,
                    )

                if args.warmup:
                    print(f"warming up for {args.warmup:g} s", flush=True)
                    run_wrk(args.warmup)
                workers_before = sorted(server.worker_pids())
                pids = [server.process.pid, *workers_before]
                samples = Samples()
                probes: list[Probe] = []
                outages: list[Outage] = []
                windows: list[WrkResult] = []
                stop = threading.Event()
                began = time.time()

                def sample() -> None:
                    while not stop.is_set():
                        now = time.time()
                        samples.rss.append((now, {p: rss_kib(p) or 0 for p in pids}))
                        stop.wait(args.sample)

                def probe() -> None:
                    cookie = cookies[0]
                    while not stop.is_set():
                        at = time.time()
                        try:
                            status, _, _ = http_request(
                                server.port, "GET", "/read", cookie, timeout=5
                            )
                        except OSError:
                            status = 0
                        probes.append(Probe(at, status, time.time() - at))
                        stop.wait(0.1)

                def restart() -> None:
                    assert store.stop is not None and store.start is not None
                    for at in ats:
                        if stop.wait(max(0.0, began + at * total - time.time())):
                            return
                        outage = Outage(stopping=time.time())
                        print(f"[{outage.stopping - began:6.1f} s] stopping the store", flush=True)
                        store.stop()
                        outage.stopped = time.time()
                        stop.wait(args.outage)
                        outage.starting = time.time()
                        store.start()
                        outage.started = time.time()
                        outages.append(outage)
                        print(
                            f"[{outage.started - began:6.1f} s] store back "
                            f"(down {outage.started - outage.stopping:.1f} s)",
                            flush=True,
                        )
                    # The server dies with the thread that started it (the harness sets a
                    # parent-death signal, which Linux ties to the thread): stay alive.
                    stop.wait()

                helpers = [
                    threading.Thread(target=f, daemon=True) for f in (sample, probe, restart)
                ]
                for helper in helpers:
                    helper.start()
                try:
                    while time.time() - began < total:
                        left = total - (time.time() - began)
                        result = run_wrk(min(args.window, max(1.0, left)))
                        windows.append(result)
                        lost = f"  sessions lost {result.anonymous}" if result.anonymous else ""
                        mark = " <- errors" if result.failures else ""
                        print(
                            f"[{result.started - began:6.1f} s] {result.rate:6.0f} req/s "
                            f"p99 {result.p99_us / 1000:6.1f} ms  "
                            f"not 2xx {result.non_2xx + result.socket_errors}{lost}{mark}",
                            flush=True,
                        )
                finally:
                    stop.set()
                    for helper in helpers:
                        helper.join(30)
                workers_after = sorted(server.worker_pids())
            finally:
                server.stop()

    report = analyse(
        began, windows, probes, samples, outages, workers_before, workers_after, args.max_growth
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "began": began,
                    "workers": {"before": workers_before, "after": workers_after},
                    "outages": [asdict(outage) for outage in outages],
                    "windows": [asdict(w) for w in windows],
                    "probes": [asdict(p) for p in probes],
                    "rss": samples.rss,
                    "report": report,
                },
                indent=1,
            )
        )
    return 0 if report["ok"] else 1


def analyse(
    began: float,
    windows: list[WrkResult],
    probes: list[Probe],
    samples: Samples,
    outages: list[Outage],
    workers_before: list[int],
    workers_after: list[int],
    max_growth: float,
) -> dict[str, object]:
    """Print the soak's verdict; return it."""

    def during(outage: Outage, w: WrkResult) -> bool:
        return w.started <= outage.started + GRACE and w.ended >= outage.stopping

    inside = [w for w in windows if any(during(o, w) for o in outages)]
    outside = [w for w in windows if w not in inside]
    requests = sum(w.requests for w in windows)
    errors_outside = sum(w.failures for w in outside)
    errors_inside = sum(w.failures for w in inside)
    lost_outside = sum(w.anonymous for w in outside)
    lost_inside = sum(w.anonymous for w in inside)

    print("\n== requests")
    rate = requests / (windows[-1].ended - began)
    print(f"{len(windows)} windows, {requests:,} requests, {rate:,.0f} req/s")
    print(f"not 2xx inside the outage windows: {errors_inside:,}; outside: {errors_outside}")
    if lost_inside or lost_outside:
        print(
            f"of which sessions lost (a 2xx saying user=None): inside {lost_inside:,}; "
            f"outside {lost_outside:,}"
        )
    print("\n== outages (times from the start of the measured run)")
    reports = []
    ends = [o.stopping for o in outages[1:]] + [float("inf")]
    for number, (outage, until) in enumerate(zip(outages, ends, strict=True), 1):
        reports.append(_outage_report(number, outage, until, probes, began))
    restarted = workers_before != workers_after
    print(f"workers: {workers_before} -> {workers_after}{' RESTARTED' if restarted else ''}")

    print("\n== memory (RSS, MiB, mean over a minute; steady load between the outages)")
    memory = memory_report(samples, began, outages, workers_before)
    workers = [m for m in memory.values() if m.worker]
    steady = sum(m.steady_growth for m in workers)
    steps = [sum(m.outage_steps[i] for m in workers) for i in range(len(outages))]
    total_growth = sum(m.stretches[-1][1] - m.stretches[0][0] for m in workers)
    print(
        f"workers together: {total_growth:+.2f} MiB from the first minute to the last, of "
        f"which {sum(steps):+.2f} MiB across the outages "
        f"({', '.join(f'{step:+.2f}' for step in steps)}) and {steady:+.2f} MiB under steady load"
    )

    ok = errors_outside == 0 and not restarted and steady <= max_growth
    print(
        f"\nverdict: {'PASS' if ok else 'FAIL'} (errors outside the outages: {errors_outside}, "
        f"worker restarts: {'yes' if restarted else 'no'}, growth under steady load "
        f"{steady:+.2f} MiB <= {max_growth:g} MiB)"
    )
    return {
        "ok": ok,
        "requests": requests,
        "errors_inside": errors_inside,
        "errors_outside": errors_outside,
        "outages": reports,
        "restarted": restarted,
        "memory": {
            pid: {**asdict(m), "steady_growth": m.steady_growth, "outage_steps": m.outage_steps}
            for pid, m in memory.items()
        },
        "steady_growth_workers_mib": steady,
        "outage_steps_workers_mib": steps,
    }


def _outage_report(
    number: int, outage: Outage, until: float, probes: list[Probe], began: float
) -> dict[str, object]:
    """Print and return what the probe saw of one outage: its failures from the store's
    stop until ``until`` (the next outage), and how soon it succeeded again.  A probe
    belongs to the outage during which it was answered: one sent just before the next
    outage's stop and failed by it is that outage's."""
    failed = [p for p in probes if p.status != 200 and outage.stopping <= p.at + p.seconds < until]
    print(
        f"{number}. store stopping at {outage.stopping - began:.1f} s, "
        f"down at {outage.stopped - began:.1f} s, "
        f"starting at {outage.starting - began:.1f} s, back at {outage.started - began:.1f} s"
    )
    if failed:
        print(
            f"   probe failures: {len(failed)}, first at {failed[0].at - began:.1f} s, last at "
            f"{failed[-1].at - began:.1f} s ({failed[-1].at - outage.started:+.2f} s after the "
            f"store was back); slowest failed probe "
            f"{max(p.seconds for p in failed) * 1000:.0f} ms"
        )
    late = [p for p in failed if p.at >= outage.started]
    if late:
        statuses = sorted({p.status for p in late})
        print(
            f"   probe failures after the store was back: {len(late)} (statuses {statuses}, "
            f"at {', '.join(f'{p.at - began:.1f}' for p in late[:10])} s)"
        )
    back = [p for p in probes if outage.started <= p.at < until and p.status == 200]
    recovery = (back[0].at - outage.started) if back else None
    if recovery is not None:
        print(f"   recovery: first successful probe {recovery:.2f} s after the store was back")
    return {
        "probe_failures": len(failed),
        "probe_failures_after_back": len(late),
        "first_failure": failed[0].at - began if failed else None,
        "last_failure_after_back": failed[-1].at - outage.started if failed else None,
        "recovery": recovery,
    }


def memory_report(
    samples: Samples, began: float, outages: list[Outage], workers: list[int]
) -> dict[str, Memory]:
    """Per process: mean RSS (MiB) over the first minute, the minutes before and after
    each outage (once recovered), and the last minute; print and return them.

    Growth "under steady load" is the sum over the stretches between outages (and
    before the first, after the last) of their last minute less their first: what a
    leak would show.  The step across each outage is reported apart (error paths
    allocate, and the allocator keeps what it got): a step that comes back at every
    outage would be a leak of the error path.
    """

    def mean(pid: int, start: float, end: float) -> float:
        values = [rss[pid] for at, rss in samples.rss if start <= at <= end and pid in rss]
        return statistics.fmean(values) / 1024 if values else float("nan")

    end = samples.rss[-1][0] if samples.rss else began
    out: dict[str, Memory] = {}
    for pid in sorted(samples.rss[0][1]) if samples.rss else []:
        # Each stretch of steady load: (its first minute's mean, its last minute's).
        starts = [began] + [o.started + GRACE for o in outages]
        stops = [o.stopping for o in outages] + [end]
        stretches = [
            (mean(pid, a, a + 60), mean(pid, b - 60, b)) for a, b in zip(starts, stops, strict=True)
        ]
        memory = out[str(pid)] = Memory(pid in workers, stretches)
        print(
            f"{'worker' if memory.worker else 'master'} {pid}: "
            f"{' | '.join(f'{first:.2f} -> {last:.2f}' for first, last in stretches)} "
            f"(steady {memory.steady_growth:+.2f}, outage steps "
            f"{', '.join(f'{x:+.2f}' for x in memory.outage_steps)})"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
