"""Cloakroom with a million live sessions, in Redis and in PostgreSQL.

Starts its own throwaway servers (two Redis servers and a durable PostgreSQL, from
the test suite's harness) and measures:

1. **Fill**: ``--sessions`` live sessions (default 1,000,000; four per user, plus one
   user with 50) into Redis and PostgreSQL, and ``--small`` (1,000) into a second
   Redis and a second table.  Records are real: built by the library's own
   ``SessionManager`` (codec, AES-256-GCM encryption, user index), written in batches
   (Redis: pipelines of the store's own write script; PostgreSQL: ``COPY``).  The
   time each fill took is reported.
2. **Per-request cost at 1,000 vs 1,000,000**: in process (the bench app's WSGI
   callable, so only the store's cost changes), read-only and modifying requests on
   sessions picked at random across the whole dataset, the two sizes interleaved in
   rounds, with the process caches (decoded payloads, verified cookies) on and off:
   all 1,000 small sessions fit in them, few of the large sample's 20,000 do, so with
   the caches on the ratio holds that difference too, and with them off the store's
   alone.  Target: within 1.2x.
3. **sessions(user)** for the user with 50 sessions: ``cloak.sessions()`` called
   repeatedly, p50/p99.  Target: p99 <= 2 ms.
4. **Redis memory per session**: ``used_memory`` growth over the fill divided by the
   number of sessions (record, TTL, user index entries), and ``MEMORY USAGE`` of one
   record plus its share of its user's index; for the bench session and for a small
   one (100,000 and ``--sessions`` of them, one and four per user, plain and
   encrypted).  Target: <= 300 bytes for a small session.
5. **Purging expired PostgreSQL rows under load**: ``--sessions`` expired rows are
   added beside the live ones, their expiries spread over a day in the order they
   were stored (``--same-expiry``: all at one moment, the worst case for a purge that
   goes on from the last batch's expiry); gunicorn (1 sync worker) serves a 9:1
   read/write mix under wrk (8 connections) before and while ``purge_expired()``
   deletes them in batches of the store's default size (100, ``--batch-size``),
   resting after each batch twice as long as it took (``--pace``, default the
   library's, 2, as ``flask cloakroom purge``; 0: back to back); p99 latency of
   5-second slices during the purge against the p99 before it.  Target: never over
   2x.  Beside it: each batch's time, the plan and pages of a batch's select now and
   then, the backends holding a snapshot, the table's dead rows and vacuums, and each
   command's CPU per slice.

    /tmp/perf-venv/bin/python benchmarks/scale.py --sessions 20000     # a smoke run, ~1 min
    /tmp/perf-venv/bin/python benchmarks/scale.py                      # the report, ~15 min
    /tmp/perf-venv/bin/python benchmarks/scale.py --purge-only         # step 5 alone, ~3 min
    /tmp/perf-venv/bin/python benchmarks/scale.py --purge-only --pace 0  # without rests
    /tmp/perf-venv/bin/python benchmarks/scale.py --memory-only        # small sessions, ~7 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _apps import (
    RESULTS,
    USER_AGENT,
    AppSpec,
    Browser,
    Servers,
    Wrk,
    WrkResult,
    _cpu_times,
    create_app,
    find_gunicorn,
    find_wrk,
    machine,
    quantile,
    scratch_dir,
    start_gunicorn,
    timestamp,
    versions,
    wait_ready,
)
from flask import Flask

from flask_cloakroom.activity import Client
from flask_cloakroom.manager import SessionManager
from flask_cloakroom.stores.base import PURGE_BATCH_SIZE, PURGE_PACE, Record, paced
from flask_cloakroom.tokens import new_session_id, store_key

#: Long timeouts, so no session dies or gets a touch write during the run.
SCALE_CONFIG = {
    "CLOAKROOM_IDLE_TIMEOUT": 6 * 3600.0,
    "CLOAKROOM_ABSOLUTE_TIMEOUT": 12 * 3600.0,
    "CLOAKROOM_TOUCH_INTERVAL": 3600.0,
}
HEAVY_USER = "heavy-user"
HEAVY_SESSIONS = 50
PER_USER = 4
BATCH = 2000


@dataclass
class Dataset:
    """Sessions written to one store; ``cookies`` of a random sample of them."""

    name: str
    app: Flask
    count: int = 0
    cookies: list[str] = field(default_factory=list)
    fill_seconds: float = 0.0

    @property
    def manager(self) -> SessionManager:
        manager: SessionManager = self.app.extensions["cloakroom"]
        return manager


def records(
    manager: SessionManager,
    count: int,
    *,
    now: float,
    expired: float | None = None,
    small: bool = False,
    sample: int = 0,
    heavy: bool = True,
    per_user: int = PER_USER,
) -> Iterator[tuple[list[Record], list[str]]]:
    """Batches of real records (and the cookies of about ``sample`` of them).

    With ``expired`` (seconds), the records expired an hour ago or up to that much
    longer ago, the first ones first, as sessions that came and went over that time
    (0: all at the same moment).
    ``per_user`` sessions per user; with ``heavy`` the first 50 belong to one user.
    A ``small`` session is a login with one short value and no browser.
    """
    client = Client(None, None) if small else Client("127.0.0.1", USER_AGENT)
    data = {"theme": "dark"} if small else {"cart": ["tea", "pen", "notebook"], "prefs": {"a": 1}}
    tagged = manager.codec.tag(data)
    keep = sample / count if count else 0.0
    batch: list[Record] = []
    cookies: list[str] = []
    for index in range(count):
        user = HEAVY_USER if heavy and index < HEAVY_SESSIONS else f"user{index // per_user}"
        started = now if expired is None else now - 7 * 3600 - expired * (1 - index / count)
        meta = manager.new_meta(started, client)
        meta.user_id = user
        meta.auth_at = meta.created_at
        meta.login_ip = client.ip
        session_id = new_session_id()
        batch.append(manager._record(store_key(session_id), meta, tagged, 1))
        if random.random() < keep:
            cookies.append(manager.signer.sign(session_id))
        if len(batch) == BATCH:
            yield batch, cookies
            batch, cookies = [], []
    if batch:
        yield batch, cookies


def redis_writer(store: Any) -> Any:
    """Write a batch of records to a RedisStore in one pipeline of its own write script."""

    def write(batch: list[Record], now: float) -> None:
        ops = []
        for record in batch:
            ops.extend(store._save_ops(record, expected=None, now=now))
        results = store._pipeline(ops)
        if not all(results):
            raise RuntimeError("a record could not be written")

    return write


def postgres_writer(store: Any) -> Any:
    """Write a batch of records to an SQLStore's table with COPY."""
    import psycopg

    url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    store._ensure_table()
    conn = psycopg.connect(url, autocommit=True)
    columns = "key, user_id, expires_at, version, payload"

    def write(batch: list[Record], now: float) -> None:
        with (
            conn.cursor() as cursor,
            cursor.copy(f"COPY {store.table.name} ({columns}) FROM STDIN") as copy,
        ):
            for r in batch:
                copy.write_row((r.key, r.user_id, r.expires_at, r.version, r.payload))

    write.conn = conn  # type: ignore[attr-defined]
    return write


def fill(datasets: list[tuple[Dataset, Any]], count: int, *, sample: int, **options: Any) -> None:
    """Write ``count`` records to each dataset (same records, each store its own copy)."""
    now = time.time()
    manager = datasets[0][0].manager
    spent = [0.0] * len(datasets)
    started = time.perf_counter()
    done = 0
    for batch, cookies in records(manager, count, now=now, sample=sample, **options):
        for index, (dataset, write) in enumerate(datasets):
            t = time.perf_counter()
            write(batch, now)
            spent[index] += time.perf_counter() - t
            dataset.cookies.extend(cookies)
            dataset.count += len(batch)
        done += len(batch)
        if done % 100_000 < BATCH:
            print(f"\r  {done:,} / {count:,} written", end="", flush=True)
    total = time.perf_counter() - started
    for index, (dataset, _) in enumerate(datasets):
        dataset.fill_seconds = spent[index]
    print(
        f"\r  {count:,} sessions in {total:.1f} s: building records "
        f"{total - sum(spent):.1f} s, "
        + ", ".join(f"{d.name} {s:.1f} s" for (d, _), s in zip(datasets, spent, strict=True))
    )


# -- measurements ----------------------------------------------------------------------


class _Forgetful(dict[str, Any]):
    """A verified-cookie memory that remembers nothing (the "caches off" measure)."""

    def __setitem__(self, key: str, value: Any) -> None:
        return None


@contextlib.contextmanager
def process_caches(dataset: Dataset, on: bool) -> Iterator[None]:
    """The dataset's app with its process caches (decoded payloads, verified cookies)
    as configured, or off: every request then verifies its cookie and decodes its
    record, whatever this process has seen before."""
    manager = dataset.manager
    codec, signer = manager.codec, manager.signer
    size, verified = codec.decoded_cache_size, signer._verified
    if not on:
        codec.decoded_cache_size = 0
        signer._verified = _Forgetful()
    try:
        yield
    finally:
        codec.decoded_cache_size, signer._verified = size, verified


def per_request(
    pairs: list[tuple[Dataset, Dataset]], *, rounds: int, per_round: int
) -> dict[str, Any]:
    """µs per read-only and modifying request, small vs large, interleaved in rounds,
    with the process caches on and off.

    The small store's 1,000 sessions all fit in a process's caches (the decoded
    payloads and the verified cookies), the large one's random picks mostly do not:
    with the caches on, the ratio holds that difference of cache hits as well as the
    store's; with them off, every request does the same work in the process and the
    ratio is the store's alone.
    """
    out: dict[str, Any] = {}
    modes = (("caches_on", True), ("caches_off", False))
    for small, large in pairs:
        times: dict[tuple[str, str, str], list[float]] = {}
        browsers = {d.name: Browser(d.app) for d in (small, large)}
        for dataset in (small, large):  # warm: connections, scripts, statements
            browser = browsers[dataset.name]
            for cookie in dataset.cookies[:200]:
                browser.cookie = cookie
                browser.request("GET", "/read")
        for index in range(rounds):
            order = [small, large] if index % 2 == 0 else [large, small]
            for mode, on in modes:
                for dataset in order:
                    browser = browsers[dataset.name]
                    cookies = dataset.cookies
                    with process_caches(dataset, on):
                        for scenario, method, path in (
                            ("read", "GET", "/read"),
                            ("write", "POST", "/write"),
                        ):
                            picks = [random.choice(cookies) for _ in range(per_round)]
                            started = time.perf_counter()
                            for cookie in picks:
                                browser.cookie = cookie
                                body = browser.request(method, path)
                            times.setdefault((mode, dataset.name, scenario), []).append(
                                (time.perf_counter() - started) / per_round * 1e6
                            )
                            if "user=None" in body:
                                raise RuntimeError(f"{dataset.name}: a session was not found")
        result: dict[str, Any] = {}
        for mode, _ in modes:
            figures = {}
            for scenario in ("read", "write"):
                a = statistics.median(times[mode, small.name, scenario])
                b = statistics.median(times[mode, large.name, scenario])
                figures[scenario] = {
                    "small_sessions": small.count,
                    "large_sessions": large.count,
                    "small_us": a,
                    "large_us": b,
                    "ratio": b / a,
                    "met": b / a <= 1.2,
                }
            result[mode] = figures
            shown = [
                f"{s} {r['small_us']:.1f} -> {r['large_us']:.1f} µs ({r['ratio']:.2f}x)"
                for s, r in figures.items()
            ]
            print(
                f"  {large.name}, {small.count:,} -> {large.count:,} sessions, "
                f"{mode.replace('_', ' ')}: " + "; ".join(shown)
            )
        out[large.name] = result
    return out


def sessions_of_user(dataset: Dataset, calls: int) -> dict[str, Any]:
    """Latency of cloak.sessions() for the user with 50 sessions: "cold", every record
    decrypted and parsed (as in a process that has not read them since they last
    changed), and "warm", from the codec's memory of each session's last payload;
    the two interleaved.  The target is judged on the cold figure."""
    from flask_cloakroom import Cloakroom

    cloak = Cloakroom()
    codec = dataset.manager.codec
    remembered = codec.decoded_cache_size
    samples: dict[str, list[float]] = {"cold": [], "warm": []}
    with dataset.app.test_request_context("/"):
        found = len(cloak.sessions(HEAVY_USER))
        try:
            for index in range(calls):
                mode = "cold" if index % 2 == 0 else "warm"
                codec.decoded_cache_size = 0 if mode == "cold" else remembered
                if mode == "warm":
                    cloak.sessions(HEAVY_USER)  # the previous call ran cold: fill it
                started = time.perf_counter()
                cloak.sessions(HEAVY_USER)
                samples[mode].append((time.perf_counter() - started) * 1e3)
        finally:
            codec.decoded_cache_size = remembered
    result: dict[str, Any] = {"sessions": found}
    for mode, taken in samples.items():
        result[mode] = {
            "p50_ms": quantile(taken, 0.5),
            "p99_ms": quantile(taken, 0.99),
            "max_ms": max(taken),
        }
    result["met"] = result["cold"]["p99_ms"] <= 2.0 and found == HEAVY_SESSIONS
    print(
        f"  {dataset.name}: sessions(user) of {found}: "
        + "; ".join(
            f"{mode} p50 {result[mode]['p50_ms']:.2f} ms, p99 {result[mode]['p99_ms']:.2f} ms"
            for mode in samples
        )
    )
    return result


def redis_memory(client: Any, prefix: str, count: int, before: int) -> dict[str, Any]:
    """Bytes per session: used_memory growth / count, and MEMORY USAGE of a sample."""
    after = int(client.info("memory")["used_memory"])
    sample_records: list[Any] = []
    cursor = 0
    while len(sample_records) < 200:
        cursor, keys = client.scan(cursor, match=f"{prefix}s:*", count=1000)
        sample_records.extend(keys)
        if cursor == 0:
            break
    record_usage = [client.memory_usage(key, samples=0) for key in sample_records[:200]]
    index_keys = list(client.scan_iter(match=f"{prefix}i:*", count=1000))
    per_index = [
        client.memory_usage(k, samples=0) / max(1, client.zcard(k)) for k in index_keys[:200]
    ]
    pipe = client.pipeline(transaction=False)
    for key in index_keys:
        pipe.object("encoding", key)
    encodings = pipe.execute()
    value_sizes = [client.strlen(k) for k in sample_records[:200]]
    return {
        "sessions": count,
        "used_memory_delta_per_session": (after - before) / count,
        "memory_usage_record": statistics.median(record_usage),
        "memory_usage_index_share": statistics.median(per_index),
        "value_bytes": statistics.median(value_sizes),
        "index_buckets": len(index_keys),
        # A bucket past zset-max-listpack-entries turns into a skip list (docs/redis.md).
        "index_buckets_not_listpack": sum(e not in (b"listpack", b"ziplist") for e in encodings),
    }


def small_session_memory(server: Any, sessions: int) -> dict[str, Any]:
    """Bytes per small session at 100,000 sessions and at ``sessions``: one and four
    sessions per user, plain and encrypted, each on ``server`` emptied first, with the
    default key prefix."""
    client = server.client(decode_responses=False)
    out: dict[str, Any] = {}
    for count in sorted({min(100_000, sessions), sessions}):
        for per_user in (1, PER_USER):
            for encrypted in (False, True):
                client.flushall()
                before = int(client.info("memory")["used_memory"])
                app = dataset_app(server.url, prefix="cloakroom:", table="t", encrypted=encrypted)
                small = Dataset("redis-small-session", app)
                writer = redis_writer(small.manager.store)
                fill([(small, writer)], count, sample=0, small=True, heavy=False, per_user=per_user)
                memory = redis_memory(client, "cloakroom:", count, before)
                memory["met"] = memory["used_memory_delta_per_session"] <= 300
                name = f"{count:,} sessions, {per_user} per user" + (
                    ", encrypted" if encrypted else ""
                )
                out[name] = memory
                print(f"  Redis memory, small session, {name}: {json.dumps(memory)}")
    client.flushall()
    return out


MACHINE = 0  # the pid under which cpu_by_pid keeps the machine's busy time


def cpu_by_pid() -> dict[int, tuple[str, int]]:
    """The command name and CPU time (jiffies) of every process on the machine, by pid,
    and under pid 0 the machine's busy time (all CPUs, from /proc/stat)."""
    out: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = text[text.index("(") + 1 :].rpartition(")")
        fields = rest.split()  # as _apps._stat_fields, from the text already read
        out[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    total, idle = _cpu_times()
    out[MACHINE] = ("machine", total - idle)
    return out


def busiest(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], top: int = 4
) -> dict[str, float]:
    """The ``top`` commands by CPU seconds between two :func:`cpu_by_pid` readings,
    and ``machine``: all CPU seconds spent meanwhile (wrk's too: a process that has
    exited by the second reading is in no command's figure).  Each process counts
    under its name at the second reading (a kernel worker's name changes with its
    work); a process started meanwhile counts in full."""
    tick = os.sysconf("SC_CLK_TCK")
    spent: dict[str, float] = {}
    for pid, (name, jiffies) in after.items():
        if pid != MACHINE:
            earlier = before.get(pid, (name, 0))[1]
            spent[name] = spent.get(name, 0.0) + (jiffies - earlier) / tick
    ranked = sorted(spent.items(), key=lambda item: -item[1])[:top]
    out = {name: round(seconds, 2) for name, seconds in ranked if seconds > 0}
    out["machine"] = round((after[MACHINE][1] - before[MACHINE][1]) / tick, 2)
    return out


def purge_plan(store: Any, conn: Any, now: float, batch_size: int) -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the store's pick of the purge's next batch
    (read-only, so it can run between two batches): its plan, its time and the pages
    it touched.  The pick goes on from the oldest expiry left (the store's own floor
    is the newest the last batch deleted, just below it)."""
    from sqlalchemy import func, select

    oldest = select(func.min(store.table.c.expires_at)).where(store.table.c.expires_at <= now)
    compiled = oldest.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    floor = conn.execute(str(compiled)).fetchone()[0]
    pick = store._purge_pick(batch_size, floor is not None, addresses=True)
    pick = pick.params(now=now, floor=floor)
    sql = pick.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(sql)).fetchone()[0][0]
    nodes = []
    node = plan["Plan"]
    while True:
        index = node.get("Index Name")
        nodes.append(node["Node Type"] + (f" on {index}" if index else ""))
        if not node.get("Plans"):
            break
        node = node["Plans"][0]
    return {
        "plan": " > ".join(nodes),
        "ms": round(plan["Execution Time"], 3),
        "pages_hit": plan["Plan"].get("Shared Hit Blocks", 0),
        "pages_read": plan["Plan"].get("Shared Read Blocks", 0),
    }


def snapshot_holders(conn: Any) -> list[dict[str, Any]]:
    """Backends other than this one that hold a snapshot or an open transaction: a
    purge's dead rows stay visible to them, so scans cannot skip them."""
    rows = conn.execute(
        "SELECT pid, state, backend_xmin::text, extract(epoch FROM now() - xact_start), "
        "left(query, 80) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND (backend_xmin IS NOT NULL OR state LIKE 'idle in transaction%')"
    ).fetchall()
    keys = ("pid", "state", "xmin", "transaction_seconds", "query")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def table_stats(conn: Any, table: str) -> dict[str, Any]:
    """The table's live and dead rows and its vacuum counts, from pg_stat_user_tables."""
    row = conn.execute(
        "SELECT n_live_tup, n_dead_tup, vacuum_count, autovacuum_count, "
        "pg_total_relation_size(relid) FROM pg_stat_user_tables WHERE relname = %s",
        (table,),
    ).fetchone()
    keys = ("live", "dead", "vacuums", "autovacuums", "bytes")
    return dict(zip(keys, row, strict=True)) if row else {}


def purge_under_load(
    dataset: Dataset,
    writer: Any,
    count: int,
    scratch: Path,
    slice_seconds: int,
    pace: float,
    batch_size: int,
    spread: float,
) -> dict[str, Any]:
    """p99 of the app before and while purge_expired() deletes ``count`` expired rows
    in batches of ``batch_size``, resting ``pace`` times each batch's time after it, as
    ``flask cloakroom purge`` does.

    What the purge did is recorded beside the latencies, to tell its cost from the
    app's: each batch's time, the plan and pages of its inner select now and then,
    the backends holding a snapshot when it began, the table's dead rows and vacuums
    before and after, and the CPU of each command per slice."""
    from flask_cloakroom.stores import open_store

    spec: AppSpec = dataset.app.config["PERF_SPEC"]
    conn = writer.conn
    print(f"  adding {count:,} expired rows")
    expired = Dataset("expired", dataset.app)
    fill([(expired, writer)], count, sample=0, expired=spread, heavy=False)
    # Settle the database first: the fill's own aftermath (autovacuum of the freshly
    # copied rows, a checkpoint of their WAL) is not the purge's, and rows that pile
    # up over weeks in a real table carry none of it.
    started = time.perf_counter()
    conn.execute(f"VACUUM (ANALYZE) {spec.table}")
    conn.execute("CHECKPOINT")
    print(f"  VACUUM (ANALYZE) and CHECKPOINT: {time.perf_counter() - started:.1f} s")
    server = start_gunicorn(spec, workers=1, scratch=scratch, program=find_gunicorn())
    wrk = Wrk(find_wrk(), scratch)
    batches: list[tuple[float, float]] = []  # (wall time it ended, seconds it took)
    plans: list[dict[str, Any]] = []
    try:
        wait_ready(server)
        cookies = dataset.cookies[:64]

        def load() -> tuple[WrkResult, dict[str, float]]:
            cpu = cpu_by_pid()
            result = wrk.run(
                server.port, cookies, method="GET", path="/read", seconds=slice_seconds,
                write_every=10,
            )  # fmt: skip
            if result.failures:
                raise RuntimeError(f"requests failed under load: {result}")
            return result, busiest(cpu, cpu_by_pid())

        load()  # warm
        before = [load() for _ in range(3)]
        holders = snapshot_holders(conn)
        stats_before = table_stats(conn, spec.table)
        now = time.time()
        store: Any = open_store(spec.store, sql_table=spec.table, timeout=30.0)
        plans.append({"batch": 0, **purge_plan(store, conn, now, batch_size)})
        outcome: dict[str, Any] = {}
        probe_every = max(1, count // batch_size // 8)

        def stamp(_deleted: int) -> None:
            # Called after each batch, before its rest: without a rest (pace 0) the
            # time between two calls is the batch's; with one, ``rest`` below has it.
            done = outcome["batches"] = outcome.get("batches", 0) + 1
            if pace == 0:
                last = batches[-1][0] if batches else outcome["started"]
                batches.append((time.time(), time.time() - last))
            if done % probe_every == 0:
                plans.append({"batch": done, **purge_plan(store, conn, now, batch_size)})

        def rest(seconds: float) -> None:
            batches.append((time.time(), seconds / pace))
            time.sleep(seconds)

        def purge() -> None:
            outcome["started"] = time.time()
            started = time.perf_counter()
            outcome["purged"] = store.purge_expired(
                now=now, batch_size=batch_size, progress=paced(stamp, pace, sleep=rest)
            )
            outcome["seconds"] = time.perf_counter() - started

        thread = threading.Thread(target=purge)
        thread.start()
        during = []
        while thread.is_alive():
            during.append(load())
        thread.join()
        store.close()
        stats_after = table_stats(conn, spec.table)
    finally:
        server.stop()
    normal = statistics.median(r.p99_us for r, _ in before) / 1000
    worst = max(r.p99_us for r, _ in during) / 1000
    slices = []
    for r, cpu in during:
        took = [s for t, s in batches if r.started <= t < r.ended]
        slices.append({
            "p99_ms": r.p99_us / 1000,
            "rate": r.rate,
            "batches": len(took),
            "batch_ms_median": 1000 * statistics.median(took) if took else None,
            "batch_ms_max": 1000 * max(took) if took else None,
            "cpu_seconds": cpu,
        })  # fmt: skip
    result = {
        "expired_rows": count,
        "expiries_spread_over_seconds": spread,
        "pace": pace,
        "batch_size": batch_size,
        "purged": outcome.get("purged"),
        "purge_seconds": outcome.get("seconds"),
        "p99_ms_before": [r.p99_us / 1000 for r, _ in before],
        "p99_ms_during": [r.p99_us / 1000 for r, _ in during],
        "rate_before": statistics.median(r.rate for r, _ in before),
        "rate_during": statistics.median(r.rate for r, _ in during),
        "cpu_seconds_before": [cpu for _, cpu in before],
        "slices": slices,
        "batch_seconds": [round(s, 6) for _, s in batches],
        "plans": plans,
        "snapshot_holders": holders,
        "table_before": stats_before,
        "table_after": stats_after,
        "worst_p99_over_normal": worst / normal,
        "met": worst / normal <= 2.0,
    }
    print(f"  snapshot holders at the start: {holders or 'none'}")
    print(f"  table before: {stats_before}; after: {stats_after}")
    for plan in plans:
        print(f"  inner select after {plan['batch']:,} batches: {plan}")
    print(f"  before: {[(round(r.p99_us / 1000, 2), cpu) for r, cpu in before]}")
    for index, s in enumerate(slices):
        median = s["batch_ms_median"]
        print(
            f"  slice {index}: p99 {s['p99_ms']:.2f} ms, {s['rate']:.0f} req/s, "
            f"{s['batches']} batches, median "
            + ("-" if median is None else f"{median:.2f} ms, max {s['batch_ms_max']:.2f} ms")
            + f"; CPU s {s['cpu_seconds']}"
        )
    print(
        f"  purged {result['purged']:,} rows in {result['purge_seconds']:.1f} s "
        f"(pace {pace:g}, batches of {batch_size}); "
        f"p99 before {normal:.2f} ms, worst slice during {worst:.2f} ms ({worst / normal:.2f}x)"
    )
    return result


# -- main ------------------------------------------------------------------------------


def dataset_app(url: str, *, prefix: str, table: str, encrypted: bool = True) -> Flask:
    spec = AppSpec(
        "cloakroom", url, encrypted=encrypted, prefix=prefix, table=table, config=SCALE_CONFIG
    )
    app = create_app(spec)
    app.config["PERF_SPEC"] = spec
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000, help="the large size")
    parser.add_argument("--small", type=int, default=1_000, help="the small size")
    parser.add_argument("--rounds", type=int, default=9, help="of the per-request measure")
    parser.add_argument("--slice", type=int, default=5, help="seconds per wrk slice")
    parser.add_argument("--skip-purge", action="store_true")
    parser.add_argument(
        "--pace",
        type=float,
        default=PURGE_PACE,
        help="the purge's rest after each batch, in times the batch's time (0: none)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=PURGE_BATCH_SIZE,
        help="rows the purge deletes in one statement (default: the store's)",
    )
    parser.add_argument(
        "--same-expiry",
        action="store_true",
        help="the purge's expired rows all expired at the same moment (default: over a day)",
    )
    parser.add_argument(
        "--purge-only",
        action="store_true",
        help="fill PostgreSQL and measure the purge under load, nothing else",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure Redis memory per small session (step 4's second part), nothing else",
    )
    args = parser.parse_args()
    info = machine()
    print(
        f"{info['cpus']} CPUs, {info['cpu']}, {info['memory']} RAM; "
        f"{args.sessions:,} vs {args.small:,} sessions"
    )
    servers = Servers({"redis", "postgres"})
    report: dict[str, Any] = {
        "when": timestamp(),
        "machine": info,
        "versions": {**versions(), **servers.sources},
        "sessions": args.sessions,
        "small": args.small,
    }
    try:
        small_redis = servers.extra_redis()
        if args.memory_only:
            report["redis_memory_small_session"] = small_session_memory(small_redis, args.sessions)
            return _save(report)
        big_url = servers.create_database("cloakroom_scale")
        big_redis = servers.redis.client(decode_responses=False)
        memory_before = int(big_redis.info("memory")["used_memory"])
        redis_big = Dataset("redis", dataset_app(servers.redis.url, prefix="big:", table="t"))
        redis_small = Dataset(
            "redis-small", dataset_app(small_redis.url, prefix="small:", table="t")
        )
        pg_big = Dataset("postgres", dataset_app(big_url, prefix="-", table="scale_big"))
        pg_small = Dataset("postgres-small", dataset_app(big_url, prefix="-", table="scale_small"))
        writers = {
            d.name: (redis_writer if "redis" in d.name else postgres_writer)(d.manager.store)
            for d in (redis_big, redis_small, pg_big, pg_small)
        }
        sample = min(20_000, args.sessions)

        def measure_purge() -> None:
            print("purge under load:")
            with scratch_dir("scale") as tmp:
                report["purge"] = purge_under_load(
                    pg_big,
                    writers["postgres"],
                    args.sessions,
                    Path(tmp),
                    args.slice,
                    args.pace,
                    args.batch_size,
                    0.0 if args.same_expiry else 86400.0,
                )

        print("fill:")
        if args.purge_only:
            fill([(pg_big, writers["postgres"])], args.sessions, sample=sample)
            measure_purge()  # its VACUUM (ANALYZE) covers the live rows too
            return _save(report)
        fill(
            [(redis_big, writers["redis"]), (pg_big, writers["postgres"])],
            args.sessions,
            sample=sample,
        )
        fill(
            [(redis_small, writers["redis-small"]), (pg_small, writers["postgres-small"])],
            args.small,
            sample=args.small,
        )
        for name in ("postgres", "postgres-small"):
            writers[name].conn.execute(
                f"ANALYZE {'scale_big' if name == 'postgres' else 'scale_small'}"
            )
        report["fill_seconds"] = {d.name: d.fill_seconds for d in (redis_big, pg_big)}
        report["redis_memory_bench_session"] = redis_memory(
            big_redis, "big:", args.sessions, memory_before
        )
        print(f"  Redis memory: {json.dumps(report['redis_memory_bench_session'])}")
        print("per-request cost (in process):")
        report["per_request"] = per_request(
            [(redis_small, redis_big), (pg_small, pg_big)], rounds=args.rounds, per_round=300
        )
        print("sessions(user):")
        report["sessions_of_user"] = {d.name: sessions_of_user(d, 500) for d in (redis_big, pg_big)}
        report["redis_memory_small_session"] = small_session_memory(small_redis, args.sessions)
        if not args.skip_purge:
            measure_purge()
    finally:
        servers.close()
    return _save(report)


def _save(report: dict[str, Any]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale-{report['when']}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
