"""The Redis store's lane (its hot path for single commands), on real servers.

What must hold: replies are never read by the wrong command (after an error reply, a
timeout, a connection killed by the server), a forked child never uses its parent's
sockets, threads share the lane safely, Sentinel commands go to the master, and
clients that must see every command (one connection, redis-py's own cache) get no lane.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import redis
from flask import Flask
from redis._parsers import _HiredisParser, _RESP2Parser, _RESP3Parser
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from flask_cloakroom import Cloakroom
from flask_cloakroom.errors import ConfigError
from flask_cloakroom.stores import base, redis_lane, resp
from flask_cloakroom.stores.base import BUSY_POLL_US, PollBackoff, Record
from flask_cloakroom.stores.redis import RedisStore, open_redis_store
from flask_cloakroom.stores.redis_lane import Lane, lane_for

from .servers import RedisClusterServer, RedisServer, flush_prefix, free_port

NOW = 1_900_000_000.0


@dataclass
class Target:
    """A client to make lanes from, a prefix for its keys, and an admin connection."""

    client: redis.Redis
    prefix: str
    admin: redis.Redis

    def lane(self) -> Lane:
        return make_lane(self.client)


#: The socket timeout of the clients below (seconds).
TIMEOUT = 0.5


@pytest.fixture(params=["redis_server", "redis_server, python reader", "redis_sentinel"])
def target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    """A standalone client set up as open_redis_store sets up its own (one retry of a
    dropped connection, none of a timeout), whose lane talks to the socket itself,
    with hiredis's reader and packer or, as where hiredis is not installed, with
    flask_cloakroom.stores.resp; or the client of a Sentinel store, whose lane goes
    through redis-py's send and read (its connections must see READONLY replies)."""
    name, _, reader = request.param.partition(", ")
    if reader:
        without_hiredis(monkeypatch)
    server = request.getfixturevalue(name)
    prefix = f"{server.prefix}lane:{secrets.token_hex(4)}:"
    store = open_redis_store(
        server.url, prefix=prefix, timeout=TIMEOUT, wait_replicas=0, client_cache=0
    )
    assert isinstance(store, RedisStore)
    client = store.client
    if name == "redis_sentinel":
        host, port = client.connection_pool.get_master_address()
    else:
        host, port = server.host, server.port
    admin = redis.Redis(host=host, port=port)
    try:
        yield Target(client, prefix, admin)
    finally:
        store.close()
        admin.close()
        flush_prefix(server.url, prefix)


def without_hiredis(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where hiredis is not installed: redis-py packs commands in Python (in the
    client's encoding), and the lane packs and reads with flask_cloakroom.stores.resp."""
    monkeypatch.setattr(redis_lane, "HIREDIS_AVAILABLE", False)
    monkeypatch.setattr(redis.connection, "HIREDIS_AVAILABLE", False)
    # redis-py 5 chose its packer by this flag, and bound hiredis's parser as every
    # connection's default when it was imported: new connections get the Python one.
    monkeypatch.setattr(redis.connection, "HIREDIS_PACK_AVAILABLE", False, raising=False)
    set_parser: Any = redis.connection.AbstractConnection.set_parser

    def python_parser(connection: Any, parser_class: Any) -> None:
        if parser_class is _HiredisParser:  # redis-py 5 sets the protocol after this
            resp3 = getattr(connection, "protocol", 2) in (3, "3")
            parser_class = _RESP3Parser if resp3 else _RESP2Parser
        set_parser(connection, parser_class)

    monkeypatch.setattr(redis.connection.AbstractConnection, "set_parser", python_parser)


@pytest.fixture
def lane(target: Target) -> Iterator[Lane]:
    made = target.lane()
    yield made
    made.close()


def make_lane(client: redis.Redis, busy_poll_us: int = BUSY_POLL_US) -> Lane:
    """The lane a store makes: polling for replies as by default, unless told otherwise."""
    made = lane_for(client, busy_poll=busy_poll_us / 1_000_000)
    assert made is not None
    return made


def connection_id(lane: Lane) -> int:
    reply = lane.execute("CLIENT", "ID")
    assert isinstance(reply, int)
    return reply


def test_replies_come_back_raw_on_one_reused_connection(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    assert lane.execute("SET", key, "é") == b"OK"
    first = connection_id(lane)
    assert lane.execute("GET", key) == "é".encode()
    assert lane.execute("GET", f"{target.prefix}missing") is None
    assert connection_id(lane) == first
    assert target.admin.client_kill_filter(_id=str(first)) == 1  # it is on the master
    assert lane.execute("GET", key) == "é".encode()
    assert len(lane) == 1


def test_an_error_reply_leaves_the_connection_in_step(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    before = connection_id(lane)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        lane.execute("HGET", key, "field")
    assert lane.execute("GET", key) == b"value"
    assert connection_id(lane) == before  # kept: the error reply was read in full


def test_commands_sent_together_get_their_own_replies_in_order(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    before = connection_id(lane)
    replies = lane.execute_many(
        [("SET", key, "value"), ("HGET", key, "field"), ("GET", key), ("INCR", key)]
    )
    assert replies[0] == b"OK" and replies[2] == b"value"
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    assert isinstance(replies[3], ResponseError) and "not an integer" in str(replies[3])
    assert lane.execute("GET", key) == b"value"
    assert connection_id(lane) == before


def test_plain_connections_are_read_by_the_lane_itself(target: Target, lane: Lane) -> None:
    """The lane reads a plain connection's socket with a reader of its own (hiredis's,
    or the pure-Python one); a Sentinel's connections are read by redis-py."""
    lane.execute("PING")
    (wire,) = lane._idle
    if isinstance(target.client.connection_pool, SentinelConnectionPool):
        assert wire.reader is None
        return
    if redis_lane.HIREDIS_AVAILABLE and redis_lane._HIREDIS_KNOWS_PUSHES:
        assert type(wire.reader).__module__ == "hiredis"
    else:
        assert isinstance(wire.reader, resp.Reader)
    # Packed as the connection packs (with hiredis where redis-py does).
    packer = type(getattr(wire.connection, "_command_packer", None)).__name__
    assert isinstance(wire.pack, functools.partial)
    if packer == "HiredisRespSerializer":
        assert wire.pack.func is redis_lane._hiredis_pack
    else:
        assert wire.pack.func is resp.pack


def test_replies_of_every_shape_come_back_as_redis_py_gives_them(
    target: Target, lane: Lane
) -> None:
    """Bulk strings long enough to arrive in many reads, nils, integers, statuses,
    arrays nested in arrays, and error replies as redis-py's own exception classes."""
    big, listed = f"{target.prefix}big", f"{target.prefix}list"
    value = secrets.token_bytes(3 * 1024 * 1024)  # many socket reads
    assert lane.execute("SET", big, value) == b"OK"
    assert lane.execute("RPUSH", listed, "a", b"\x00\xff", "é") == 3
    assert lane.execute("INCRBYFLOAT", f"{target.prefix}float", 1.5) == b"1.5"
    nested = "return {1, 'two', {3, false}, redis.status_reply('FINE')}"
    reads: list[tuple[object, ...]] = [
        ("GET", big),
        ("GET", f"{target.prefix}missing"),
        ("LRANGE", listed, 0, -1),
        ("MGET", big, f"{target.prefix}missing", listed),
        ("EVAL", nested, 0),
        ("EXISTS", big, listed),
        ("TYPE", listed),
    ]
    for command in reads:
        theirs = target.client.execute_command(*command, NEVER_DECODE=True)  # type: ignore[no-untyped-call]
        assert lane.execute(*command) == theirs, command
    assert lane.execute("GET", big) == value
    assert lane.execute("LRANGE", listed, 0, -1) == [b"a", b"\x00\xff", "é".encode()]
    assert lane.execute("EVAL", nested, 0) == [1, b"two", [3, None], b"FINE"]
    with pytest.raises(ResponseError, match=r"^MINE went wrong$"):
        lane.execute("EVAL", "return redis.error_reply('MINE went wrong')", 0)
    with pytest.raises(NoScriptError):  # the class the store's scripts rely on
        lane.execute("EVALSHA", "0" * 40, 0)
    assert len(lane) == 1


@pytest.mark.parametrize("hiredis_reader", [True, False], ids=["hiredis", "python reader"])
def test_a_key_is_the_same_key_on_the_lane_and_through_the_client(
    redis_server: RedisServer, hiredis_reader: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane packs strings exactly as the client's own commands do, whatever the
    client's encoding (the store sends some commands each way)."""
    if not hiredis_reader:
        without_hiredis(monkeypatch)
    client = redis.Redis.from_url(redis_server.url, encoding="latin-1")
    admin = redis.Redis.from_url(redis_server.url)
    lane = make_lane(client)
    key = f"{redis_server.prefix}lane:{secrets.token_hex(4)}:clé"
    raw = {"NEVER_DECODE": True}
    try:
        lane.execute("SET", key, "café")
        assert client.execute_command("GET", key, **raw) == lane.execute("GET", key)  # type: ignore[no-untyped-call]
        client.execute_command("SET", key, "thé")  # type: ignore[no-untyped-call]
        assert lane.execute("GET", key) == client.execute_command("GET", key, **raw)  # type: ignore[no-untyped-call]
        assert admin.exists(key.encode("utf-8")) + admin.exists(key.encode("latin-1")) == 1
    finally:
        admin.delete(key.encode("utf-8"), key.encode("latin-1"))
        lane.close()
        client.close()
        admin.close()


class MisbehavingServer:
    """A TCP peer that speaks RESP well enough for redis-py's handshake (``HELLO``,
    then ``+OK`` to everything) and answers every ``GET`` with ``answer``: what a broken proxy or a
    hostile host on the path could send.  Counts the connections it accepted."""

    def __init__(self, answer: bytes, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while data := conn.recv(65536):
                buffer += data
                while True:
                    try:
                        command, end = resp.parse(buffer, 0)
                    except resp.Incomplete:
                        break
                    buffer = buffer[end:]
                    name = command[0].upper()
                    if name == b"HELLO":  # redis-py 8's handshake (it asks for RESP3)
                        conn.sendall(b"%%1\r\n$5\r\nproto\r\n:%b\r\n" % command[1])
                        continue
                    if name != b"GET":
                        conn.sendall(b"+OK\r\n")
                        continue
                    conn.sendall(self.answer)
                    if self.close_after:
                        return

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("hiredis_reader", [True, False], ids=["hiredis", "python reader"])
@pytest.mark.parametrize(
    ("answer", "close_after", "raised"),
    [
        (b"hello there\r\n", False, InvalidResponse),  # not RESP at all
        (b"$1\r\na\r\n$1\r\nb\r\n", False, InvalidResponse),  # two replies to one GET
        (b"$10\r\nabc", True, RedisConnectionError),  # cut off mid-reply
    ],
    ids=["not-resp", "a-reply-too-many", "cut-off"],
)
def test_a_peer_that_answers_wrongly_gets_an_error_and_its_connection_dropped(
    answer: bytes,
    close_after: bool,
    raised: type[Exception],
    hiredis_reader: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lane's own reads refuse what is not exactly one reply per command, and never
    keep a connection that could hand a later command someone else's bytes."""
    if not hiredis_reader:
        without_hiredis(monkeypatch)
    peer = MisbehavingServer(answer, close_after=close_after)
    client = redis.Redis(
        host="127.0.0.1", port=peer.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    lane = make_lane(client)
    try:
        for attempt in (1, 2):
            with pytest.raises(raised):
                lane.execute("GET", "key")
            (wire,) = lane._idle
            assert wire.connection._sock is None  # dropped, not kept for the next command
            assert peer.accepted == attempt  # each command on a connection of its own
    finally:
        lane.close()
        client.close()
        peer.close()


@pytest.mark.parametrize(
    "reader", ["hiredis", "python reader", "hiredis before 3.2"], ids=lambda r: r
)
def test_resp3_false_and_push_messages_are_not_taken_for_replies(
    reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over RESP3 (redis-py 8's default) a reply may be ``false``, and a server may
    send a push message (a maintenance notice) before or after a reply: the lane
    returns the reply itself, and after a push it connects afresh.  A hiredis before
    3.2 gives a push as a plain list, the same as a reply: the lane then reads with
    its own reader even where redis-py uses hiredis."""
    if reader == "python reader":
        without_hiredis(monkeypatch)
    elif reader == "hiredis before 3.2":
        monkeypatch.setattr(redis_lane, "_HIREDIS_KNOWS_PUSHES", False)
        monkeypatch.setattr(redis_lane, "_PUSHES", (resp.Push,))
    cases = [
        (b"#f\r\n", False, 1),
        (b">2\r\n$6\r\nnotice\r\n$2\r\nhi\r\n$2\r\nok\r\n", b"ok", 2),
        (b"$2\r\nok\r\n>2\r\n$6\r\nnotice\r\n$2\r\nhi\r\n", b"ok", 2),
        (b"$2\r\nok\r\n>2\r\n$6\r\nnot", b"ok", 2),  # a notice still coming
    ]
    for answer, wanted, connections in cases:
        peer = MisbehavingServer(answer)
        client = redis.Redis(host="127.0.0.1", port=peer.port, socket_timeout=1, protocol=3)
        lane = make_lane(client)
        try:
            assert lane.execute("GET", "key") == wanted
            if reader == "hiredis before 3.2":
                assert all(isinstance(w.reader, resp.Reader) for w in lane._idle)
            assert lane.execute("GET", "key") == wanted
            assert peer.accepted == connections, answer
        finally:
            lane.close()
            client.close()
            peer.close()


def test_exchanges_on_two_servers_finish_apart(target: Target, lane: Lane) -> None:
    """start() sends and returns; finish() reads.  A server that cannot be reached
    fails its own exchange only, and its connection still goes back on the stack."""
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    nowhere = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    dead = make_lane(nowhere)
    try:
        good = lane.start([("GET", key), ("HGET", key, "field")])
        bad = dead.start([("GET", key)])
        with pytest.raises(RedisConnectionError):
            bad.finish()
        value, error = good.finish()
        assert value == b"value" and isinstance(error, ResponseError)
        assert len(dead) == 1 and len(lane) == 1
        assert lane.execute("GET", key) == b"value"
    finally:
        dead.close()
        nowhere.close()


def lane_sockets(lane: Lane) -> list[socket.socket]:
    return [wire.connection._sock for wire in lane._idle]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel timeouts: Linux only")
def test_a_plain_socket_keeps_its_timeout_in_the_kernel(target: Target, lane: Lane) -> None:
    """No poll() before each send and receive: the socket blocks, and the kernel
    holds the connection's timeout.  Sentinel connections go through redis-py's
    own send and read, and keep Python's timeout."""
    assert lane.execute("PING") == b"PONG"
    (sock,) = lane_sockets(lane)
    if isinstance(target.client.connection_pool, SentinelConnectionPool):
        assert sock.gettimeout() == TIMEOUT
        return
    assert sock.gettimeout() is None
    limit = struct.pack("@ll", 0, round(TIMEOUT * 1_000_000))
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        assert sock.getsockopt(socket.SOL_SOCKET, option, len(limit)) == limit


def lane_wire(lane: Lane) -> Any:
    (wire,) = lane._idle
    return wire


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="blocking sockets: Linux only")
def test_a_quick_reply_is_polled_for_and_a_slow_one_slept_for(target: Target) -> None:
    """A reply that comes within the polling time is taken without sleeping (a hit); a
    wait that outlasts it sleeps in recv and gets its reply all the same (a miss), and
    the next waits skip the polling: one after the first miss, then twice as many after
    each miss in a row, until a hit starts it all over."""
    lane = make_lane(target.client, busy_poll_us=1000)
    key, empty = f"{target.prefix}a", f"{target.prefix}empty"
    try:
        assert lane.execute("SET", key, "value") == b"OK"
        wire = lane_wire(lane)
        if isinstance(target.client.connection_pool, SentinelConnectionPool):
            # Through redis-py's own read (it must see READONLY replies): never polled.
            assert lane.execute("GET", key) == b"value"
            assert (wire.pollable, wire.polling.hits, wire.polling.misses) == (False, 0, 0)
            return
        assert wire.pollable
        for _ in range(50):
            assert lane.execute("GET", key) == b"value"
        assert wire.polling.hits > wire.polling.misses  # loopback Redis: within a millisecond
        # Counted afresh from here, and never crowded: the sequence below is the backoff's.
        polling = wire.polling = PollBackoff(crowded=lambda: False)
        skipped = []
        for _ in range(7):  # each BLPOP's nil comes after 50 ms: no poll waits that long
            assert lane.execute("BLPOP", empty, 0.05) is None
            skipped.append(polling.skip)
        # missed (skip 1), skipped, missed (skip 2), skipped twice, missed (skip 4), ...
        assert (polling.misses, skipped) == (3, [1, 0, 2, 1, 0, 4, 3])
        while polling.skip:
            assert lane.execute("GET", key) == b"value"  # skipped: no poll, no miss
        assert polling.misses == 3
        # Polling again, and a hit starts the count over.  Checked right at the first hit:
        # a later stray miss (a 1 ms hiccup of the machine) would double it again.
        for _ in range(20):
            hits = polling.hits
            assert lane.execute("GET", key) == b"value"
            if polling.hits > hits:
                break
        assert polling.hits > 0 and polling.backoff == 1
    finally:
        lane.close()


@contextlib.contextmanager
def cpus_crowded() -> Iterator[None]:
    """Three busy processes per CPU for the duration: every runnable thread, this one
    included, then waits for a CPU about two thirds of the time."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(3 * (os.cpu_count() or 1))
    ]
    try:
        time.sleep(0.1)
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


@pytest.mark.skipif(not os.path.exists(base.SCHEDSTAT), reason="no per-thread schedstat")
def test_a_worker_crowded_off_the_cpus_sleeps_instead_of_polling(target: Target) -> None:
    """While the thread waits for a CPU more than half the time (more busy processes
    than CPUs), its waits for replies are not polled: polling would take a CPU that
    another worker or the Redis server needs.  Once the CPUs are free again, it polls."""
    lane = make_lane(target.client, busy_poll_us=1000)
    key = f"{target.prefix}crowded"
    try:
        assert lane.execute("SET", key, "value") == b"OK"
        wire = lane_wire(lane)
        if not wire.pollable:  # through redis-py's own read: never polled
            return
        polling = wire.polling = PollBackoff()
        with cpus_crowded():
            deadline = time.monotonic() + 10
            while polling.crowds < 20 and time.monotonic() < deadline:
                assert lane.execute("GET", key) == b"value"
        assert polling.crowds >= 20
        hits = polling.hits
        deadline = time.monotonic() + 10
        while polling.hits < hits + 20 and time.monotonic() < deadline:
            assert lane.execute("GET", key) == b"value"
        assert polling.hits >= hits + 20  # polled again
    finally:
        lane.close()


def test_crowding_is_judged_from_the_threads_own_wait_for_a_cpu() -> None:
    """cpu_crowded() is the share of the last ~20 ms that this thread spent waiting in a
    run queue: high with three busy processes per CPU, low without them."""
    if not os.path.exists(base.SCHEDSTAT):
        pytest.skip("no per-thread schedstat")

    def share(seconds: float) -> float:
        seen = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            seen.append(base.cpu_crowded())
        return sum(seen) / len(seen)

    share(0.05)  # the first look only starts the count
    with cpus_crowded():
        crowded = share(1.0)
    alone = share(1.0)
    assert crowded > 0.5, crowded
    assert alone < 0.2, alone


def test_without_schedstat_a_thread_is_never_crowded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel keeps no per-thread statistics (not Linux), polling goes on as
    configured, and the file is not looked for again on every wait."""
    monkeypatch.setattr(base, "SCHEDSTAT", "/nonexistent/schedstat")
    seen: list[tuple[bool, object, float]] = []

    def look() -> None:  # a new thread: its own state
        first = base.cpu_crowded()
        seen.append((first, base._crowding.stat, base._crowding.until_ns))

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    assert seen == [(False, None, float("inf"))]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_greenlets_of_one_thread_share_its_schedstat_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under gevent or eventlet, threading.local is per greenlet, so every request has
    a state of its own; they share their kernel thread's one open file, not one each."""
    if not os.path.exists(base.SCHEDSTAT):
        pytest.skip("no per-thread schedstat")
    base.cpu_crowded()
    before = open_fds()
    states = []
    for _ in range(20):  # twenty greenlets' states, alive at once
        state = base._Crowding()
        monkeypatch.setattr(base, "_crowding", state)
        assert base.cpu_crowded() is False  # a first look: nothing to compare with yet
        states.append(state)
    assert len({id(state.stat) for state in states}) == 1
    assert open_fds() <= before + 1


def test_a_threads_schedstat_file_is_closed_when_the_thread_ends() -> None:
    """A thread per request (Flask's development server) must not leave a file each."""
    if not os.path.exists(base.SCHEDSTAT):
        pytest.skip("no per-thread schedstat")
    base.cpu_crowded()
    before, held = open_fds(), len(base._files)
    for _ in range(200):
        thread = threading.Thread(target=base.cpu_crowded)
        thread.start()
        thread.join()
    assert (open_fds(), len(base._files)) == (before, held)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_worker_reads_its_own_schedstat() -> None:
    """gunicorn forks its workers: a child must not go on reading its parent's thread."""
    if not os.path.exists(base.SCHEDSTAT):
        pytest.skip("no per-thread schedstat")
    base.cpu_crowded()
    parent = base._crowding.stat
    assert parent is not None and parent.pid == os.getpid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whose statistics it reads, then leave at once
        code = 1
        try:
            base._crowding.until_ns = 0
            base.cpu_crowded()
            stat = base._crowding.stat
            code = 0 if stat is not None and stat.pid == os.getpid() else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"\x00"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert base._crowding.stat is parent  # the parent's own is untouched


def test_no_polling_when_it_is_off(target: Target) -> None:
    lane = make_lane(target.client, busy_poll_us=0)
    try:
        key = f"{target.prefix}a"
        assert lane.execute("SET", key, "value") == b"OK"
        for _ in range(10):
            assert lane.execute("GET", key) == b"value"
        wire = lane_wire(lane)
        assert not wire.pollable
        assert (wire.polling.hits, wire.polling.misses) == (0, 0)
    finally:
        lane.close()


def test_redis_pys_health_check_works_on_the_lanes_sockets(target: Target) -> None:
    """redis-py's own PING (a health check when due) reads the socket the lane tuned."""
    pool = target.client.connection_pool
    client = redis.Redis(
        connection_pool=type(pool)(
            **{**pool.connection_kwargs, "health_check_interval": 0.05},
            **(
                {"service_name": pool.service_name, "sentinel_manager": pool.sentinel_manager}
                if isinstance(pool, SentinelConnectionPool)
                else {}
            ),
        )
    )
    lane = make_lane(client)
    try:
        key = f"{target.prefix}a"
        assert lane.execute("SET", key, "value") == b"OK"
        first = connection_id(lane)
        before = target.admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
        time.sleep(0.1)  # the health check is due
        assert lane.execute("GET", key) == b"value"
        after = target.admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
        assert after > before  # the PING was sent, and its reply read by redis-py
        assert connection_id(lane) == first  # on the same connection, still in step
    finally:
        lane.close()
        client.close()


def redis_py_clock(monkeypatch: pytest.MonkeyPatch, clock: Any) -> None:
    """Make redis-py's health checks keep time by ``clock``: redis-py 5 compares
    ``time()`` (``from time import time``), later releases ``time.monotonic()``."""
    found = redis.connection.time  # type: ignore[attr-defined]
    if isinstance(found, types.ModuleType):
        monkeypatch.setattr(
            redis.connection, "time", types.SimpleNamespace(**{**vars(time), "monotonic": clock})
        )
    else:
        monkeypatch.setattr(redis.connection, "time", clock)


@pytest.mark.parametrize(
    "clock", [time.monotonic, time.time], ids=["monotonic clock", "wall clock (redis-py 5)"]
)
def test_a_health_check_is_sent_only_when_due_whatever_clock_redis_py_keeps(
    target: Target, monkeypatch: pytest.MonkeyPatch, clock: Any
) -> None:
    """The store's client checks a connection's health every so often (a PING when
    it has been idle that long), not before every command: on redis-py 5, whose clock
    is the wall clock, the lane once sent a PING before each command, two round trips
    a session read.  At most one PING here, for the new connection."""
    redis_py_clock(monkeypatch, clock)
    pool = target.client.connection_pool
    assert pool.connection_kwargs["health_check_interval"] > 5  # as the store sets it
    lane = make_lane(target.client)
    try:
        key = f"{target.prefix}a"
        lane.execute("SET", key, "value")
        before = target.admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
        for _ in range(50):
            assert lane.execute("GET", key) == b"value"
        after = target.admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
        assert after - before <= 1
    finally:
        lane.close()


class _Moved(ResponseError):
    """What the parser that a connection gets when it connects makes of WRONGTYPE."""


def test_an_error_reply_is_raised_as_the_connections_parser_makes_it_when_it_comes(
    redis_server: RedisServer,
) -> None:
    """redis-py 5's Cluster client gives each node's connection the parser that knows
    MOVED and ASK when it connects, after the lane made its reader; the lane must raise
    what that parser makes of an error reply (the store follows a MovedError to the
    slot's new node), not what the parser the connection was made with would."""

    def on_connect(connection: Any) -> None:
        connection.set_parser(ClusterLike)
        connection.on_connect()

    client = redis.Redis.from_url(redis_server.url, redis_connect_func=on_connect)
    made: Any = client.connection_pool.make_connection()
    parser_class = type(made._parser)

    class ClusterLike(parser_class):  # type: ignore[valid-type, misc]
        EXCEPTION_CLASSES: ClassVar[dict[str, Any]] = {
            **parser_class.EXCEPTION_CLASSES,
            "WRONGTYPE": _Moved,
        }

    lane = make_lane(client)
    key = f"{redis_server.prefix}lane:{secrets.token_hex(4)}:list"
    try:
        assert lane.execute("SET", key, "text") == b"OK"
        with pytest.raises(_Moved):
            lane.execute("LPUSH", key, "item")
        assert lane.execute("GET", key) == b"text"  # still in step
    finally:
        lane.close()
        client.delete(key)
        client.close()


@pytest.mark.usefixtures("no_collector_pauses")  # it bounds a wait by 0.5 s more
def test_a_timed_out_reply_is_never_read_by_the_next_command(target: Target, lane: Lane) -> None:
    """The server answers the BLPOP after the client gave up; were the connection
    used again, the next GET would read that late nil instead of its own reply."""
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    before = connection_id(lane)
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError):
        lane.execute("BLPOP", f"{target.prefix}empty", TIMEOUT * 2)
    assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT * 2  # the socket's timeout
    time.sleep(TIMEOUT * 2)  # the late reply has been sent by now
    assert lane.execute("GET", key) == b"value"
    assert connection_id(lane) != before


def test_a_connection_killed_by_the_server_is_replaced_once(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    killed = connection_id(lane)
    assert target.admin.client_kill_filter(_id=str(killed)) == 1
    assert lane.execute("GET", key) == b"value"  # retried on a new connection
    assert connection_id(lane) != killed


def test_a_forked_child_never_uses_the_parents_connection(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    parent = connection_id(lane)
    context = multiprocessing.get_context("fork")
    out = context.Queue()

    def child() -> None:
        out.put((connection_id(lane), lane.execute("GET", key), len(lane)))
        lane.close()

    process = context.Process(target=child)
    process.start()
    process.join(20)
    assert process.exitcode == 0
    child_id, value, idle = out.get(timeout=5)
    assert child_id != parent and value == b"value" and idle == 1
    # The parent's connection is still open, still its own and still in step.
    assert connection_id(lane) == parent
    assert lane.execute("GET", key) == b"value"


def test_threads_share_a_lane(target: Target, lane: Lane) -> None:
    threads = 8
    for n in range(threads):
        lane.execute("SET", f"{target.prefix}{n}", str(n))
    wrong: list[tuple[int, object]] = []
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        start.wait()
        for _ in range(300):
            value = lane.execute("GET", f"{target.prefix}{n}")
            if value != str(n).encode():
                wrong.append((n, value))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert wrong == []
    assert 1 <= len(lane) <= threads  # a connection per command in flight at most


def test_close_disconnects_and_a_later_command_connects_again(target: Target, lane: Lane) -> None:
    key = f"{target.prefix}a"
    closed = connection_id(lane)
    lane.close()
    assert len(lane) == 0
    time.sleep(0.1)
    assert closed not in {int(c["id"]) for c in target.admin.client_list()}
    lane.execute("SET", key, "value")
    assert lane.execute("GET", key) == b"value"


def test_a_connection_in_use_when_the_lane_closes_is_closed_when_it_comes_back(
    target: Target, lane: Lane
) -> None:
    """As when redis-py drops a Cluster node's client while a command is on its way on
    that node's lane: the lane is closed then, and no socket may outlive it."""
    key = f"{target.prefix}a"
    lane.execute("SET", key, "value")
    in_use = lane.start([("CLIENT", "ID"), ("GET", key)])
    lane.close()
    reply = in_use.finish()
    assert reply[1] == b"value"  # the command in flight still gets its reply
    assert len(lane) == 0
    time.sleep(0.1)
    assert reply[0] not in {int(c["id"]) for c in target.admin.client_list()}
    assert lane.execute("GET", key) == b"value"  # and the lane works on
    assert len(lane) == 1


def test_clients_that_must_see_every_command_get_no_lane(redis_server: RedisServer) -> None:
    """A single-connection client keeps its one connection, and a blocking pool its cap
    on connections; the store still works with both."""
    prefix = f"{redis_server.prefix}lane:{secrets.token_hex(4)}:"
    blocking = redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=1)
    clients = [
        redis.Redis.from_url(redis_server.url, single_connection_client=True),
        redis.Redis(connection_pool=blocking),
    ]
    try:
        for client in clients:
            assert lane_for(client) is None
            store = RedisStore(client, prefix=prefix)
            assert store._lane is None
            record = Record(secrets.token_hex(16), "alice", NOW + 60, 1, b"{}")
            assert store.save(record, expected=None, now=NOW)
            assert store.load(record.key) == record
            assert [r.key for r in store.user_records("alice", now=NOW)] != []
            store.close()
        assert len(blocking._connections) == 1  # the cap held
    finally:
        for client in clients:
            client.close()
        blocking.disconnect()
        flush_prefix(redis_server.url, prefix)


def test_a_cluster_store_with_a_stale_slot_table_still_lands_every_write(
    redis_cluster: RedisClusterServer,
) -> None:
    """Lanes send by redis-py's slot table; when it is wrong (slots moved), the node
    answers MOVED and the command goes again through the Cluster client, which follows
    the redirection.  Both halves of a logged-in write (record and index, on two
    nodes) are sent on the wrong nodes here."""
    prefix = f"{redis_cluster.prefix}lane:{secrets.token_hex(4)}:"
    store = open_redis_store(
        redis_cluster.url, prefix=prefix, timeout=2.0, wait_replicas=0, client_cache=0
    )
    assert isinstance(store, RedisStore)
    try:
        client = store.client
        key = secrets.token_hex(16)
        home = client.get_node_from_key(store.record_name(key)).name
        user = next(  # a user whose index lives on another node than the record
            u
            for u in (f"user{n}" for n in range(1000))
            if client.get_node_from_key(store.index_key(u)).name != home
        )
        record = Record(key, user, NOW + 60, 1, b"{}")
        names = [store.record_name(record.key), store.index_key(user)]
        owners = [client.get_node_from_key(name) for name in names]
        primaries = client.get_primaries()
        table = client.nodes_manager.slots_cache
        for name, owner in zip(names, owners, strict=True):
            wrong = next(p for p in primaries if p.name != owner.name)
            table[client.keyslot(name)] = [wrong]
        assert [client.get_node_from_key(n).name for n in names] != [o.name for o in owners]

        assert store.save(record, expected=None, now=NOW)
        assert store.load(record.key) == record
        assert [r.key for r in store.user_records(user, now=NOW)] == [record.key]
        for name, owner in zip(names, owners, strict=True):  # on their real owners
            assert client.get_redis_connection(owner).exists(name) == 1
    finally:
        store.close()
        flush_prefix(redis_cluster.url, prefix)


def test_the_store_polls_as_configured(
    redis_server: RedisServer, redis_cluster: RedisClusterServer
) -> None:
    """CLOAKROOM_BUSY_POLL reaches every lane of the store (a Cluster's node lanes
    too); 0 turns polling off; a value out of range fails at start-up, naming the key."""
    prefix = f"{redis_server.prefix}lane:{secrets.token_hex(4)}:"
    for micros in (250, 0):
        app = Flask(__name__)
        app.config.update(
            SECRET_KEY="s" * 32,
            CLOAKROOM_STORE=redis_server.url,
            CLOAKROOM_REDIS_PREFIX=prefix,
            CLOAKROOM_BUSY_POLL=micros,
        )
        Cloakroom(app)
        store = app.extensions["cloakroom"].store
        assert isinstance(store, RedisStore) and store._lane is not None
        try:
            assert store.load(secrets.token_hex(16)) is None
            wire = lane_wire(store._lane)
            assert (wire.busy_poll, wire.pollable) == (micros / 1_000_000, micros > 0)
        finally:
            store.close()
    cluster = open_redis_store(
        redis_cluster.url, prefix=prefix, timeout=1.0, wait_replicas=0, busy_poll_us=250
    )
    assert isinstance(cluster, RedisStore)
    try:
        for n in range(30):  # keys on every node, most likely
            assert cluster.load(f"{n:032x}") is None
        lanes = [lane for _, lane in cluster._node_lanes.values()]
        assert lanes and all(lane_wire(lane).busy_poll == 250 / 1_000_000 for lane in lanes)
    finally:
        cluster.close()
    bad: Any
    for bad in (-1, 1001, 50.0, True, "50"):
        with pytest.raises(ConfigError, match="CLOAKROOM_BUSY_POLL"):
            RedisStore(redis.Redis(), busy_poll_us=bad)
