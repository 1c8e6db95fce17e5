"""The session layer's own CPU, in process: what Cloakroom adds to a request, store I/O aside.

Calls the bench app's WSGI callable directly (no server, no network) for:

* the floor: a session interface that loads and saves nothing, with the same data
  (``_apps.StaticSessionInterface``): Flask, routing and the views alone;
* Flask's own cookie session;
* Cloakroom on the memory store (a dict lookup: no I/O), with and without
  encryption and activity tracking; and, for reference, on SQLite and Redis.

Variants run interleaved in rounds; each figure is the median over rounds, and the
layer's own CPU is the Cloakroom figure minus the floor's, per round, medianed.

``--profile`` also profiles the read and write paths with py-spy (memory, SQLite and,
with ``--redis-url``, Redis stores), and times each step of Cloakroom's read and write
paths on its own, to show where the time goes.

    python benchmarks/layer.py --quick        # ~20 s
    python benchmarks/layer.py --profile      # ~2 min, profiles in benchmarks/results/

Redis runs on a throwaway server (``--redis-url`` names another, ``--no-redis`` skips it).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _apps import (
    RESULTS,
    AppSpec,
    Browser,
    Servers,
    create_app,
    machine,
    save_results,
    timestamp,
    versions,
)
from flask import Flask

SCENARIOS = (("read", "GET", "/read"), ("write", "POST", "/write"))


@dataclass
class InProcess:
    """One app measured in process."""

    name: str
    spec: AppSpec
    browser: Browser
    times: dict[str, list[float]] = field(default_factory=lambda: {"read": [], "write": []})
    #: The floor's time measured right before or after each of this variant's.
    floor_times: dict[str, list[float]] = field(default_factory=lambda: {"read": [], "write": []})

    def median_us(self, scenario: str) -> float:
        return statistics.median(self.times[scenario]) * 1e6


def in_process_variants(
    tmp: str, redis_url: str | None = None, *, only: str | None = None
) -> list[InProcess]:
    """The apps of the layer measurement, logged in (``only``: just the one so named)."""
    specs = [
        ("floor (no session layer)", AppSpec("none")),
        ("flask cookie session", AppSpec("cookie")),
        ("cloakroom memory", AppSpec("cloakroom", "memory://")),
        ("cloakroom memory + encryption", AppSpec("cloakroom", "memory://", encrypted=True)),
        (
            "cloakroom memory + encryption, no decoded cache",
            AppSpec("cloakroom", "memory://", encrypted=True, decoded_cache=False),
        ),
        ("cloakroom memory, activity off", AppSpec("cloakroom", "memory://", activity=False)),
        (
            "cloakroom memory + encryption, activity off",
            AppSpec("cloakroom", "memory://", encrypted=True, activity=False),
        ),
        (
            "cloakroom sqlite + encryption",
            AppSpec("cloakroom", f"sqlite:///{tmp}/layer.db", encrypted=True),
        ),
    ]
    if redis_url:
        specs.append(
            (
                "cloakroom redis + encryption",
                AppSpec("cloakroom", redis_url, encrypted=True, prefix="perf-layer:"),
            )
        )
    out = []
    for name, spec in specs:
        if only is not None and name != only:
            continue
        browser = Browser(create_app(spec))
        browser.login()
        out.append(InProcess(name, spec, browser))
    return out


def _time(v: InProcess, method: str, path: str, per_round: int) -> float:
    request = v.browser.request
    gc.collect()
    started = time.perf_counter()
    for _ in range(per_round):
        request(method, path)
    return (time.perf_counter() - started) / per_round


def measure(variants: list[InProcess], *, rounds: int, per_round: int) -> None:
    """Time ``per_round`` requests of each scenario, ``rounds`` times, variants
    interleaved, each paired with a run of the floor right before or after it."""
    floor = next(v for v in variants if v.spec.layer == "none")
    for v in variants:  # warm caches, pools, compiled statements, scripts
        for _ in range(100):
            v.browser.request("GET", "/read")
            v.browser.request("POST", "/write")
    for index in range(rounds):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        for v in order:
            for scenario, method, path in SCENARIOS:
                if v is floor:
                    v.times[scenario].append(_time(v, method, path, per_round))
                    continue
                if index % 2:
                    mine = _time(v, method, path, per_round)
                    base = _time(floor, method, path, per_round)
                else:
                    base = _time(floor, method, path, per_round)
                    mine = _time(v, method, path, per_round)
                v.times[scenario].append(mine)
                v.floor_times[scenario].append(base)


def layer_cpu(variants: list[InProcess]) -> dict[str, dict[str, float]]:
    """Each variant's time minus the floor's (median of the paired differences), in µs:
    for the memory store, the session layer's own CPU; for the others, with their I/O."""
    out: dict[str, dict[str, float]] = {}
    for v in variants:
        if v.spec.layer == "none":
            continue
        out[v.name] = {
            scenario: statistics.median(
                mine - base
                for mine, base in zip(v.times[scenario], v.floor_times[scenario], strict=True)
            )
            * 1e6
            for scenario, _, _ in SCENARIOS
        }
    return out


def report(variants: list[InProcess], cpu: dict[str, dict[str, float]]) -> None:
    floor = variants[0]
    print(f"{'in process (WSGI called directly)':44} {'read µs':>8} {'+layer':>7}", end="")
    print(f" {'write µs':>9} {'+layer':>7}")
    for v in variants:
        cells = []
        for scenario, _, _ in SCENARIOS:
            mine = v.median_us(scenario)
            extra = cpu.get(v.name, {}).get(scenario)
            shown = "-" if v is floor or extra is None else f"{extra:.1f}"
            cells.append(f"{mine:8.1f} {shown:>7}")
        print(f"{v.name:44} {cells[0]}  {cells[1]}")
    print(
        "+layer: the time above the floor (Flask, routing and the views with a session\n"
        "layer that does nothing), median of paired differences; for stores with I/O it\n"
        "includes the round trips."
    )


# -- where the time goes ----------------------------------------------------------------


def _timeit(work: Callable[[], Any], number: int) -> float:
    """Best-of-5 time of one call of ``work``, in µs."""
    return min(timeit.repeat(work, number=number, repeat=5)) / number * 1e6


def components(app: Flask, browser: Browser, *, number: int = 5000) -> dict[str, float]:
    """Time each step of Cloakroom's read and write paths on its own (µs per call).

    Uses the manager's parts the way the session interface does; a guide to where
    the microseconds go, not an exact decomposition (steps share caches).
    """
    from flask_cloakroom import Cloakroom
    from flask_cloakroom.activity import Client
    from flask_cloakroom.codec import _decode_payload, _dumps, _encode_payload
    from flask_cloakroom.interface import (
        CloakroomSessionInterface,
        _vary_on_cookie,
        cookie_values,
    )
    from flask_cloakroom.manager import _aad as record_aad
    from flask_cloakroom.session import Meta, ServerSession
    from flask_cloakroom.tokens import store_key

    manager = app.extensions["cloakroom"]
    interface: CloakroomSessionInterface = app.session_interface  # type: ignore[assignment]
    header = f"session={browser.cookie}"
    environ = {
        "HTTP_COOKIE": header,
        "HTTP_USER_AGENT": browser.user_agent,
        "REMOTE_ADDR": "127.0.0.1",
    }
    out: dict[str, float] = {}
    cloak = Cloakroom()
    with app.test_request_context("/read", environ_base=environ):
        from flask import request as proxy

        request = proxy._get_current_object()  # type: ignore[attr-defined]
        now = manager.now()
        cookie = cookie_values(header, "session")[0]
        unsigned = manager.signer.unsign(cookie)
        assert unsigned is not None
        key = store_key(unsigned.session_id)
        record = manager.store.load(key)
        assert record is not None
        aad = record_aad(key, record.user_id)  # what the manager binds: key and user id
        decoded = manager.codec.decode(record.payload, aad, user_id=record.user_id)
        keyring = manager.codec.keyring
        plain = record.payload if keyring is None else keyring.open(record.payload, aad).plaintext
        client = interface.client(request)
        loaded = manager.load(key, now)
        assert loaded is not None
        response = app.response_class("x")
        meta = decoded.meta

        def first_unsign() -> Any:
            manager.signer._verified.clear()  # forget it: the full check
            return manager.signer.unsign(cookie)

        steps: list[tuple[str, Callable[[], Any]]] = [
            ("read: cookie_values (find the cookie)", lambda: cookie_values(header, "session")),
            ("read: interface.client (IP, User-Agent)", lambda: interface.client(request)),
            ("read:   Client(ip, agent)", lambda: Client("127.0.0.1", browser.user_agent)),
            ("read: signer.unsign (a cookie seen before)", lambda: manager.signer.unsign(cookie)),
            ("read: signer.unsign (HMAC-SHA256, base64: a new cookie)", first_unsign),
            ("read: store_key (SHA-256)", lambda: store_key(unsigned.session_id)),
            ("read: store.load (memory: dict lookup)", lambda: manager.store.load(key)),
            (
                "read: codec.decode (a payload it decoded before)",
                lambda: manager.codec.decode(record.payload, aad, user_id=record.user_id),
            ),
            (
                "read: codec.decode (a new payload: decrypt, parse, check)",
                lambda: manager.codec._decode(record.payload, aad, record.user_id),
            ),
            ("read:   json.loads of the payload", lambda: json.loads(plain)),
            (
                "read:   the codec's parse of the payload (the C scanner alone)",
                lambda: _decode_payload(plain.decode("utf-8")),
            ),
            (
                "read:   Meta(...) positionally (as decoding builds it)",
                lambda: Meta(
                    meta.created_at,
                    meta.last_seen_at,
                    meta.auth_at,
                    meta.user_id,
                    meta.remember,
                    meta.ip,
                    meta.user_agent,
                    meta.login_ip,
                    meta.device,
                    meta.location,
                    meta.extra,
                ),
            ),
            (
                "read:   Meta(...) by keyword (11 fields)",
                lambda: Meta(
                    created_at=meta.created_at,
                    last_seen_at=meta.last_seen_at,
                    auth_at=meta.auth_at,
                    user_id=meta.user_id,
                    remember=meta.remember,
                    ip=meta.ip,
                    user_agent=meta.user_agent,
                    login_ip=meta.login_ip,
                    device=meta.device,
                    location=meta.location,
                    extra=meta.extra,
                ),
            ),
            ("read: policy.expired", lambda: manager.policy.expired(decoded.meta, now)),
            ("read: codec.untag", lambda: manager.codec.untag(decoded.raw)),
            (
                "read: ServerSession(...) construction",
                lambda: ServerSession({}, key=key, version=1, meta=decoded.meta, raw=decoded.raw),
            ),
            ("read: manager.load (load+decode+check+build)", lambda: manager.load(key, now)),
            ("read: manager.watch (same client)", lambda: manager.watch.check(loaded, now, client)),
            ("read: manager.open (unsign+load+watch)", lambda: manager.open([cookie], now, client)),
            (
                "read: interface.open_session (all of it)",
                lambda: interface.open_session(app, request),
            ),
            ("read: manager.save (nothing to write)", lambda: manager.save(loaded, now, client)),
            ("read: _vary_on_cookie", lambda: _vary_on_cookie(response)),
            (
                "read: interface.save_session (all of it)",
                lambda: interface.save_session(app, loaded, response),
            ),
        ]
        if keyring is not None:
            steps.append(
                ("read: keyring.open (AES-256-GCM)", lambda: keyring.open(record.payload, aad))
            )
        tagged = manager.codec.tag(loaded)
        steps += [
            ("write: codec.tag", lambda: manager.codec.tag(loaded)),
            (
                "write: codec.encode (JSON + seal)",
                lambda: manager.codec.encode(meta, tagged, aad, user_id=meta.user_id),
            ),
            (
                "write: manager._record (encode + Record)",
                lambda: manager._record(key, meta, tagged, 9),
            ),
        ]
        doc = _decode_payload(plain.decode("utf-8"))
        steps += [
            ("write:   the payload's JSON (the codec's encoder)", lambda: _encode_payload(doc)),
            ("write:   the payload's JSON (json.JSONEncoder.encode)", lambda: _dumps(doc)),
        ]
        if keyring is not None:
            steps.append(("write: keyring.seal (AES-256-GCM)", lambda: keyring.seal(plain, aad)))
        for name, work in steps:
            out[name] = _timeit(work, number)
    # In a view: what the app's own calls cost (flask.session is a proxy).
    with app.test_request_context("/read", environ_base=environ):
        app.preprocess_request()
        from flask import session

        session.get("cart")  # opens the session
        out["view: cloak.user_id"] = _timeit(lambda: cloak.user_id, number)
        out["view: session.get(key) (through flask.session)"] = _timeit(
            lambda: session.get("cart"), number
        )
    return out


def _loop(browser: Browser, seconds: float, scenario: str) -> tuple[int, float]:
    """Requests of one scenario for ``seconds``: what the profiler samples."""
    request = browser.request
    method, path = next((m, p) for s, m, p in SCENARIOS if s == scenario)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(100):
            request(method, path)
        count += 100
        if time.perf_counter() >= deadline:
            return count, time.perf_counter() - started


def _child(name: str, scenario: str, seconds: float, redis_url: str | None) -> None:
    """``--loop``: one variant's loop of one scenario under py-spy; prints requests
    and seconds."""
    with tempfile.TemporaryDirectory(prefix="cloakroom-layer-") as tmp:
        (variant,) = in_process_variants(tmp, redis_url, only=name)
        for _ in range(300):
            variant.browser.request("GET", "/read")
            variant.browser.request("POST", "/write")
        count, spent = _loop(variant.browser, seconds, scenario)
        print(f"LOOP {count} {spent}")


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame ``function (file:line)``."""
    function, _, where = text.rpartition(" (")
    return function, where.rsplit(":", 1)[0]


def _short(function: str, path: str) -> str:
    if "/flask_cloakroom/" in path:
        module = path.split("/flask_cloakroom/", 1)[1].removesuffix(".py").replace("/", ".")
        return f"{module}.{function}"
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                tail = tail.split("/", 1)[1] if "/" in tail else tail
            return f"{tail.removesuffix('.py').replace('/', '.')}.{function}"
    return f"{Path(path).stem}.{function}"


def profile(
    names: list[str], *, seconds: float, redis_url: str | None, folder: Path
) -> dict[str, Any]:
    """py-spy on the read and write loops of each variant in ``names``.

    py-spy stops the process for each sample (about a fifth more wall time per
    request at 1,000 samples a second, spread evenly, so the shares stay right).
    Not ``--nonblocking``: reading a running interpreter's frames tears the stacks
    of code this fast (on Python 3.11 it gave ``open_session`` a seventh of its
    share, and ``save_session`` none).

    Returns, per variant and scenario, µs per request: inclusive time of each
    flask_cloakroom function, and the time of what flask_cloakroom calls outside
    itself (JSON, HMAC, AES, the store's client), attributed to the callee.
    """
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        print("py-spy is not installed beside this Python (pip install py-spy): no profile")
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name, (scenario, _, _) in itertools.product(names, SCENARIOS):
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        raw = folder / f"{scenario}-{slug}.collapsed.txt"
        argv = [
            str(spy), "record", "--rate", "1000", "--idle",
            "--full-filenames", "--format", "raw", "--output", str(raw), "--",
            sys.executable, str(Path(__file__).resolve()), "--loop", name,
            "--scenario", scenario, "--seconds", str(seconds),
        ]  # fmt: skip
        if redis_url:
            argv += ["--redis-url", redis_url]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        loop_line = [line for line in done.stdout.splitlines() if line.startswith("LOOP ")]
        if done.returncode != 0 or not loop_line or not raw.exists():
            print(f"py-spy failed for {name}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            continue
        _, count, spent = loop_line[0].split()
        per_request_us = float(spent) / int(count) * 1e6
        tables = _attribute(raw.read_text(), per_request_us)
        tables["_per_request_us"] = {"wall": per_request_us}
        out.setdefault(name, {})[scenario] = tables
    return out


def _attribute(collapsed: str, per_request_us: float) -> dict[str, dict[str, float]]:
    """Turn py-spy's collapsed stacks of the loop into µs per request."""
    inclusive: dict[str, int] = {}
    callees: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        try:
            start = next(
                i for i, (f, p) in enumerate(frames) if f == "_loop" and p.endswith("layer.py")
            )
        except StopIteration:
            continue
        samples = int(number)
        total += samples
        seen: set[str] = set()
        inside = False
        for function, path in frames[start + 1 :]:
            name = _short(function, path)
            if "/flask_cloakroom/" in path:
                inside = True
                if name not in seen:
                    seen.add(name)
                    inclusive[name] = inclusive.get(name, 0) + samples
            elif inside:
                # The first frame outside flask_cloakroom below one inside it: what
                # Cloakroom spends in libraries (json, hmac, AES, store clients).
                callees[name] = callees.get(name, 0) + samples
                break
    if not total:
        return {"inclusive": {}, "callees": {}}

    def scale(table: dict[str, int]) -> dict[str, float]:
        ordered = sorted(table.items(), key=lambda item: -item[1])
        return {name: samples / total * per_request_us for name, samples in ordered}

    return {"inclusive": scale(inclusive), "callees": scale(callees)}


def run_layer(
    *,
    rounds: int,
    per_round: int,
    redis_url: str | None = None,
    with_profile: bool = False,
    profile_seconds: float = 8.0,
) -> dict[str, Any]:
    """The whole measurement, as a JSON-ready dict (printed as it goes)."""
    with tempfile.TemporaryDirectory(prefix="cloakroom-layer-") as tmp:
        variants = in_process_variants(tmp, redis_url)
        measure(variants, rounds=rounds, per_round=per_round)
        cpu = layer_cpu(variants)
        report(variants, cpu)
        result: dict[str, Any] = {
            "rounds": rounds,
            "per_round": per_round,
            "median_us": {v.name: {s: v.median_us(s) for s, _, _ in SCENARIOS} for v in variants},
            "layer_us": cpu,
        }
        if with_profile:
            folder = RESULTS / f"profile-{timestamp()}"
            names = [v.name for v in variants if v.spec.encrypted and v.spec.activity]
            names = [n for n in names if "cloakroom" in n]
            inside = profile(names, seconds=profile_seconds, redis_url=redis_url, folder=folder)
            result["profile_folder"] = str(folder)
            result["profile_us"] = inside
            for name, scenario, tables in (
                (n, s, t) for n, by_scenario in inside.items() for s, t in by_scenario.items()
            ):
                wall = tables["_per_request_us"]["wall"]
                print(f"\npy-spy, {name}: µs per {scenario} request ({wall:.1f} µs in all)")
                print("  inclusive, inside flask_cloakroom:")
                for function, micros in list(tables["inclusive"].items())[:20]:
                    print(f"    {micros:7.2f}  {function}")
                print("  called by flask_cloakroom, outside it:")
                for function, micros in list(tables["callees"].items())[:10]:
                    print(f"    {micros:7.2f}  {function}")
            memory = next(v for v in variants if v.name == "cloakroom memory + encryption")
            parts = components(memory.browser.app, memory.browser)
            result["components_us"] = parts
            print("\neach step alone (memory store, encryption on), µs per call, best of 5:")
            for name, micros in parts.items():
                print(f"  {micros:7.2f}  {name}")
            print(f"\nprofiles (py-spy collapsed stacks) written to {folder}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument(
        "--redis-url", help="the Redis to measure Cloakroom on (default: a throwaway server)"
    )
    parser.add_argument("--no-redis", action="store_true", help="no Redis variant")
    parser.add_argument("--profile", action="store_true", help="py-spy + step timings")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--loop", help=argparse.SUPPRESS)  # the child py-spy samples
    parser.add_argument("--scenario", default="read", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=8.0, help="of each profile")
    args = parser.parse_args()
    if args.loop:
        _child(args.loop, args.scenario, args.seconds, args.redis_url)
        return
    rounds, per_round = (7, 200) if args.quick else (args.rounds, args.per_round)
    info = machine()
    print(
        f"{info['cpus']} CPUs, {info['cpu']}, Python {info['python']}; "
        f"{rounds} rounds x {per_round} requests per variant and scenario\n"
    )
    servers = None
    url = args.redis_url
    if not url and not args.no_redis:
        servers = Servers({"redis"})
        url = servers.redis.url
    try:
        result = run_layer(
            rounds=rounds,
            per_round=per_round,
            redis_url=url,
            with_profile=args.profile,
            profile_seconds=3.0 if args.quick else args.seconds,
        )
    finally:
        if servers is not None:
            servers.close()
    result["machine"] = info
    result["versions"] = versions()
    print(f"results: {save_results(result, args.json, 'layer')}")


if __name__ == "__main__":
    main()
