"""``flask cloakroom``: every command against real stores, and its error paths."""

from __future__ import annotations

import json
import os
import pty
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient

from flask_cloakroom import Cloakroom, NotSupported
from flask_cloakroom.cli import _with_spinner, cloakroom_group
from flask_cloakroom.crypto import generate_key, parse_key
from flask_cloakroom.stores import Record, Store, open_store
from flask_cloakroom.stores.files import FileStore
from flask_cloakroom.stores.memory import MemoryStore

from .conftest import AppFactory, build_store
from .minimal_store import MinimalStore
from .servers import free_port
from .support import FakeClock, SlowBatch

LAPTOP = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
PHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)
#: Stores whose records the fake clock can expire (Redis expires them by real TTLs).
CLOCKED_STORES = ["memory", "sqlite", "files", "postgres", "mysql"]


def cli(app: Flask, *args: str, input: str | None = None) -> Result:
    return app.test_cli_runner().invoke(args=["cloakroom", *args], input=input)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def signed_in(app: Flask, user: str, agent: str = LAPTOP) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    assert client.post(f"/login/{user}").status_code == 200
    return client


def whoami(client: FlaskClient) -> str | None:
    user: str | None = client.get("/whoami").get_json()["user"]
    return user


def handles(app: Flask, user: str) -> dict[str, str]:
    """The user's sessions as ``{device: handle}``, read through the CLI."""
    sessions = as_json(cli(app, "list", "--user", user, "--json"))["sessions"]
    return {s["device"]: s["handle"] for s in sessions}


# -- list, show, revoke on every store ---------------------------------------------------


def test_list_show_revoke_and_activity(logging_store: Store, make_app: AppFactory) -> None:
    app, _, _ = make_app(logging_store)
    laptop = signed_in(app, "alice", LAPTOP)
    phone = signed_in(app, "alice", PHONE)
    signed_in(app, "bob", LAPTOP)

    everyone = as_json(cli(app, "list", "--json"))
    assert sorted(s["user_id"] for s in everyone["sessions"]) == ["alice", "alice", "bob"]
    assert everyone["next_cursor"] is None
    alice = handles(app, "alice")
    assert set(alice) == {"Firefox on Ubuntu", "Mobile Safari on iPhone"}

    table = cli(app, "list")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["HANDLE", "USER", "DEVICE"]
    assert alice["Mobile Safari on iPhone"] in table.stdout
    assert "Firefox on Ubuntu" in table.stdout

    phone_handle = alice["Mobile Safari on iPhone"]
    shown = cli(app, "show", phone_handle)
    assert shown.exit_code == 0, shown.output
    assert "user         alice" in shown.stdout
    assert "Mobile Safari on iPhone" in shown.stdout
    detail = as_json(cli(app, "show", phone_handle, "--json"))
    assert detail["handle"] == phone_handle
    assert detail["ip"] == "127.0.0.1"

    revoked = cli(app, "revoke", phone_handle, "--reason", "lost phone")
    assert revoked.exit_code == 0, revoked.output
    assert f"Revoked session {phone_handle}." in revoked.stdout
    assert whoami(phone) is None  # signed out on its next request
    assert whoami(laptop) == "alice"

    again = cli(app, "revoke", phone_handle)
    assert again.exit_code == 1
    assert "no session has the handle" in again.output
    assert "Traceback" not in again.output

    ended = cli(app, "revoke", "--user", "alice")
    assert ended.exit_code == 0
    assert "Revoked 1 session(s) of user alice." in ended.stdout
    assert whoami(laptop) is None
    assert as_json(cli(app, "list", "--user", "alice", "--json"))["sessions"] == []

    events = as_json(cli(app, "activity", "--user", "alice", "--kind", "revoked", "--json"))
    revocations = events["events"]
    assert sorted(str(e["details"]["reason"]) for e in revocations) == ["None", "lost phone"]
    assert all(e["details"]["by"].startswith("cli:") for e in revocations)


def test_list_pages_through_the_store_with_a_cursor(store: Store, make_app: AppFactory) -> None:
    app, _, _ = make_app(store)
    for n in range(7):
        assert app.test_client().post("/set/n", json=n).status_code == 200
    every = set(handles_of_all(app))
    assert len(every) == 7

    seen: list[str] = []
    #: (cursor given, sessions listed, cursor returned) of each page: this test
    #: failed once in about a hundred runs on Redis, cause unknown; if it fails
    #: again, the message says what each page held.
    pages: list[tuple[str | None, int, str | None]] = []
    cursor: str | None = None
    for _ in range(20):
        args = ["list", "--limit", "3", "--json"]
        if cursor is not None:
            args += ["--cursor", cursor]
        page = as_json(cli(app, *args))
        seen += [s["handle"] for s in page["sessions"]]
        pages.append((cursor, len(page["sessions"]), page["next_cursor"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    stored = len(store.scan(limit=1000)[0])
    assert set(seen) == every, f"pages: {pages}; records in the store now: {stored}"

    first = cli(app, "list", "--limit", "3")
    assert first.exit_code == 0
    assert "More sessions: flask cloakroom list --limit 3 --cursor" in first.output, (
        f"{first.output}\npages: {pages}"
    )


def handles_of_all(app: Flask) -> list[str]:
    page = as_json(cli(app, "list", "--limit", "1000", "--json"))
    return [s["handle"] for s in page["sessions"]]


def test_revoke_all_asks_first_and_then_ends_everything(
    logging_store: Store, make_app: AppFactory
) -> None:
    app, _, _ = make_app(logging_store)
    clients = [signed_in(app, user) for user in ("alice", "bob", "carol")]

    declined = cli(app, "revoke", "--all", input="n\n")
    assert declined.exit_code == 1
    assert "End EVERY session" in declined.output
    assert "Aborted" in declined.output
    assert [whoami(c) for c in clients] == ["alice", "bob", "carol"]

    accepted = cli(app, "revoke", "--all", "--reason", "incident 42", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert "Revoked 3 live session(s)" in accepted.stdout
    assert [whoami(c) for c in clients] == [None, None, None]
    assert as_json(cli(app, "list", "--json"))["sessions"] == []
    events = as_json(cli(app, "activity", "--kind", "revoked", "--json"))["events"]
    assert len(events) == 3
    assert {e["details"]["reason"] for e in events} == {"incident 42"}

    signed_in(app, "dave")
    unattended = cli(app, "revoke", "--all", "--yes")
    assert unattended.exit_code == 0
    assert "Revoked 1 live session(s)" in unattended.stdout


def test_stats_counts_sessions_and_recent_events(
    logging_store: Store, make_app: AppFactory
) -> None:
    app, _, _ = make_app(logging_store)
    signed_in(app, "alice", LAPTOP)
    signed_in(app, "alice", PHONE)  # a new device: an anomaly (notify)
    signed_in(app, "bob")
    stats = as_json(cli(app, "stats", "--json"))
    assert stats["live_sessions"] == 3
    assert stats["ping_ms"] >= 0
    assert stats["store"] == logging_store.describe()
    assert stats["events"]["login"] == {"last_hour": 3, "last_day": 3}
    assert stats["events"]["anomaly"] == {"last_hour": 1, "last_day": 1}
    assert stats["events_capped"] is False

    text = cli(app, "stats")
    assert text.exit_code == 0
    assert "live sessions  3" in text.stdout
    assert "health         up (ping" in text.stdout
    lines = {line.split()[0]: line.split()[1:] for line in text.stdout.splitlines() if line}
    assert lines["logins"] == ["3", "3"]
    assert lines["anomalies"] == ["1", "1"]


def test_a_store_without_an_activity_log_says_so(make_app: AppFactory) -> None:
    app, cloak, _ = make_app(MinimalStore())
    signed_in(app, "alice")
    stats = as_json(cli(app, "stats", "--json"))
    assert stats["live_sessions"] == 1
    assert stats["events"] is None
    assert "this store keeps no activity log" in cli(app, "stats").stdout
    refused = cli(app, "activity")
    assert refused.exit_code == 1
    assert "the minimal store keeps no activity log" in refused.output
    assert as_json(cli(app, "list", "--json"))["sessions"][0]["user_id"] == "alice"
    with app.app_context(), pytest.raises(NotSupported, match="no activity log"):
        cloak.activity()


@pytest.fixture(params=CLOCKED_STORES)
def clocked_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return build_store(request.param, request, tmp_path)


def test_purge_deletes_expired_sessions(
    clocked_store: Store, make_app: AppFactory, clock: FakeClock
) -> None:
    app, _, _ = make_app(clocked_store, CLOAKROOM_IDLE_TIMEOUT=600)
    signed_in(app, "alice")
    signed_in(app, "bob")
    clock.advance(seconds=601)
    fresh = signed_in(app, "carol")
    result = as_json(cli(app, "purge", "--batch-size", "1", "--json"))
    assert result["sessions"] == 2
    assert as_json(cli(app, "list", "--json"))["sessions"][0]["user_id"] == "carol"
    assert whoami(fresh) == "carol"
    text = cli(app, "purge", "--pace", "0")
    assert text.exit_code == 0
    assert text.stdout.startswith("Deleted 0 expired session record(s)")
    refused = cli(app, "purge", "--pace", "-1")
    assert refused.exit_code == 2
    assert "--pace" in refused.output


def test_purge_rests_as_the_config_says_unless_told_otherwise(make_app: AppFactory) -> None:
    slow = SlowBatch()
    app, _, _ = make_app(slow, CLOAKROOM_PURGE_PACE=3)
    assert as_json(cli(app, "purge", "--json"))["sessions"] == 0
    assert cli(app, "purge", "--json", "--pace", "0").exit_code == 0
    rest, none = slow.rests
    assert rest is not None and rest >= 3 * 0.02  # CLOAKROOM_PURGE_PACE = 3
    assert none is None  # --pace 0 wins: no rest
    assert "CLOAKROOM_PURGE_PACE" in cli(app, "purge", "--help").output


def test_purge_shows_its_progress_and_then_the_count(
    clocked_store: Store, make_app: AppFactory, clock: FakeClock
) -> None:
    app, _, counting = make_app(clocked_store, CLOAKROOM_IDLE_TIMEOUT=600)
    for user in ("alice", "bob", "carol"):
        signed_in(app, user)
    clock.advance(seconds=601)
    fresh = signed_in(app, "dave")
    counting.reset()
    result = cli(app, "purge", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Deleted 3 expired session record(s) and 0 old activity")
    assert "Purging" not in result.stdout  # progress goes to stderr only
    assert counting.calls["count_expired"] == 1  # forwarded by the wrapper
    if isinstance(clocked_store, FileStore):
        # No cheap count: a spinner, which stays silent when stderr is not a terminal.
        assert result.stderr == ""
    else:
        # The store counted 3 expired records: a progress bar, which click reduces
        # to its label when stderr is not a terminal.
        assert result.stderr == "Purging expired sessions\n"
    assert whoami(fresh) == "dave"


def test_purge_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    expired = time.time() - 60
    for _ in range(5):
        record = Record(secrets.token_hex(16), None, expired, 1, b"{}")
        assert store.save(record, expected=None, now=expired - 1)
    store.close()
    (tmp_path / "cliapp.py").write_text(
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_cloakroom import Cloakroom

            app = Flask(__name__)
            app.config.update(SECRET_KEY="k" * 32, CLOAKROOM_STORE="{url}")
            Cloakroom(app)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLASK_APP": "cliapp", "COLUMNS": "100"}
    terminal, stderr = pty.openpty()  # stderr is a terminal; stdout a pipe
    try:
        run = subprocess.run(
            [sys.executable, "-m", "flask", "cloakroom", "purge", "--batch-size", "2"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        os.close(stderr)
        drawn = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(terminal)
    screen = drawn.decode()
    assert run.returncode == 0, screen
    assert run.stdout.startswith("Deleted 5 expired session record(s)")
    assert "Purging expired sessions  [" in screen
    assert "40%" in screen  # after the first batch of two
    assert "100%" in screen


# -- activity, keys --------------------------------------------------------------------


def test_activity_filters_and_table(make_app: AppFactory, clock: FakeClock) -> None:
    app, _, _ = make_app()
    signed_in(app, "alice")
    clock.advance(hours=3)
    signed_in(app, "bob")
    recent = as_json(cli(app, "activity", "--since", "1h", "--json"))["events"]
    assert [(e["kind"], e["user_id"]) for e in recent] == [("login", "bob")]
    older = as_json(cli(app, "activity", "--before", "2h", "--json"))["events"]
    assert [(e["kind"], e["user_id"]) for e in older] == [("login", "alice")]
    since_iso = as_json(cli(app, "activity", "--since", "2030-01-01T11:00", "--json"))["events"]
    assert len(since_iso) == 2

    table = cli(app, "activity", "--limit", "1")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["AT", "(UTC)", "KIND"]
    assert "Older events: add --before '2030-01-01T15:00:00+00:00'" in table.output

    assert cli(app, "activity", "--user", "nobody").stdout == "No events.\n"
    bad = cli(app, "activity", "--since", "yesterday-ish")
    assert bad.exit_code == 2
    assert "neither a duration" in bad.output
    assert cli(app, "activity", "--kind", "party").exit_code == 2


def test_keygen_prints_a_valid_key() -> None:
    app = Flask(__name__)  # keygen needs no store and no app context
    app.cli.add_command(cloakroom_group)
    plain = cli(app, "keygen")
    assert plain.exit_code == 0
    key = plain.stdout.strip()
    _, raw = parse_key(key)
    assert len(raw) == 32
    assert "rekey" in plain.output  # the next step, on stderr
    named = cli(app, "keygen", "--id", "2025-a").stdout.strip()
    assert parse_key(named)[0] == "2025-a"
    assert cli(app, "keygen").stdout.strip() != key
    refused = cli(app, "keygen", "--id", "not ok!")
    assert refused.exit_code == 2
    assert "a key id must be" in refused.output


def test_rekey_reports_what_it_rewrote(store: Store, make_app: AppFactory) -> None:
    old, new, lost = generate_key(), generate_key(), generate_key()
    before, _, _ = make_app(store, CLOAKROOM_ENCRYPTION_KEYS=[old])
    signed_in(before, "alice")
    signed_in(before, "bob")
    after, _, _ = make_app(store, CLOAKROOM_ENCRYPTION_KEYS=[new, old])
    first = as_json(cli(after, "rekey", "--json"))
    assert first == {
        "examined": 2,
        "rewritten": 2,
        "current": 0,
        "changed_meanwhile": 0,
        "unreadable": 0,
    }
    second = cli(after, "rekey")
    assert second.exit_code == 0
    assert "already current    2" in second.stdout
    assert "older keys can be removed" in second.stdout

    stranger, _, _ = make_app(store, CLOAKROOM_ENCRYPTION_KEYS=[lost])
    unreadable = cli(stranger, "rekey")
    assert unreadable.exit_code == 0
    assert "unreadable         2" in unreadable.stdout
    assert "open with no configured key" in unreadable.output

    plain, _, _ = make_app(MemoryStore())
    assert "CLOAKROOM_ENCRYPTION_KEYS is not set" in cli(plain, "rekey").stdout


# -- errors ------------------------------------------------------------------------------


def test_handles_are_checked(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    for args in (
        ["show", "xyz"],
        ["revoke", "ABCDEF" * 6],
        ["revoke", "--user", "a", "--keep", "1"],
    ):
        result = cli(app, *args)
        assert result.exit_code == 2, args
        assert "is not a session handle" in result.output
    unknown = cli(app, "show", "0" * 32)
    assert unknown.exit_code == 1
    assert "Error: no live session has the handle 00000000000000000000000000000000" in (
        unknown.output
    )


def test_revoke_needs_exactly_one_target(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    for args in ([], ["0" * 32, "--user", "a"], ["--user", "a", "--all"], ["--keep", "0" * 32]):
        result = cli(app, "revoke", *args)
        assert result.exit_code == 2, args
        assert "Usage:" in result.output


def test_a_bad_cursor_is_a_usage_error(make_app: AppFactory) -> None:
    app, _, _ = make_app()
    result = cli(app, "list", "--cursor", "x" * 500)
    assert result.exit_code == 2
    assert "not a scan cursor" in result.output
    assert cli(app, "list", "--user", "a", "--cursor", "b").exit_code == 2


def test_a_store_that_is_down_gives_a_clear_error() -> None:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="k" * 32,
        CLOAKROOM_STORE=f"postgresql+psycopg://nobody:pw@127.0.0.1:{free_port()}/nothing",
        CLOAKROOM_STORE_TIMEOUT=0.5,
    )
    Cloakroom(app)
    for args in (["list"], ["stats"], ["show", "0" * 32], ["revoke", "--user", "a"], ["purge"]):
        result = cli(app, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: the session store is unreachable"), result.output
        assert "Traceback" not in result.output
        assert "pw@" not in result.output  # no password in messages


def test_cookie_mode_says_there_is_nothing_on_the_server() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="k" * 32, CLOAKROOM_STORE="cookie://")
    Cloakroom(app)
    for args in (
        ["list"],
        ["list", "--user", "alice"],
        ["show", "0" * 32],
        ["revoke", "0" * 32],
        ["revoke", "--user", "alice"],
        ["revoke", "--all", "--yes"],
        ["purge"],
        ["stats"],
        ["activity"],
        ["rekey"],
    ):
        result = cli(app, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "cookie" in result.output, args
        assert "Traceback" not in result.output
    assert cli(app, "keygen").exit_code == 0


def test_an_app_without_cloakroom_is_told_so() -> None:
    app = Flask(__name__)
    app.cli.add_command(cloakroom_group)
    result = cli(app, "list")
    assert result.exit_code == 1
    assert "Cloakroom is not set up on this app" in result.output


def test_the_spinner_hands_back_results_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    def slow() -> int:
        time.sleep(0.45)
        return 42

    assert _with_spinner("Working", slow, tty=True) == 42
    err = capsys.readouterr().err
    assert "\rWorking | " in err
    assert "\rWorking / " in err  # it turned
    counts = iter(range(100))
    assert _with_spinner("Working", slow, tty=True, status=lambda: f"{next(counts)} deleted") == 42
    *lines, wipe, rest = capsys.readouterr().err.split("\r")
    assert lines[1].startswith("Working | ") and lines[1].endswith("s  0 deleted")
    assert lines[2].startswith("Working / ") and lines[2].endswith("s  1 deleted")
    assert wipe == " " * max(len(line) for line in lines) and rest == ""  # wiped at the end
    assert _with_spinner("Working", lambda: 7, tty=False) == 7
    assert capsys.readouterr().err == ""  # nothing when stderr is not a terminal

    def fail() -> int:
        raise click.ClickException("boom")

    with pytest.raises(click.ClickException, match="boom"):
        _with_spinner("Working", fail, tty=True)


def test_flask_finds_the_command_group(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_cloakroom import Cloakroom

            app = Flask(__name__)
            app.config.update(
                SECRET_KEY="k" * 32, CLOAKROOM_STORE="sqlite:///{tmp_path / "s.db"}"
            )
            Cloakroom(app)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLASK_APP": "cliapp"}
    run = subprocess.run(
        [sys.executable, "-m", "flask", "cloakroom", "stats"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "live sessions  0" in run.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "flask", "cloakroom", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    for command in ("list", "show", "revoke", "purge", "stats", "activity", "keygen", "rekey"):
        assert f"  {command} " in helped.stdout
