"""Redis server-assisted client-side caching (``CLOAKROOM_REDIS_CLIENT_CACHE``): its cost,
its staleness window, and its correctness under load.

A read-only request costs Cloakroom one Redis ``GET``.  With the cache, each worker
keeps the records it read, and Redis tells it when one changes (``CLIENT TRACKING``
on record keys; see ``flask_cloakroom/stores/redis_cache.py`` and docs/redis.md):
before a cached record is served, every invalidation that has reached the worker is
applied, so a record is never served after its invalidation has arrived.

    python benchmarks/client_cache.py --quick     # ~30 s
    python benchmarks/client_cache.py             # ~2 minutes

It proves correctness under load and measures the staleness window:

1. **In process** (precise timing): a reader process runs the bench app (Cloakroom
   on Redis with the cache) in a tight loop on one session while the parent
   revokes that session with a ``DEL`` from another client.  For every trial it
   reports how long after the ``DEL`` was acknowledged the reader could still start
   a request that saw the session (the staleness window), and checks that a request
   started 1 ms after the acknowledgement never does.
2. **Through gunicorn under wrk load**: sessions are revoked (``DEL``) or changed
   (a write through another app instance) while wrk keeps the worker busy with
   cached reads of other sessions; the next request after the acknowledgement must
   see the revocation or the change, every time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
from _apps import (
    _LUA,
    RESULTS,
    SECRET,
    USER_AGENT,
    AppSpec,
    Browser,
    Servers,
    create_app,
    find_gunicorn,
    find_wrk,
    http_request,
    log_in,
    quantile,
    start_gunicorn,
    timestamp,
    token,
    wait_ready,
)

from flask_cloakroom.stores.redis import RedisStore
from flask_cloakroom.tokens import CookieSigner, store_key


def record_key(admin: redis.Redis, prefix: str, cookie: str) -> str:
    """The Redis key of the session a cookie names."""
    unsigned = CookieSigner([SECRET]).unsign(cookie)
    if unsigned is None:
        raise ValueError("not a cookie of the bench app")
    return RedisStore(admin, prefix=prefix).record_name(store_key(unsigned.session_id))


# -- 1. in process: the staleness window ------------------------------------------------


def _reader(url: str, prefix: str, pipe: Connection) -> None:
    """The reading side: for each cookie it gets, read until the session is gone."""
    app = create_app(
        AppSpec("cloakroom", url, encrypted=True, prefix=prefix, client_cache=True),
    )
    browser = Browser(app)
    while True:
        cookie = pipe.recv()
        if cookie is None:
            return
        browser.cookie = cookie
        browser.request("GET", "/read")  # a miss: now cached
        browser.request("GET", "/read")
        pipe.send("ready")
        log: list[tuple[float, bool]] = []
        deadline = time.monotonic() + 0.5
        fresh_after = 0
        while time.monotonic() < deadline and fresh_after < 20:
            started = time.monotonic()
            body = browser.request("GET", "/read")
            stale = "user=None" not in body
            log.append((started, stale))
            if not stale:
                fresh_after += 1
        pipe.send(log)


def staleness(url: str, trials: int) -> dict[str, Any]:
    """Revoke a cached session ``trials`` times while a reader hammers it."""
    prefix = f"cloakroom-cache:{token()}:"
    writer_app = create_app(AppSpec("cloakroom", url, encrypted=True, prefix=prefix))
    admin = redis.Redis.from_url(url)
    parent, child = multiprocessing.Pipe()
    reader = multiprocessing.get_context("fork").Process(
        target=_reader, args=(url, prefix, child), daemon=True
    )
    reader.start()
    windows: list[float] = []  # last stale start - ack, µs (0 if none after the ack)
    first_fresh: list[float] = []  # first read that saw the revocation: its start - ack, µs
    stale_late = 0  # stale reads started more than 1 ms after the ack
    stale_after_ack = 0
    reads = 0
    gets_before = admin.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    try:
        for trial in range(trials):
            browser = Browser(writer_app)
            browser.login(f"trial{trial}")
            key = record_key(admin, prefix, browser.cookie)
            parent.send(browser.cookie)
            if parent.recv() != "ready":
                raise RuntimeError("the reader did not get ready")
            time.sleep(0.002 + (trial % 7) * 0.0003)  # revoke mid-stream
            admin.delete(key)
            acked = time.monotonic()
            log: list[tuple[float, bool]] = parent.recv()
            reads += len(log)
            late = [started - acked for started, stale in log if stale and started > acked]
            stale_after_ack += len(late)
            stale_late += sum(1 for d in late if d > 0.001)
            windows.append(max(late, default=0.0) * 1e6)
            fresh = [started - acked for started, stale in log if not stale]
            if fresh:
                first_fresh.append(fresh[0] * 1e6)
    finally:
        parent.send(None)
        reader.join(5)
    gets = admin.info("commandstats").get("cmdstat_get", {}).get("calls", 0) - gets_before
    admin.close()
    return {
        "trials": trials,
        "reads": reads,
        "server_gets_per_read": gets / max(1, reads + 2 * trials),
        "stale_reads_started_after_ack": stale_after_ack,
        "stale_reads_started_1ms_after_ack": stale_late,
        "window_us": {
            "p50": quantile(windows, 0.5),
            "p99": quantile(windows, 0.99),
            "max": max(windows, default=0.0),
            "mean": statistics.fmean(windows) if windows else 0.0,
        },
        "first_fresh_read_started_us_after_ack": {
            "min": min(first_fresh, default=0.0),
            "p50": quantile(first_fresh, 0.5),
            "max": max(first_fresh, default=0.0),
        },
    }


# -- 2. through gunicorn, under load ------------------------------------------------------


def under_load(url: str, trials: int, seconds: float, scratch: Path) -> dict[str, Any]:
    """Revocations and changes from outside while wrk keeps the cached worker busy."""
    prefix = f"cloakroom-cache:{token()}:"
    spec = AppSpec("cloakroom", url, encrypted=True, prefix=prefix, client_cache=True)
    server = start_gunicorn(spec, workers=1, scratch=scratch, program=find_gunicorn())
    other = create_app(AppSpec("cloakroom", url, encrypted=True, prefix=prefix))
    admin = redis.Redis.from_url(url)
    result: dict[str, Any] = {"trials": trials}
    try:
        wait_ready(server)
        load_cookies = log_in(server.port, [f"load{i}" for i in range(8)])
        cookie_file = scratch / "cache-cookies.txt"
        cookie_file.write_text("\n".join(load_cookies) + "\n")
        script = scratch / "cache.lua"
        script.write_text(_LUA)
        wrk = subprocess.Popen(
            [
                find_wrk(), "-t1", "-c8", f"-d{max(2, round(seconds))}s", "-s", str(script),
                f"http://127.0.0.1:{server.port}", "--", str(cookie_file), "GET", "/read",
                USER_AGENT,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        revoked_seen = changed_seen = 0
        revoke_delays: list[float] = []
        deadline = time.monotonic() + seconds
        done = 0
        while done < trials and time.monotonic() < deadline:
            name = f"victim{done}"
            (cookie,) = log_in(server.port, [name])
            for _ in range(3):  # cached by now
                http_request(server.port, "GET", "/read", cookie)
            # A change made elsewhere (another worker, another app instance).
            browser = Browser(other)
            browser.cookie = cookie
            browser.request("POST", "/write")
            _, body, _ = http_request(server.port, "GET", "/read", cookie)
            changed_seen += "n=1" in body
            # A revocation made elsewhere.
            admin.delete(record_key(admin, prefix, cookie))
            acked = time.monotonic()
            _, body, _ = http_request(server.port, "GET", "/read", cookie)
            revoke_delays.append((time.monotonic() - acked) * 1e3)
            revoked_seen += "user=None" in body
            done += 1
        out, _ = wrk.communicate(timeout=seconds + 30)
        line = next((ln for ln in out.splitlines() if ln.startswith("CLOAKROOM-PERF ")), "{}")
        load = json.loads(line.removeprefix("CLOAKROOM-PERF ")) if line != "{}" else {}
        result.update(
            trials=done,
            changes_seen_at_once=changed_seen,
            revocations_seen_at_once=revoked_seen,
            next_request_after_revocation_ms_p50=quantile(revoke_delays, 0.5),
            background_load={
                "requests": load.get("requests"),
                "per_second": (load.get("requests", 0) / (load.get("duration_us", 1) / 1e6)),
                "non2xx": load.get("non2xx"),
                "lost_sessions": load.get("anonymous"),
            },
        )
    finally:
        server.stop()
        admin.close()
    return result


# -- cost per request -------------------------------------------------------------------


def cost(url: str, requests: int) -> dict[str, float]:
    """In process: µs per read-only request with and without the cache, interleaved."""
    browsers = {}
    for cached in (False, True):
        spec = AppSpec(
            "cloakroom",
            url,
            encrypted=True,
            prefix=f"cloakroom-cost:{token()}:",
            client_cache=cached,
        )
        browser = Browser(create_app(spec))
        browser.login()
        browsers["cache" if cached else "no cache"] = browser
    times: dict[str, list[float]] = {name: [] for name in browsers}
    for _ in range(9):
        for name, browser in browsers.items():
            started = time.perf_counter()
            for _ in range(requests):
                browser.request("GET", "/read")
            times[name].append((time.perf_counter() - started) / requests * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--redis-url", help="a Redis to use (default: a throwaway one)")
    args = parser.parse_args()
    trials = 40 if args.quick else args.trials
    servers = None
    url = args.redis_url
    if not url:
        servers = Servers({"redis"})
        url = servers.redis.url
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="cloakroom-cache-") as tmp:
            print(f"Redis {redis.Redis.from_url(url).info('server')['redis_version']}, redis-py")
            costs = cost(url, 300 if args.quick else 1000)
            print(
                "in process, read-only request: "
                + ", ".join(f"{k} {v:.1f} µs" for k, v in costs.items())
            )
            window = staleness(url, trials)
            print(f"staleness (in process, {trials} revocations): {json.dumps(window, indent=2)}")
            loaded = under_load(url, trials, 10 if args.quick else 60, Path(tmp))
            print(f"through gunicorn under wrk load: {json.dumps(loaded, indent=2)}")
    finally:
        if servers is not None:
            servers.close()
    record = {"when": timestamp(), "cost_us": costs, "staleness": window, "under_load": loaded}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"client-cache-{record['when']}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"results: {out}")
    failed = (
        window["stale_reads_started_1ms_after_ack"]
        or loaded["revocations_seen_at_once"] != loaded["trials"]
        or loaded["changes_seen_at_once"] != loaded["trials"]
    )
    if failed:
        print("FAILED: a revoked or changed session was served from the cache")
        sys.exit(1)


if __name__ == "__main__":
    main()
