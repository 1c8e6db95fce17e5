"""Store behaviour beyond the contract: file paths, SQL schema and engines."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import create_engine, inspect

from flask_cloakroom import Cloakroom, StoreError
from flask_cloakroom.stores import Record
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.sql import SQLStore

from .conftest import add_views


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "/etc/passwd", "..", "", "a" * 32 + "/../x", "ABCDEF" * 6, "0" * 31],
)
def test_file_store_refuses_keys_that_are_not_hashes(tmp_path: Path, key: str) -> None:
    store = FileStore(str(tmp_path / "s"))
    assert store.load(key) is None
    assert store.delete(key) is False
    with pytest.raises(StoreError, match="not a store key"):
        store.save(Record(key, None, 1e10, 1, b"x"), expected=None, now=0)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"records", "users", "events"}


def test_file_store_keeps_user_ids_out_of_paths(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "s"))
    user = "../../../tmp/evil\x00name"
    record = Record("ab" + "0" * 30, user, 1e10, 1, b"x")
    assert store.save(record, expected=None, now=0)
    names = [p.name for p in (tmp_path / "s").rglob("*")]
    assert all("evil" not in n and ".." not in n for n in names)
    assert [r.user_id for r in store.user_records(user, now=0)] == [user]


def test_file_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "s"), durable=True)
    key = "cd" + "1" * 30
    store.save(Record(key, "u", 1e10, 1, b"one"), expected=None, now=0)
    store.save(Record(key, "u", 1e10, 2, b"two"), expected=1, now=0)
    leftovers = list((tmp_path / "s").rglob(".tmp-*"))
    assert leftovers == []
    loaded = store.load(key)
    assert loaded is not None
    assert loaded.payload == b"two"


def test_sql_store_creates_its_table_with_indexes(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    store = SQLStore(engine, table="my_sessions")
    assert store.count(now=0) == 0
    inspector = inspect(engine)
    assert inspector.get_pk_constraint("my_sessions")["constrained_columns"] == ["key"]
    indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("my_sessions")}
    assert {("user_id",), ("expires_at",)} <= indexed


def test_an_engine_can_be_the_store(tmp_path: Path) -> None:
    """Flask-SQLAlchemy users pass their engine; Cloakroom adds its table to that database."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_STORE=engine)
    add_views(app, Cloakroom(app))
    client = app.test_client()
    client.post("/set/x", json=[1, 2])
    assert client.get("/get/x").get_json() == {"value": [1, 2]}
    assert "cloakroom_sessions" in inspect(engine).get_table_names()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = SQLStore(create_engine(f"sqlite:///{tmp_path / 'w.db'}"))
    store.count(now=0)
    assert os.path.exists(tmp_path / "w.db-wal")


def _expired_records(store: SQLStore, count: int) -> None:
    for i in range(count):
        store.save(Record(f"{i:032x}", None, 10.0, 1, b"{}"), expected=None, now=0)


def test_sql_purge_rests_between_batches(tmp_path: Path) -> None:
    """``purge_pause`` makes a purge of a backlog work a fraction of the time."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    flat_out = SQLStore(create_engine(url), table="flat", purge_pause=0)
    paced = SQLStore(create_engine(url), table="paced", purge_pause=20)
    timings: dict[str, float] = {}
    for name, store in (("flat", flat_out), ("paced", paced)):
        _expired_records(store, 12)
        started = time.monotonic()
        assert store.purge_expired(now=100, batch_size=2) == 12
        timings[name] = time.monotonic() - started
        assert store.count_expired(now=100) == 0
    # Five rests of 20 times a batch's work: far longer than the work itself.
    assert timings["paced"] > 5 * timings["flat"], timings


@pytest.mark.parametrize("pause", [-1.0, float("nan"), float("inf")])
def test_sql_purge_pause_must_be_a_finite_number_at_least_zero(
    tmp_path: Path, pause: float
) -> None:
    with pytest.raises(ValueError, match="purge_pause"):
        SQLStore(create_engine(f"sqlite:///{tmp_path / 'v.db'}"), purge_pause=pause)
