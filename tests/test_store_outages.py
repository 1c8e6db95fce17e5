"""Real store outages, through a Flask app: the client gets a bounded 503, the app heals itself.

Every outage here is real, made by the test: a throwaway PostgreSQL, MariaDB or Redis
stopped (or frozen with SIGSTOP) and started again, an SQLite file locked by another
process, a files store on a filesystem that is full.  For each one:

* a request that needs the session gets the configured response (by default 503 with
  ``Retry-After`` and a short message, never a traceback) within
  ``CLOAKROOM_STORE_TIMEOUT`` plus a small margin: every such request is timed, and
  one that does not answer at all is reported as a hang instead of hanging the suite;
* nobody is logged out by the outage (no cookie is deleted or replaced);
* once the store is back, the *same* app object serves again with no restart (on SQL
  stores within the rest between attempts to connect: 500 ms, or as long as the last
  failed attempt took):
  the data written before the outage is there, and several requests in a row succeed
  (the connection pool is not poisoned by connections that died with the server).

``CLOAKROOM_ON_STORE_ERROR`` is exercised against a real outage too.  The simulated
failures (a closed port, an in-process SQLite lock) are in ``test_store_errors.py``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify
from flask.testing import FlaskClient
from sqlalchemy import event
from werkzeug.datastructures import Headers

from flask_cloakroom import ANONYMOUS, Cloakroom, StoreError, StoreUnavailable
from flask_cloakroom.stores import Store
from flask_cloakroom.stores import sql as sql_module
from flask_cloakroom.stores.base import CONNECT_REST_FIRST, CONNECT_REST_MOST
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.sql import SQLStore

from .conftest import add_views
from .servers import ControllableMysql, ControllablePostgres, ControllableRedis
from .support import after_the_rest, drop_tables

# Each test bounds how long requests take: no collection of older garbage meanwhile.
pytestmark = pytest.mark.usefixtures("no_collector_pauses")

#: CLOAKROOM_STORE_TIMEOUT for every app here, in seconds.
TIMEOUT = 0.5
#: How much longer than TIMEOUT an outage request may take (Flask, the test client).
MARGIN = 0.4
#: A request that has not answered after this long is a hang.
HANG = 15.0
#: libpq's minimum connect timeout (seconds).
CONNECT_MINIMUM = 2.0
RETRY_AFTER = 7
#: The longest rest of an SQL store between attempts to connect: at least as long as
#: the failed attempt took, which on a frozen server is the whole connect timeout.
LONGEST_REST = max(CONNECT_REST_MOST, TIMEOUT, CONNECT_MINIMUM)

HAS_REDIS_STORE = importlib.util.find_spec("flask_cloakroom.stores.redis") is not None
needs_redis_store = pytest.mark.skipif(
    not HAS_REDIS_STORE, reason="the Redis store (flask_cloakroom.stores.redis) is not there yet"
)


# -- helpers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """A response and how long the request took."""

    status: int
    headers: Headers
    body: bytes
    seconds: float
    json: Any


class Hang(AssertionError):
    """A request did not answer within HANG seconds."""


def call(
    client: FlaskClient, method: str, path: str, json: Any = None, *, limit: float = HANG
) -> Timed:
    """Make one request in a helper thread and time it; raise :class:`Hang` if it hangs.

    A hung request's thread is left blocked (daemon): the test that provoked the hang
    must release it (for example by resuming a frozen server).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            response = client.open(path, method=method, json=json)
            box["timed"] = Timed(
                response.status_code,
                Headers(response.headers),
                response.get_data(),
                time.monotonic() - started,
                response.get_json(silent=True),
            )
        except BaseException as error:  # re-raised in the test's thread
            box["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise Hang(f"{method} {path} did not answer within {limit:.0f} s")
    if "error" in box:
        raise box["error"]
    timed: Timed = box["timed"]
    return timed


def assert_unavailable(timed: Timed, *, what: str = "", connecting: bool = False) -> None:
    """The default outage response: a fast 503 with Retry-After, no traceback, no cookie.

    ``connecting``: the call may have had to open a connection, which libpq gives at
    least 2 s (CONNECT_MINIMUM) however short the store timeout.
    """
    assert timed.status == 503, (what, timed.status, timed.body[:200])
    assert timed.headers.get("Retry-After") == str(RETRY_AFTER), what
    assert b"temporarily unavailable" in timed.body, what
    assert b"Traceback" not in timed.body, what
    assert "Set-Cookie" not in timed.headers, f"{what}: an outage must not log anyone out"
    limit = max(TIMEOUT, CONNECT_MINIMUM) if connecting else TIMEOUT
    assert timed.seconds <= limit + MARGIN, f"{what}: took {timed.seconds:.2f} s"


def build_app(store: str | Store, **config: Any) -> tuple[Flask, Cloakroom]:
    """An app on ``store`` with the test views, a short store timeout and Retry-After."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="outage-secret-" + "o" * 24,
        TESTING=True,
        CLOAKROOM_STORE_TIMEOUT=TIMEOUT,
        CLOAKROOM_RETRY_AFTER=RETRY_AFTER,
        **config,
    )
    if isinstance(store, str):
        app.config["CLOAKROOM_STORE"] = store
        cloak = Cloakroom(app)
    else:
        cloak = Cloakroom(app, store=store)
    add_views(app, cloak)

    @app.get("/activity/<user>")
    def activity(user: str) -> Any:
        return jsonify([event.kind for event in cloak.activity(user)])

    return app, cloak


@pytest.fixture
def sql_app(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., tuple[Flask, Cloakroom]]]:
    """Build apps on an SQL URL, each with its own table, dropped afterwards."""
    built: list[Flask] = []

    def factory(url: str, **config: Any) -> tuple[Flask, Cloakroom]:
        table = "cr_outage_" + secrets.token_hex(4)
        app, cloak = build_app(url, CLOAKROOM_SQL_TABLE=table, **config)
        built.append(app)
        return app, cloak

    yield factory
    for app in built:
        store = app.extensions["cloakroom"].store
        assert isinstance(store, SQLStore)
        with contextlib.suppress(Exception):  # the server may be gone for good
            drop_tables(store)
        store.close()


def signed_in(app: Flask, user: str = "alice") -> FlaskClient:
    """A client with a session holding ``x = "before"``, logged in as ``user``."""
    client = app.test_client()
    assert call(client, "POST", "/set/x", "before").status == 200
    assert call(client, "POST", f"/login/{user}").status == 200
    assert client.get_cookie("session") is not None
    return client


def assert_outage(client: FlaskClient, what: str) -> None:
    """Every kind of request during an outage, each timed."""
    for method, path, body in (("GET", "/get/x", None), ("POST", "/set/x", "during")):
        assert_unavailable(call(client, method, path, body), what=f"{what}: {method} {path}")
    # A view that never touches the session is not affected at all.
    untouched = call(client, "GET", "/nothing")
    assert untouched.status == 200, what
    assert untouched.seconds <= TIMEOUT + MARGIN, what


def assert_recovered(client: FlaskClient, user: str = "alice", *, rounds: int = 3) -> None:
    """The same app serves again: old data intact, several writes and reads in a row.

    Where an attempt to connect failed during the outage, the SQL stores try the next
    one after a rest (``LONGEST_REST`` at most): the first request may still get the
    store-error answer, but one within that time is served."""
    first = after_the_rest(
        lambda: call(client, "GET", "/get/x"), lambda a: a.status == 503, LONGEST_REST + MARGIN
    )
    assert first.status == 200, ("first request after the outage", first.status, first.body)
    assert first.json == {"value": "before"}, "data written before the outage"
    assert call(client, "GET", "/whoami").json == {"user": user}, "still logged in"
    for i in range(rounds):
        assert call(client, "POST", "/set/x", f"after-{i}").status == 200
        assert call(client, "GET", "/get/x").json == {"value": f"after-{i}"}
    assert call(client, "POST", "/set/x", "before").status == 200  # as it was


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (PostgreSQL backends are in sessions of their own,
    so a process group is not enough)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _stopped(pid: int) -> bool:
    """Whether every live thread of ``pid`` is stopped (or the process is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):  # stopped, or a thread that has ended
            return False
    return True


def freeze(pid: int) -> Callable[[], None]:
    """SIGSTOP a server and all its processes: it keeps its sockets open but never
    answers.  Returns the function that thaws it."""
    tree = process_tree(pid)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGSTOP)
    # A signal is delivered when the kernel next schedules the process: on a busy
    # machine a server may still answer a query sent right after kill() returned.
    deadline = time.monotonic() + 5
    while not all(_stopped(member) for member in tree) and time.monotonic() < deadline:
        time.sleep(0.005)

    def thaw() -> None:
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGCONT)

    return thaw


# -- PostgreSQL and MariaDB ----------------------------------------------------------

SqlServer = ControllablePostgres | ControllableMysql


@pytest.fixture(params=["postgres", "mysql"])
def sql_server(request: pytest.FixtureRequest) -> SqlServer:
    """A throwaway PostgreSQL or MariaDB the test may stop and start."""
    server: SqlServer = request.getfixturevalue(f"controllable_{request.param}")
    return server


def test_sql_server_stopped_gives_fast_503s_then_recovers(
    sql_server: SqlServer, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    app, _ = sql_app(sql_server.url)
    alice = signed_in(app)
    visitor = app.test_client()
    sql_server.stop()
    try:
        assert_outage(alice, "server stopped")
        # A visitor without a cookie costs no store read; their first write fails cleanly.
        assert call(visitor, "GET", "/get/x").json == {"value": None}
        assert_unavailable(call(visitor, "POST", "/set/x", 1), what="visitor's first write")
    finally:
        sql_server.start()
    assert_recovered(alice)
    assert call(visitor, "POST", "/set/x", 1).status == 200


@pytest.mark.parametrize("way_in", ["request", "cold-start", "api"])
def test_sql_store_rests_between_connection_attempts_while_the_server_is_down(
    sql_server: SqlServer,
    sql_app: Callable[..., tuple[Flask, Cloakroom]],
    way_in: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the server is down, the store does not try to connect on every call: after
    a failed attempt it rests, doubling the rest with each failure in a row
    (``CONNECT_REST_FIRST`` up to ``CONNECT_REST_MOST``), and the calls in between get
    the store-error answer at once.  Trying every time cost each request the driver's
    connection set-up (PyMySQL 1.2: 20 ms of CPU) or its connect timeout.

    ``way_in``: how the calls reach the database.  ``request``: requests of a session
    loaded before (the request path's own pool).  ``cold-start``: requests to an app
    whose store has not yet made its table (a worker started during the outage), with
    a cookie that makes them read the store.  ``api``: reading the activity log
    (through SQLAlchemy's pool).  Before the rest was shared by all three, the last
    two tried on every call: one connect timeout, or two, per request.
    """
    app, _ = sql_app(sql_server.url)
    store = app.extensions["cloakroom"].store
    assert isinstance(store, SQLStore)
    if way_in == "request":
        client, path = signed_in(app), "/get/x"
    elif way_in == "api":
        signed_in(app)  # pools a connection of SQLAlchemy's, by writing the login event
        client, path = app.test_client(), "/activity/alice"
    else:
        client, path = app.test_client(), "/get/x"
        client.set_cookie("session", app.extensions["cloakroom"].signer.sign(b"\x03" * 32))
        assert not store._ready
    attempts: list[float] = []
    event.listen(store.engine, "do_connect", lambda *_: attempts.append(time.monotonic()))
    caplog.set_level(logging.DEBUG, logger="flask_cloakroom")
    sql_server.stop()
    try:
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 1.2:  # long enough to reach the longest rest
            answers.append(call(client, "GET", path))
            time.sleep(0.005)
        spent = time.monotonic() - started
    finally:
        sql_server.start()
    for answer in answers:
        assert_unavailable(answer, what=f"server stopped, {way_in}")
    assert len(answers) > 20, len(answers)  # most were answered at once
    # The most attempts the rests allow in that time, the first one included.
    allowed, rest, at = 1, CONNECT_REST_FIRST, 0.0
    while at + rest <= spent:
        at += rest
        allowed += 1
        rest = min(2 * rest, CONNECT_REST_MOST)
    assert 1 <= len(attempts) <= allowed + 1, (len(attempts), allowed, spent)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= CONNECT_REST_FIRST * 0.9 for gap in gaps), gaps
    if way_in != "api":
        # One log line a request: an ERROR for an attempt that failed, a DEBUG line
        # for a request answered during the rest (an outage must not flood the logs).
        loading = [
            r for r in caplog.records if r.getMessage().startswith("session store unavailable")
        ]
        assert len(loading) == len(answers)
        errors = [r for r in loading if r.levelno == logging.ERROR]
        assert 1 <= len(errors) <= len(attempts), (len(errors), len(attempts))
        assert all("the last attempt to connect" not in r.getMessage() for r in errors)
        resting = [r for r in loading if r.levelno == logging.DEBUG]
        assert len(resting) == len(answers) - len(errors)
        assert all("the last attempt to connect" in r.getMessage() for r in resting)
    if way_in == "request":
        assert_recovered(client)
    else:
        assert_served(client, path)
    # Once a connection is made again, the next failure rests the shortest time again.
    assert not store._connections.rest.resting


def assert_served(client: FlaskClient, path: str) -> None:
    """``GET path`` is served again within the longest rest after the server is back."""
    answer = after_the_rest(
        lambda: call(client, "GET", path), lambda a: a.status == 503, LONGEST_REST + MARGIN
    )
    assert answer.status == 200, ("after the outage", path, answer.status, answer.body[:200])


def test_sql_server_restarted_between_requests_costs_no_request(
    sql_server: SqlServer, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    """A restart while the app is idle: the pool holds connections to the old server."""
    app, _ = sql_app(sql_server.url)
    alice = signed_in(app)
    sql_server.restart()
    assert_recovered(alice)


def test_sql_server_restarted_between_api_calls_costs_no_call(
    sql_server: SqlServer, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    """The same for the API calls: listing sessions (the raw path) and reading the
    activity log (through SQLAlchemy's own pool)."""
    app, _ = sql_app(sql_server.url)
    alice = signed_in(app)
    visitor = app.test_client()  # no cookie: nothing is loaded before the calls
    assert len(call(visitor, "GET", "/sessions/alice").json) == 1  # pools connections
    assert "login" in call(visitor, "GET", "/activity/alice").json
    sql_server.restart()
    listed = call(visitor, "GET", "/sessions/alice")
    assert listed.status == 200, ("first listing after the restart", listed.status, listed.body)
    assert len(listed.json) == 1
    logged = call(visitor, "GET", "/activity/alice")
    assert logged.status == 200, ("first activity after the restart", logged.status, logged.body)
    assert "login" in logged.json
    assert_recovered(alice)


#: How long a request to a frozen server may take before the test calls it a hang.
FROZEN_LIMIT = TIMEOUT + MARGIN + 2.5


def check_frozen_server(
    url: str, pid: int | None, what: str, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    """A server that accepts connections but never answers (SIGSTOP) must not hang
    requests: the request gets the store-error response in bounded time, and the app
    recovers once the server answers again."""
    app, _ = sql_app(url)
    alice = signed_in(app)
    visitor = app.test_client()
    assert len(call(visitor, "GET", "/sessions/alice").json) == 1
    assert "login" in call(visitor, "GET", "/activity/alice").json  # SQLAlchemy's pool
    assert pid is not None
    thaw = freeze(pid)
    try:
        # Each call discards the connection it waited on; the first two find one idle
        # in their own pool (SQLAlchemy's, then the request path's), the last has to
        # open one (the request path takes new ones from SQLAlchemy's pool).
        logged = call(visitor, "GET", "/activity/alice", limit=FROZEN_LIMIT)
        timed = call(alice, "GET", "/get/x", limit=FROZEN_LIMIT)
        listed = call(visitor, "GET", "/sessions/alice", limit=FROZEN_LIMIT)
    finally:
        thaw()
    assert_unavailable(logged, what=f"{what}, reading the activity log")
    assert_unavailable(timed, what=what)
    assert_unavailable(listed, what=f"{what}, listing a user's sessions", connecting=True)
    assert_recovered(alice)
    assert len(call(visitor, "GET", "/sessions/alice").json) == 1
    assert "login" in call(visitor, "GET", "/activity/alice").json


def test_postgres_frozen_server_gives_a_bounded_answer(
    controllable_postgres: ControllablePostgres, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    server = controllable_postgres
    check_frozen_server(server.url, server.process.pid, "frozen PostgreSQL", sql_app)


def test_mysql_frozen_server_gives_a_bounded_answer(
    controllable_mysql: ControllableMysql, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    server = controllable_mysql
    check_frozen_server(server.url, server.process.pid, "frozen MariaDB", sql_app)


def test_a_driver_timeout_that_comes_before_the_watchdog_is_not_tried_again(
    controllable_mysql: ControllableMysql,
    sql_app: Callable[..., tuple[Flask, Cloakroom]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PyMySQL's read timeout is the store timeout, as is the watchdog's deadline; when
    the watchdog's thread wakes late (a busy machine), the driver gives up first.  The
    deadline is missed all the same: no second try on a new connection, whose wait for
    a frozen server's greeting made such requests take twice the timeout (1.06 s,
    seen on CI's machine).  Here the watchdog never fires, so the driver always does."""
    server = controllable_mysql
    app, _ = sql_app(server.url)
    alice = signed_in(app)
    visitor = app.test_client()
    assert "login" in call(visitor, "GET", "/activity/alice").json  # SQLAlchemy's pool
    monkeypatch.setattr(sql_module._WATCHDOG, "arm", lambda fd, deadline: None)
    pid = server.process.pid
    assert pid is not None
    thaw = freeze(pid)
    try:
        timed = call(alice, "GET", "/get/x", limit=FROZEN_LIMIT)
        logged = call(visitor, "GET", "/activity/alice", limit=FROZEN_LIMIT)
    finally:
        thaw()
    assert_unavailable(timed, what="the request path, after PyMySQL's read timeout")
    assert_unavailable(logged, what="SQLAlchemy's pool, after PyMySQL's read timeout")
    assert_recovered(alice)


def add_api_views(app: Flask, cloak: Cloakroom) -> None:
    """Views that use the session API rather than ``flask.session``."""

    @app.get("/handle")
    def handle() -> Any:
        return {"handle": cloak.handle}

    @app.get("/login-age")
    def login_age() -> Any:
        age = cloak.login_age()
        return {"seconds": None if age is None else age.total_seconds()}

    @app.post("/revoke-all/<user>")
    def revoke_all(user: str) -> Any:
        return {"ended": cloak.revoke_user(user)}


def api_during_outage(
    server: ControllablePostgres,
    sql_app: Callable[..., tuple[Flask, Cloakroom]],
    calls: list[tuple[str, str]],
) -> dict[str, Timed]:
    """Make ``calls`` while the server is stopped; check that none of them took effect."""
    app, cloak = sql_app(server.url, PROPAGATE_EXCEPTIONS=False)
    add_api_views(app, cloak)
    alice = signed_in(app)
    server.stop()
    try:
        answers = {f"{method} {path}": call(alice, method, path) for method, path in calls}
    finally:
        server.start()
    assert all(a.seconds <= TIMEOUT + MARGIN for a in answers.values())
    assert all("Set-Cookie" not in a.headers for a in answers.values())
    assert all(b"Traceback" not in a.body for a in answers.values())
    assert_recovered(alice)  # nothing above took effect: still alice, data intact
    return answers


def not_503(answers: dict[str, Timed]) -> dict[str, tuple[int, bytes]]:
    return {
        name: (a.status, a.body[:60])
        for name, a in answers.items()
        if a.status != 503 or a.headers.get("Retry-After") != str(RETRY_AFTER)
    }


def test_session_operations_during_a_real_outage_give_the_configured_response(
    controllable_postgres: ControllablePostgres, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    """A login, logout, rotation, listing or revocation must never seem to succeed (200)
    without taking effect, nor fail with a 500: it answers like a session access."""
    calls = [
        ("POST", "/logout"),
        ("POST", "/login/bob"),
        ("POST", "/rotate"),
        ("GET", "/sessions/alice"),
        ("POST", "/revoke-all/alice"),
    ]
    answers = api_during_outage(controllable_postgres, sql_app, calls)
    assert not_503(answers) == {}


def test_user_id_during_a_real_outage_gives_the_configured_response(
    controllable_postgres: ControllablePostgres, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    answers = api_during_outage(
        controllable_postgres,
        sql_app,
        [("GET", "/whoami"), ("GET", "/handle"), ("GET", "/login-age")],
    )
    assert not_503(answers) == {}


# -- CLOAKROOM_ON_STORE_ERROR against a real outage ----------------------------------


def test_on_store_error_custom_response_during_a_real_outage(
    controllable_postgres: ControllablePostgres, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    seen: list[StoreError] = []

    def on_error(error: StoreError) -> Any:
        seen.append(error)
        return "Down for maintenance", 503, {"Retry-After": "60"}

    app, _ = sql_app(controllable_postgres.url, CLOAKROOM_ON_STORE_ERROR=on_error)
    alice = signed_in(app)
    controllable_postgres.stop()
    try:
        for method, path in (("GET", "/get/x"), ("POST", "/set/x")):
            timed = call(alice, method, path, "during")
            assert timed.status == 503
            assert timed.body == b"Down for maintenance"
            assert timed.headers["Retry-After"] == "60"
            assert "Set-Cookie" not in timed.headers
            assert timed.seconds <= TIMEOUT + MARGIN
    finally:
        controllable_postgres.start()
    assert seen
    assert all(isinstance(error, StoreUnavailable) for error in seen)
    assert all(error.__cause__ is not None for error in seen)
    assert_recovered(alice)


def test_on_store_error_anonymous_serves_read_only_pages_during_a_real_outage(
    controllable_postgres: ControllablePostgres, sql_app: Callable[..., tuple[Flask, Cloakroom]]
) -> None:
    app, _ = sql_app(controllable_postgres.url, CLOAKROOM_ON_STORE_ERROR=lambda e: ANONYMOUS)
    alice = signed_in(app)
    controllable_postgres.stop()
    try:
        pages = [
            call(alice, "GET", "/get/x"),
            call(alice, "GET", "/whoami"),
            call(alice, "POST", "/set/x", "lost on purpose"),
        ]
    finally:
        controllable_postgres.start()
    assert [p.status for p in pages] == [200, 200, 200]
    assert pages[0].json == {"value": None}
    assert pages[1].json == {"user": None}
    for page in pages:
        assert page.seconds <= TIMEOUT + MARGIN
        assert "Set-Cookie" not in page.headers, "going on anonymously must not log anyone out"
    assert_recovered(alice)  # the write made during the outage was dropped, as chosen


# -- SQLite locked by another process ------------------------------------------------

_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def sqlite_locked_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process takes SQLite's write lock and holds it; it dies (SIGKILL) at the end."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "locked"
        yield locker
    finally:
        locker.kill()
        locker.wait(10)


def test_sqlite_locked_by_another_process(tmp_path: Path) -> None:
    """Readers go on (WAL); writers give up after the busy timeout, which is the store
    timeout; when the locking process dies, the app writes again by itself."""
    path = tmp_path / "sessions.sqlite3"
    app, _ = build_app(f"sqlite:///{path}")
    alice = signed_in(app)
    visitor = app.test_client()
    with sqlite_locked_by_another_process(path):
        read = call(alice, "GET", "/get/x")
        assert read.status == 200
        assert read.json == {"value": "before"}, "WAL: readers do not wait for the writer"
        assert read.seconds <= TIMEOUT + MARGIN
        assert_unavailable(call(alice, "POST", "/set/x", "during"), what="write, locked")
        assert_unavailable(call(visitor, "POST", "/set/x", 1), what="new session, locked")
        assert call(alice, "GET", "/nothing").status == 200
    assert_recovered(alice)
    assert call(visitor, "POST", "/set/x", 1).status == 200


# -- files store on a full disk ------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (needs root / CAP_SYS_ADMIN)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until the filesystem is full, to the last byte; return it."""
    filler = folder / "filler"
    failures: list[int | None] = []
    with open(filler, "wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    handle.write(b"\0" * size)
                except OSError as error:
                    failures.append(error.errno)
                    break
    assert failures == [errno.ENOSPC] * 4
    return filler


def test_files_store_on_a_full_disk(small_filesystem: Path) -> None:
    root = small_filesystem / "sessions"
    app, _ = build_app(FileStore(str(root)))
    alice = signed_in(app)
    visitor = app.test_client()
    filler = fill(small_filesystem)
    try:
        read = call(alice, "GET", "/get/x")
        assert read.status == 200
        assert read.json == {"value": "before"}, "a full disk still reads"
        assert_unavailable(call(alice, "POST", "/set/x", "during"), what="write, disk full")
        assert_unavailable(call(visitor, "POST", "/set/x", 1), what="new session, disk full")
        assert_unavailable(call(alice, "POST", "/rotate"), what="rotation, disk full")
        leftovers = [p.name for p in root.rglob(".tmp-*")]
        assert leftovers == [], "failed writes leave no temporary files"
    finally:
        filler.unlink()
    assert_recovered(alice)
    assert call(visitor, "POST", "/set/x", 1).status == 200


# -- Redis -----------------------------------------------------------------------------


@pytest.fixture
def redis_app(controllable_redis: ControllableRedis) -> Iterator[tuple[Flask, Cloakroom]]:
    """An app on the controllable Redis, under a key prefix of its own."""
    prefix = f"{controllable_redis.prefix}outage-{secrets.token_hex(4)}:"
    app, cloak = build_app(controllable_redis.url, CLOAKROOM_REDIS_PREFIX=prefix)
    yield app, cloak
    app.extensions["cloakroom"].store.close()


@needs_redis_store
def test_redis_stopped_gives_fast_503s_then_recovers(
    controllable_redis: ControllableRedis, redis_app: tuple[Flask, Cloakroom]
) -> None:
    app, _ = redis_app
    alice = signed_in(app)
    controllable_redis.stop()  # SHUTDOWN SAVE: the data comes back with the server
    try:
        assert_outage(alice, "Redis stopped")
    finally:
        controllable_redis.start()
    assert_recovered(alice)


@needs_redis_store
def test_redis_restarted_between_requests_costs_no_request(
    controllable_redis: ControllableRedis, redis_app: tuple[Flask, Cloakroom]
) -> None:
    app, _ = redis_app
    alice = signed_in(app)
    controllable_redis.restart()
    assert_recovered(alice)


@needs_redis_store
def test_redis_frozen_server_gives_a_bounded_answer(
    controllable_redis: ControllableRedis, redis_app: tuple[Flask, Cloakroom]
) -> None:
    app, _ = redis_app
    alice = signed_in(app)
    client = controllable_redis.client()
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    thaw = freeze(pid)
    try:
        timed = call(alice, "GET", "/get/x", limit=FROZEN_LIMIT)
    finally:
        thaw()
    assert_unavailable(timed, what="frozen Redis")
    assert_recovered(alice)


@pytest.mark.parametrize("kind", ["redis", "postgres", "mysql"])
def test_a_frozen_server_costs_the_timeout_only_to_the_store_attempts(
    kind: str,
    request: pytest.FixtureRequest,
    sql_app: Callable[..., tuple[Flask, Cloakroom]],
) -> None:
    """A frozen server keeps accepting connections (the kernel does) but never answers.
    A request on a pooled connection waits the timeout; after it, each new connection
    waits for its hand-shake (redis-py's ``CLIENT SETINFO``, the database's greeting),
    which fails: an attempt to connect that failed, so the store rests at least as long
    before the next, and the requests in between are answered at once.  Before the
    rest every request waited the whole timeout (or, on PostgreSQL, libpq's 2 s)."""
    if kind == "redis":
        if not HAS_REDIS_STORE:
            pytest.skip("the Redis store is not there")
        server: Any = request.getfixturevalue("controllable_redis")
        prefix = f"{server.prefix}outage-{secrets.token_hex(4)}:"
        app, _ = build_app(server.url, CLOAKROOM_REDIS_PREFIX=prefix)
        client = server.client()
        try:
            pid = int(client.info("server")["process_id"])
        finally:
            client.close()
    else:
        server = request.getfixturevalue(f"controllable_{kind}")
        app, _ = sql_app(server.url)
        pid = server.process.pid
    # An attempt waits the timeout, libpq's minimum on PostgreSQL; then the rest.
    attempt = CONNECT_MINIMUM if kind == "postgres" else TIMEOUT
    alice = signed_in(app)
    answers: list[Timed] = []
    thaw = freeze(pid)
    try:
        started = time.monotonic()
        while time.monotonic() - started < TIMEOUT + 2 * attempt + 0.5:
            answers.append(call(alice, "GET", "/get/x", limit=FROZEN_LIMIT))
        spent = time.monotonic() - started
    finally:
        thaw()
    for answer in answers:
        assert_unavailable(answer, what=f"frozen {kind}", connecting=True)
    slow = [a.seconds for a in answers if a.seconds > TIMEOUT / 2]
    assert len(answers) - len(slow) >= 20, (len(answers), slow)
    # The pooled connection's wait, then at most one attempt in each twice its time.
    assert len(slow) <= (spent - TIMEOUT) / (2 * TIMEOUT) + 2, (slow, spent)
    assert_recovered(alice)
    if kind == "redis":
        app.extensions["cloakroom"].store.close()
