"""Configuration mistakes fail at init_app with a message naming the key and the fix."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_cloakroom import Cloakroom, ConfigError
from flask_cloakroom.settings import OPTIONS, load_settings
from flask_cloakroom.stores.memory import MemoryStore
from flask_cloakroom.stores.sql import SQLStore


def init(tmp_path: Path, **config: Any) -> Flask:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_STORE="memory://")
    app.config.update(config)
    Cloakroom(app)
    return app


@pytest.mark.parametrize(
    ("config", "key", "words"),
    [
        (
            {"CLOAKROOM_IDLE_TIMOUT": 5},
            "CLOAKROOM_IDLE_TIMOUT",
            "Did you mean CLOAKROOM_IDLE_TIMEOUT",
        ),
        ({"CLOAKROOM_WHATEVER": 1}, "CLOAKROOM_WHATEVER", "not a Flask-Cloakroom setting"),
        ({"CLOAKROOM_IDLE_TIMEOUT": "30m"}, "CLOAKROOM_IDLE_TIMEOUT", "timedelta"),
        ({"CLOAKROOM_IDLE_TIMEOUT": True}, "CLOAKROOM_IDLE_TIMEOUT", "timedelta"),
        ({"CLOAKROOM_IDLE_TIMEOUT": 0}, "CLOAKROOM_IDLE_TIMEOUT", "longer than zero"),
        ({"CLOAKROOM_IDLE_TIMEOUT": -5}, "CLOAKROOM_IDLE_TIMEOUT", "zero or more"),
        (
            {"CLOAKROOM_ABSOLUTE_TIMEOUT": float("nan")},
            "CLOAKROOM_ABSOLUTE_TIMEOUT",
            "zero or more",
        ),
        (
            {"CLOAKROOM_IDLE_TIMEOUT": timedelta(hours=2), "CLOAKROOM_ABSOLUTE_TIMEOUT": 3600},
            "CLOAKROOM_IDLE_TIMEOUT",
            "never apply",
        ),
        (
            {"CLOAKROOM_REMEMBER_IDLE_TIMEOUT": timedelta(days=60)},
            "CLOAKROOM_REMEMBER_IDLE_TIMEOUT",
            "never apply",
        ),
        ({"CLOAKROOM_TOUCH_INTERVAL": 1000}, "CLOAKROOM_TOUCH_INTERVAL", "at most half"),
        ({"CLOAKROOM_MAX_RECORD_SIZE": "64k"}, "CLOAKROOM_MAX_RECORD_SIZE", "whole number"),
        ({"CLOAKROOM_MAX_RECORD_SIZE": 0}, "CLOAKROOM_MAX_RECORD_SIZE", "whole number"),
        ({"CLOAKROOM_DECODED_CACHE_SIZE": -1}, "CLOAKROOM_DECODED_CACHE_SIZE", "zero or more"),
        ({"CLOAKROOM_DECODED_CACHE_SIZE": True}, "CLOAKROOM_DECODED_CACHE_SIZE", "zero or more"),
        ({"CLOAKROOM_SQL_TABLE": "x; drop table"}, "CLOAKROOM_SQL_TABLE", "letters, digits"),
        ({"CLOAKROOM_STORE": 42}, "CLOAKROOM_STORE", "store URL"),
        ({"CLOAKROOM_STORE": "nosuch://x"}, "CLOAKROOM_STORE", "not a known store"),
        # Found by tests/test_fuzz.py: these raised SQLAlchemy's own errors.
        ({"CLOAKROOM_STORE": "0://:"}, "CLOAKROOM_STORE", "malformed"),
        ({"CLOAKROOM_STORE": "sqlite://"}, "CLOAKROOM_STORE", "in-memory SQLite"),
        ({"CLOAKROOM_STORE": "sqlite:///:memory:"}, "CLOAKROOM_STORE", "in-memory SQLite"),
        ({"CLOAKROOM_STORE": "sqlite://0"}, "CLOAKROOM_STORE", "names no host"),
        ({"CLOAKROOM_STORE": "file://relative/dir"}, "CLOAKROOM_STORE", "absolute path"),
        (
            {"CLOAKROOM_STORE": "sqlite:////no/such/folder/s.db"},
            "CLOAKROOM_STORE",
            "folder of the SQLite file does not exist",
        ),
        (
            {"CLOAKROOM_STORE": "postgresql+asyncpg://localhost/x"},
            "CLOAKROOM_STORE",
            "driver",
        ),
        ({"CLOAKROOM_ON_STORE_ERROR": "503"}, "CLOAKROOM_ON_STORE_ERROR", "callable"),
        ({"CLOAKROOM_RETRY_AFTER": 1.5}, "CLOAKROOM_RETRY_AFTER", "whole number"),
        ({"CLOAKROOM_BUSY_POLL": 2.5}, "CLOAKROOM_BUSY_POLL", "whole number"),
        ({"CLOAKROOM_BUSY_POLL": "50"}, "CLOAKROOM_BUSY_POLL", "whole number"),
        ({"CLOAKROOM_BUSY_POLL": -1}, "CLOAKROOM_BUSY_POLL", "from 0 (never poll"),
        ({"CLOAKROOM_BUSY_POLL": 1001}, "CLOAKROOM_BUSY_POLL", "to 1000 micro"),
        ({"CLOAKROOM_PURGE_PACE": "slow"}, "CLOAKROOM_PURGE_PACE", "expected a number"),
        ({"CLOAKROOM_PURGE_PACE": True}, "CLOAKROOM_PURGE_PACE", "expected a number"),
        ({"CLOAKROOM_PURGE_PACE": -1}, "CLOAKROOM_PURGE_PACE", "from 0 (no rest) to 100"),
        ({"CLOAKROOM_PURGE_PACE": 101}, "CLOAKROOM_PURGE_PACE", "from 0 (no rest) to 100"),
        (
            {"CLOAKROOM_PURGE_PACE": float("nan")},
            "CLOAKROOM_PURGE_PACE",
            "from 0 (no rest) to 100",
        ),
        ({"SECRET_KEY": None}, "SECRET_KEY", "secrets.token_hex"),
        ({"SECRET_KEY": ""}, "SECRET_KEY", "is not set"),
        ({"SECRET_KEY_FALLBACKS": "old"}, "SECRET_KEY_FALLBACKS", "list"),
        ({"SESSION_COOKIE_NAME": "bad name"}, "SESSION_COOKIE_NAME", "not a valid cookie name"),
        ({"SESSION_COOKIE_SAMESITE": "lax-ish"}, "SESSION_COOKIE_SAMESITE", "'Strict'"),
        ({"SESSION_COOKIE_SAMESITE": "None"}, "SESSION_COOKIE_SECURE", "SameSite=None"),
        ({"SESSION_COOKIE_PARTITIONED": True}, "SESSION_COOKIE_SECURE", "partitioned"),
        (
            {"SESSION_COOKIE_NAME": "__Host-s", "SESSION_COOKIE_DOMAIN": "example.com"},
            "SESSION_COOKIE_DOMAIN",
            "__Host-",
        ),
        (
            {"SESSION_COOKIE_NAME": "__Host-s", "SESSION_COOKIE_PATH": "/app"},
            "SESSION_COOKIE_PATH",
            "Path=/",
        ),
    ],
)
def test_bad_config_fails_at_init_naming_the_key(
    tmp_path: Path, config: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        init(tmp_path, **config)
    assert caught.value.key == key
    assert str(caught.value).startswith(key)
    assert words in str(caught.value)


def test_store_given_twice(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s" * 32, CLOAKROOM_STORE="memory://")
    with pytest.raises(ConfigError, match="keep one of them"):
        Cloakroom(app, store=MemoryStore())


def test_default_store_is_sqlite_in_the_instance_folder(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(SECRET_KEY="s" * 32)
    Cloakroom(app)
    store = app.extensions["cloakroom"].store
    assert isinstance(store, SQLStore)
    assert store.name == "sqlite"

    @app.get("/")
    def index() -> str:
        from flask import session

        session["x"] = 1
        return "ok"

    app.test_client().get("/")
    assert (tmp_path / "instance" / "cloakroom.sqlite3").exists()


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"SECRET_KEY": "s"})
    assert settings.idle_timeout == 1800
    assert settings.absolute_timeout == 12 * 3600
    assert settings.remember_idle_timeout == 14 * 86400
    assert settings.remember_absolute_timeout == 30 * 86400
    assert settings.touch_interval == 60
    assert settings.max_record_size == 65536
    assert settings.cookie.samesite == "Lax"
    assert settings.cookie.httponly is True
    assert settings.cookie.name == "session"


def test_every_option_is_documented() -> None:
    for option in OPTIONS:
        assert option.doc and option.example and option.type
        assert option.key.startswith("CLOAKROOM_")
        # The default passes its own validation.
        option.parse(option.key, option.default)
