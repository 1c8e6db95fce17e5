"""The session layer's own work counted in CPU instructions: the same on a noisy machine.

Times drift with the machine (shared cores, frequency, a neighbour's load); the
number of instructions a request executes does not.  This runs the in-process apps of
``benchmarks/layer.py`` (the floor, Flask's cookie session, Cloakroom on the memory
store with and without encryption and activity, on SQLite) under valgrind's callgrind,
which counts every user-space instruction, and prints per request:

* the instructions of the whole request (Flask, routing, the view, the session layer);
* ``+layer``: those above the floor (a session interface that loads and saves nothing);
* that ``+layer`` over Flask's cookie session's.

Each figure is the difference of two runs of one process (``--requests`` more
requests in the second), so start-up and warm-up cancel out; ``PYTHONHASHSEED`` is
fixed, so a run repeats to a fraction of a percent.  Use it to compare two commits
on any machine (run it in each tree): a change that saves work shows here even when
wall-clock benchmarks cannot see it through the noise.  SQLite's figure counts the
instructions of its I/O calls in user space, not the time they wait.

    python benchmarks/instructions.py                 # about 8 minutes on 2 cores
    python benchmarks/instructions.py --requests 100  # quicker, a little less exact

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _apps import machine, save_results, timestamp, versions

#: The variants, by their names in benchmarks/layer.py.
VARIANTS = (
    "floor (no session layer)",
    "flask cookie session",
    "cloakroom memory",
    "cloakroom memory + encryption",
    "cloakroom memory + encryption, activity off",
    "cloakroom sqlite + encryption",
)
FLOOR, COOKIE = VARIANTS[0], VARIANTS[1]
#: Requests before counting starts in both runs (caches filled, lazy imports done).
WARM_UP = 200
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _child(name: str, path: str, requests: int) -> None:
    """``--child``: warm up, then make ``requests`` requests (what callgrind counts)."""
    from layer import SCENARIOS, in_process_variants

    method = next(m for scenario, m, p in SCENARIOS if p == path)
    with tempfile.TemporaryDirectory(prefix="cloakroom-instructions-") as tmp:
        (variant,) = in_process_variants(tmp, only=name)
        request = variant.browser.request
        for _ in range(WARM_UP + requests):
            request(method, path)


def _instructions(valgrind: str, name: str, path: str, requests: int) -> int:
    argv = [
        valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, str(Path(__file__).resolve()), "--child", name, path, str(requests),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind failed for {name} {path}:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def per_request(valgrind: str, name: str, path: str, requests: int) -> float:
    """Instructions per request of ``name`` on ``path``: two runs, differenced."""
    few = _instructions(valgrind, name, path, 0)
    many = _instructions(valgrind, name, path, requests)
    return (many - few) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="counted per run")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, path, count = args.child
        _child(name, path, int(count))
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind is not installed (apt-get install valgrind): nothing counted")

    jobs = [(name, path) for name in VARIANTS for path in ("/read", "/write")]
    print(
        f"{len(jobs)} counts of {args.requests} requests each under callgrind, "
        f"{os.cpu_count()} at a time..."
    )
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {job: pool.submit(per_request, valgrind, *job, args.requests) for job in jobs}
        counts = {job: future.result() for job, future in futures.items()}

    print(f"\ninstructions per request ({machine()['python']}, PYTHONHASHSEED=0)")
    print(f"{'':46s} {'read':>10s} {'+layer':>9s} {'/cookie':>8s}   "
          f"{'write':>10s} {'+layer':>9s} {'/cookie':>8s}")  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for name in VARIANTS:
        row: dict[str, float] = {}
        cells = []
        for scenario, path in (("read", "/read"), ("write", "/write")):
            total = counts[name, path]
            layer = total - counts[FLOOR, path]
            cookie = counts[COOKIE, path] - counts[FLOOR, path]
            row[scenario] = total
            row[f"{scenario}_layer"] = layer
            if name == FLOOR:
                cells.append(f"{total:10,.0f} {'-':>9s} {'-':>8s}")
            else:
                row[f"{scenario}_over_cookie"] = layer / cookie
                cells.append(f"{total:10,.0f} {layer:9,.0f} {layer / cookie:8.2f}")
        table[name] = row
        print(f"{name:46s} " + "   ".join(cells))
    print(
        "\n+layer: instructions above the floor (Flask, routing and the views with a "
        "session layer that does nothing).\n/cookie: that, over Flask's cookie session's."
    )
    result = {
        "when": timestamp(),
        "machine": machine(),
        "versions": versions(),
        "requests": args.requests,
        "warm_up": WARM_UP,
        "instructions": table,
    }
    print(f"results: {save_results(result, args.json, 'instructions')}")


if __name__ == "__main__":
    main()
