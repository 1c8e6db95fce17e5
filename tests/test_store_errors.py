"""A failing store gives a clean 503 (or what CLOAKROOM_ON_STORE_ERROR chooses), never a 500,
never a silent logout, never a half-written session. The failures here are real: a
database port with nothing listening, a host that does not answer, and an SQLite file
locked by another writer."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event

from flask_cloakroom import ANONYMOUS, Cloakroom, StoreError, StoreUnavailable
from flask_cloakroom.stores import open_store
from flask_cloakroom.stores.base import CONNECT_REST_FIRST, ConnectRest
from flask_cloakroom.stores.sql import SQLStore

from .conftest import add_views


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_on(url: str, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_STORE=url, CLOAKROOM_STORE_TIMEOUT=0.3)
    app.config.update(config)
    add_views(app, Cloakroom(app))
    return app


@pytest.fixture
def dead_database() -> str:
    return f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing"


def test_unreachable_store_gives_503_with_retry_after(dead_database: str) -> None:
    app = app_on(dead_database, CLOAKROOM_RETRY_AFTER=7)
    client = app.test_client()
    client.set_cookie("session", "a" * 43 + "." + "b" * 22)  # no valid MAC: no lookup
    assert client.get("/get/x").status_code == 200
    started = time.monotonic()
    response = client.post("/set/x", json=1)  # the write fails
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert b"Traceback" not in response.data
    assert "Set-Cookie" not in response.headers


def test_views_that_ignore_the_session_keep_working(dead_database: str) -> None:
    app = app_on(dead_database)
    with app.test_request_context():
        signed = app.extensions["cloakroom"].signer.sign(b"\x01" * 32)
    client = app.test_client()
    client.set_cookie("session", signed)  # a valid MAC: the store is asked, and fails
    assert client.get("/nothing").status_code == 200
    response = client.get("/get/x")
    assert response.status_code == 503
    assert b"temporarily unavailable" in response.data


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose "host" does not answer, as a machine that is down: the
    listening socket never accepts and its queue is full, so the kernel drops the
    packets of every new connection and the client waits out its connect timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    filler = socket.create_connection(("127.0.0.1", port))  # fills the queue
    probe = socket.socket()
    probe.settimeout(0.2)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.1", port))
        yield port
    finally:
        for sock in (probe, filler, server):
            sock.close()


@pytest.mark.parametrize(
    ("scheme", "driver"),
    [("redis://{}/0", "redis"), ("mysql+pymysql://root@{}/x", "pymysql"),
     ("postgresql+psycopg://nobody@{}/x", "psycopg")],
)  # fmt: skip
def test_a_store_host_that_does_not_answer_holds_up_few_requests(
    unanswered_port: int, scheme: str, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request to a store whose host does not answer would wait out the connect
    timeout.  After a failed attempt the store rests, and answers the requests in
    between at once: few attempts, most requests answered without one."""
    pytest.importorskip(driver)
    app = app_on(scheme.format(f"127.0.0.1:{unanswered_port}"))
    # Attempts to connect, counted where they are made: SQLAlchemy's event before the
    # driver connects (libpq connects in C), Python's socket for redis-py.
    attempts: list[float] = []
    store = app.extensions["cloakroom"].store
    if isinstance(store, SQLStore):
        event.listen(store.engine, "do_connect", lambda *_: attempts.append(time.monotonic()))
    else:
        connect = socket.socket.connect

        def counted(sock: socket.socket, address: Any) -> None:
            if isinstance(address, tuple) and address[1:2] == (unanswered_port,):
                attempts.append(time.monotonic())
            connect(sock, address)

        monkeypatch.setattr(socket.socket, "connect", counted)
    client = app.test_client()
    client.set_cookie("session", app.extensions["cloakroom"].signer.sign(b"\x04" * 32))
    statuses = []
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        statuses.append(client.get("/get/x").status_code)
    spent = time.monotonic() - started
    assert set(statuses) == {503}
    # Each attempt waits out the connect timeout (0.3 s; libpq's is longer), then rests
    # at least as long: at most one attempt begins in each 0.6 s, the first included.
    assert 1 <= len(attempts) <= spent / 0.6 + 1, (len(attempts), spent)
    assert len(statuses) - len(attempts) >= 20, (len(statuses), len(attempts))


def test_the_rest_after_a_failed_attempt_lasts_as_long_as_the_attempt() -> None:
    """A rest is never shorter than the attempt that failed: a host that does not answer
    holds a caller up for the connect timeout, and resting as long keeps a worker
    answering at least half of the time (the first rest would otherwise be 50 ms)."""

    class Resting(Exception):
        pass

    def slow_failure() -> None:
        time.sleep(0.2)
        raise ConnectionError("no answer")

    rest = ConnectRest("the test's server", Resting)
    with pytest.raises(ConnectionError):
        rest.attempt(slow_failure)
    failed = time.monotonic()
    assert rest.resting
    refused = 0
    while time.monotonic() - failed < 0.15:
        with pytest.raises(Resting, match="the test's server failed; the next is in"):
            rest.attempt(lambda: "opened")
        refused += 1
    assert refused > 10
    time.sleep(0.1)  # past the attempt's 0.2 s
    assert rest.attempt(lambda: "opened") == "opened"
    assert not rest.resting
    # A fast failure rests the shortest time: CONNECT_REST_FIRST, then twice as long.
    with pytest.raises(ConnectionError):
        rest.attempt(lambda: (_ for _ in ()).throw(ConnectionError("refused")))
    with pytest.raises(Resting):
        rest.attempt(lambda: "opened")
    time.sleep(CONNECT_REST_FIRST + 0.02)
    assert rest.attempt(lambda: "opened") == "opened"


def test_on_store_error_can_send_its_own_response(dead_database: str) -> None:
    seen: list[Exception] = []

    def on_error(error: StoreError) -> Any:
        seen.append(error)
        return "We are doing maintenance", 503, {"Retry-After": "60"}

    app = app_on(dead_database, CLOAKROOM_ON_STORE_ERROR=on_error)
    client = app.test_client()
    with app.test_request_context():
        client.set_cookie("session", app.extensions["cloakroom"].signer.sign(b"\x02" * 32))
    response = client.get("/get/x")
    assert response.status_code == 503
    assert response.data == b"We are doing maintenance"
    assert isinstance(seen[0], StoreUnavailable)
    assert seen[0].__cause__ is not None  # the driver's error is attached


def test_on_store_error_can_go_on_anonymously(dead_database: str) -> None:
    app = app_on(dead_database, CLOAKROOM_ON_STORE_ERROR=lambda error: ANONYMOUS)
    client = app.test_client()
    with app.test_request_context():
        client.set_cookie("session", app.extensions["cloakroom"].signer.sign(b"\x03" * 32))
    assert client.get("/get/x").get_json() == {"value": None}
    assert client.get("/whoami").get_json() == {"user": None}
    response = client.post("/set/x", json=1)
    assert response.status_code == 200  # the app chose to accept the lost write


@pytest.fixture
def locked_sqlite(tmp_path: Path) -> Iterator[tuple[str, sqlite3.Connection]]:
    path = tmp_path / "locked.sqlite3"
    url = f"sqlite:///{path}"
    store = open_store(url)
    store.count(now=0)  # creates the table
    store.close()
    holder = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    yield url, holder
    holder.close()


def test_sqlite_locked_by_another_writer(locked_sqlite: tuple[str, sqlite3.Connection]) -> None:
    url, holder = locked_sqlite
    app = app_on(url)
    client = app.test_client()
    client.post("/set/x", json="before")
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert client.get("/get/x").get_json() == {"value": "before"}  # WAL: reads go on
        response = client.post("/set/x", json="during")
        assert response.status_code == 503
        assert "Set-Cookie" not in response.headers
    finally:
        holder.execute("ROLLBACK")
    # Nothing half-written, nobody logged out, and the app recovers by itself.
    assert client.get("/get/x").get_json() == {"value": "before"}
    assert client.post("/set/x", json="after").status_code == 200
    assert client.get("/get/x").get_json() == {"value": "after"}


def test_store_errors_carry_the_driver_error_and_no_password() -> None:
    store = open_store(f"postgresql+psycopg://app:hunter2@127.0.0.1:{free_port()}/x", timeout=0.3)
    with pytest.raises(StoreUnavailable) as caught:
        store.load("0" * 32)
    assert caught.value.store == "postgresql"
    assert caught.value.__cause__ is not None
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in store.describe()
