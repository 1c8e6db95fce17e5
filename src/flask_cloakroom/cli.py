"""``flask cloakroom``: see and act on sessions from the command line.

Registered on the app's CLI by :meth:`Cloakroom.init_app`::

    flask --app myapp cloakroom list --user alice
    flask --app myapp cloakroom revoke 3f2a...        # one session, by handle
    flask --app myapp cloakroom revoke --user alice   # all of a user's sessions
    flask --app myapp cloakroom purge                 # from cron

Output is a table for people, or JSON with ``--json`` for scripts.  Exit
codes: 0 done, 1 an error (store unreachable, unknown handle, ``cookie://``
mode, aborted), 2 a usage error (bad option, malformed handle).  Errors are
one line on stderr, never a traceback.  The full guide is docs/operations.md.
"""

from __future__ import annotations

import functools
import getpass
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import click
from flask import current_app
from flask.cli import AppGroup

from .activity import EVENT_KINDS, Event
from .admin.operations import (
    Page,
    check_health,
    live_page,
    revoke_all,
    server_state_or_refuse,
    session_as_dict,
    tally_events,
)
from .crypto import generate_key, parse_key
from .errors import CloakroomError, NotSupported, StoreError, StoreUnavailable
from .manager import RekeyReport, SessionInfo, SessionManager
from .stores import Store
from .stores.base import PURGE_BATCH_SIZE, paced
from .tokens import is_store_key

_P = ParamSpec("_P")
_R = TypeVar("_R")

cloakroom_group = AppGroup(
    "cloakroom",
    help="See and end server-side sessions, purge, rotate encryption keys.",
)

_STATS_KINDS = ("login", "anomaly", "revoked", "logout")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# -- plumbing -----------------------------------------------------------------------


def _manager() -> SessionManager:
    from .extension import EXTENSION_KEY

    manager: SessionManager | None = current_app.extensions.get(EXTENSION_KEY)
    if manager is None:
        raise click.ClickException(
            "Cloakroom is not set up on this app: call cloak.init_app(app) in the app factory"
        )
    return manager


def _store_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn Cloakroom's errors into one clear line on stderr and exit code 1."""

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except NotSupported as error:
            raise click.ClickException(str(error)) from None
        except StoreUnavailable as error:
            raise click.ClickException(f"the session store is unreachable: {error}") from None
        except StoreError as error:
            raise click.ClickException(f"the session store failed: {error}") from None
        except CloakroomError as error:
            raise click.ClickException(str(error)) from None

    return run


def _operator() -> str:
    """``cli:<OS user>``: who ended a session, for the ``revoked`` event."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in the environment or passwd
        return "cli"


def _utc_text(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str | None, width: int = 40) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain text table: left-aligned columns two spaces apart."""
    body = [list(row) for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def _emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=False))


def _with_spinner(
    label: str,
    work: Callable[[], _R],
    *,
    tty: bool | None = None,
    status: Callable[[], str] | None = None,
) -> _R:
    """Run ``work`` while a spinner with the elapsed time turns on stderr (terminals only).

    For work that cannot say how much is left: this shows that it goes on, not
    a percentage it could not know.  ``status``, if given, is read at each turn
    and shown after the time (a running count, say).
    """
    if tty is None:
        tty = sys.stderr.isatty()
    if not tty:
        return work()
    done: list[_R] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as error:  # handed back to the calling thread
            failed.append(error)

    worker = threading.Thread(target=run, name="cloakroom-cli", daemon=True)
    started = time.monotonic()
    worker.start()
    frames = "|/-\\"
    turn = 0
    width = 0
    while True:
        elapsed = time.monotonic() - started
        line = f"{label} {frames[turn % 4]} {elapsed:5.1f}s"
        if status is not None:
            line += f"  {status()}"
        width = max(width, len(line))
        click.echo(f"\r{line.ljust(width)}", err=True, nl=False)
        turn += 1
        worker.join(0.2)
        if not worker.is_alive():
            break
    click.echo("\r" + " " * width + "\r", err=True, nl=False)
    if failed:
        raise failed[0]
    return done[0]


def _moment(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | timedelta | None:
    """Parse ``90m``, ``2h``, ``7d``, ``1w`` (that long ago) or an ISO 8601 time (UTC if naive)."""
    if value is None:
        return None
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (30m, 2h, 7d, 1w) nor an ISO 8601 time "
            "(2025-11-25 or 2025-11-25T14:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _resolve(moment: datetime | timedelta | None, now: float) -> datetime | None:
    if isinstance(moment, timedelta):
        return datetime.fromtimestamp(now, UTC) - moment
    return moment


def _handle_argument(value: str | None, param_hint: str) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if not is_store_key(text):
        raise click.BadParameter(
            f"{value!r} is not a session handle: a handle is 32 lowercase hex characters, "
            "as printed by `flask cloakroom list`",
            param_hint=param_hint,
        )
    return text


def _session_rows(sessions: Iterable[SessionInfo]) -> list[list[str]]:
    return [
        [
            s.handle,
            _clip(s.user_id, 24) if s.user_id else "(anonymous)",
            _clip(s.device or s.user_agent, 28),
            s.ip or "-",
            _clip(s.location, 20),
            _utc_text(s.created_at),
            _utc_text(s.last_seen_at),
        ]
        for s in sessions
    ]


_SESSION_HEADERS = (
    "HANDLE",
    "USER",
    "DEVICE",
    "IP",
    "LOCATION",
    "CREATED (UTC)",
    "LAST SEEN (UTC)",
)


def _details_text(details: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in details.items() if v is not None)


# -- commands -----------------------------------------------------------------------


@cloakroom_group.command("list")
@click.option("--user", "user_id", metavar="USER", help="Only this user's sessions.")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="Stop after about this many sessions.",
)
@click.option("--cursor", help="Continue a listing where the previous one stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_errors
def list_command(user_id: str | None, limit: int, cursor: str | None, as_json: bool) -> None:
    """List live sessions: all of them page by page, or one user's.

    Without --user the store is read in its own order, one page at a time, so
    this stays quick on a store of millions; the last line says how to go on.
    """
    manager = _manager()
    now = manager.now()
    next_cursor: str | None = None
    if user_id is not None:
        if cursor is not None:
            raise click.UsageError("--cursor pages through all sessions; it cannot go with --user")
        sessions = manager.sessions(user_id, now, None)[:limit]
    else:
        sessions = []
        next_cursor = cursor
        while True:
            try:
                page: Page = live_page(
                    manager, now, cursor=next_cursor, limit=max(1, limit - len(sessions))
                )
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="--cursor") from None
            sessions.extend(page.sessions)
            next_cursor = page.next_cursor
            if next_cursor is None or len(sessions) >= limit:
                break
    if as_json:
        _emit_json({"sessions": [session_as_dict(s) for s in sessions], "next_cursor": next_cursor})
        return
    if not sessions:
        click.echo(f"No live sessions{f' for user {user_id}' if user_id is not None else ''}.")
    else:
        click.echo(_table(_SESSION_HEADERS, _session_rows(sessions)))
    if next_cursor is not None:
        click.echo(
            f"More sessions: flask cloakroom list --limit {limit} --cursor '{next_cursor}'",
            err=True,
        )


@cloakroom_group.command("show")
@click.argument("handle")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_store_errors
def show_command(handle: str, as_json: bool) -> None:
    """Show everything known about one session."""
    key = _handle_argument(handle, "HANDLE")
    assert key is not None
    manager = _manager()
    server_state_or_refuse(manager, "show")
    now = manager.now()
    record = manager.store.load(key)
    info = None if record is None else manager.describe(record, now, None)
    if info is None:
        raise click.ClickException(f"no live session has the handle {key}")
    if as_json:
        _emit_json(session_as_dict(info))
        return
    fields = [
        ("handle", info.handle),
        ("user", info.user_id or "(anonymous)"),
        ("device", info.device or "-"),
        ("user agent", info.user_agent or "-"),
        ("ip", info.ip or "-"),
        ("login ip", info.login_ip or "-"),
        ("location", info.location or "-"),
        ("created", _utc_text(info.created_at) + " UTC"),
        ("signed in", _utc_text(info.login_at) + (" UTC" if info.login_at else "")),
        ("last seen", _utc_text(info.last_seen_at) + " UTC"),
        ("expires", _utc_text(info.expires_at) + " UTC"),
        ("remember me", "yes" if info.remember else "no"),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {value}")


@cloakroom_group.command("revoke")
@click.argument("handle", required=False)
@click.option("--user", "user_id", metavar="USER", help="End every session of this user.")
@click.option("--keep", metavar="HANDLE", help="With --user: spare this session.")
@click.option("--all", "everyone", is_flag=True, help="End every session in the store.")
@click.option("--yes", "-y", is_flag=True, help="With --all: do not ask for confirmation.")
@click.option("--reason", help="Recorded in the revoked events.")
@_store_errors
def revoke_command(
    handle: str | None,
    user_id: str | None,
    keep: str | None,
    everyone: bool,
    yes: bool,
    reason: str | None,
) -> None:
    """End one session (HANDLE), a user's (--user), or all (--all).

    Takes effect at once: the browser holding an ended session is anonymous
    on its next request.  Each ended session gets a "revoked" event naming
    the OS user who ran this (by=cli:<user>).
    """
    chosen = [handle is not None, user_id is not None, everyone]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of: a HANDLE, --user USER, or --all")
    if keep is not None and user_id is None:
        raise click.UsageError("--keep goes with --user")
    keep_key = _handle_argument(keep, "--keep")
    key = _handle_argument(handle, "HANDLE")
    manager = _manager()
    server_state_or_refuse(manager, "revoke")
    by = _operator()
    now = manager.now()
    if key is not None:
        if not manager.revoke(key, now, by=by, reason=reason):
            raise click.ClickException(
                f"no session has the handle {key} (it ended already, or never existed)"
            )
        click.echo(f"Revoked session {key}.")
        return
    if user_id is not None:
        count = manager.revoke_user(user_id, now, keep=keep_key, by=by, reason=reason)
        spared = " (kept the one given with --keep)" if keep_key is not None else ""
        click.echo(f"Revoked {count} session(s) of user {user_id}{spared}.")
        return
    store = manager.store
    if not yes:
        click.confirm(
            f"End EVERY session in {store.describe()}? Every user will be signed out",
            abort=True,
            err=True,
        )
    try:
        estimate: int | None = store.count(now=now)
    except StoreError:
        estimate = None
    with click.progressbar(
        length=max(1, estimate or 1), label="Revoking sessions", file=sys.stderr
    ) as bar:
        live, deleted = revoke_all(
            manager, now, by=by, reason=reason or "revoke --all", progress=bar.update
        )
    click.echo(f"Revoked {live} live session(s); {deleted} record(s) deleted in all.")


def _purge_showing_progress(store: Store, now: float, batch_size: int, pace: float) -> int:
    """Purge with a progress bar on stderr, or a spinner and a running count.

    The bar's total is the store's count of expired records; a store that
    cannot count them cheaply (files, Redis) gets the spinner instead.
    """
    label = "Purging expired sessions"
    try:
        total = store.count_expired(now=now)
    except StoreUnavailable:
        raise
    except StoreError:  # no total then; the purge itself says whether the store works
        total = None
    if total is not None and total > 0:
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            return store.purge_expired(
                now=now, batch_size=batch_size, progress=paced(bar.update, pace)
            )
    deleted = 0

    def count(gone: int) -> None:
        nonlocal deleted
        deleted += gone

    return _with_spinner(
        label,
        lambda: store.purge_expired(now=now, batch_size=batch_size, progress=paced(count, pace)),
        status=lambda: f"{deleted:,} deleted",
    )


@cloakroom_group.command("purge")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=PURGE_BATCH_SIZE,
    show_default=True,
    help="Records deleted per transaction (SQL) or pipeline (Redis).",
)
@click.option(
    "--pace",
    type=click.FloatRange(0, 100),
    default=None,
    help="After each batch, rest this many times as long as the batch took (0: no rest)."
    "  [default: CLOAKROOM_PURGE_PACE, 2.0 unless set]",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_store_errors
def purge_command(batch_size: int, pace: float | None, as_json: bool) -> None:
    """Delete expired sessions, and activity older than its retention.

    Run it from cron for SQL and file stores (Redis expires records itself).
    The store deletes in batches, so it never holds long locks, and rests after
    each batch (``--pace``), so the app's requests do not queue behind it.  On a terminal
    a progress bar follows the batches when the store can count its expired
    records (memory, SQL), a spinner with a running count otherwise.
    """
    manager = _manager()
    server_state_or_refuse(manager, "purge")
    if pace is None:
        pace = manager.settings.purge_pace
    now = manager.now()
    started = time.monotonic()
    if as_json:
        purged = manager.store.purge_expired(
            now=now, batch_size=batch_size, progress=paced(None, pace)
        )
    else:
        purged = _purge_showing_progress(manager.store, now, batch_size, pace)
    pruned = manager.activity.prune(now)
    seconds = time.monotonic() - started
    if as_json:
        _emit_json({"sessions": purged, "events": pruned, "seconds": round(seconds, 3)})
        return
    click.echo(
        f"Deleted {purged} expired session record(s) and {pruned} old activity event(s) "
        f"from {manager.store.describe()} in {seconds:.1f}s."
    )


@cloakroom_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_store_errors
def stats_command(as_json: bool) -> None:
    """Show live sessions, store health, and recent events."""
    manager = _manager()
    server_state_or_refuse(manager, "count")
    health = check_health(manager.store)
    if not health.up:
        raise StoreUnavailable(health.error or "ping failed")
    now = manager.now()
    live = manager.store.count(now=now)
    tally = tally_events(manager.store, kinds=_STATS_KINDS, now=now)
    if as_json:
        events = None
        if tally is not None:
            events = {
                kind: {"last_hour": tally.last_hour[kind], "last_day": tally.last_day[kind]}
                for kind in tally.kinds
            }
        _emit_json(
            {
                "store": health.store,
                "ping_ms": round(health.latency_ms or 0.0, 3),
                "live_sessions": live,
                "events": events,
                "events_capped": None if tally is None else tally.capped,
            }
        )
        return
    click.echo(f"store          {health.store}")
    click.echo(f"health         up (ping {health.latency_ms or 0.0:.1f} ms)")
    click.echo(f"live sessions  {live:,}")
    if tally is None:
        click.echo("activity       this store keeps no activity log")
        return
    names = {"login": "logins", "anomaly": "anomalies", "revoked": "revocations"}
    rows = [
        [names.get(k, k + "s"), f"{tally.last_hour[k]:,}", f"{tally.last_day[k]:,}"]
        for k in tally.kinds
    ]
    click.echo("")
    click.echo(_table(("EVENTS", "LAST HOUR", "LAST DAY"), rows))
    if tally.capped:
        click.echo(f"(read the newest {tally.cap:,} events only: the day's counts are too low)")


@cloakroom_group.command("activity")
@click.option("--user", "user_id", metavar="USER", help="Only this user's events.")
@click.option(
    "--since", metavar="TIME", callback=_moment, help="From this time: 2h, 7d, or 2025-11-25T14:00."
)
@click.option("--before", metavar="TIME", callback=_moment, help="Before this time (to page back).")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(EVENT_KINDS),
    help="Only events of this kind (repeatable).",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_errors
def activity_command(
    user_id: str | None,
    since: datetime | timedelta | None,
    before: datetime | timedelta | None,
    kinds: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> None:
    """Show the activity log, newest first.

    Logins, logouts, revocations, expiries and anomalies, filtered by user, kind and time.
    """
    manager = _manager()
    now = manager.now()
    start, end = _resolve(since, now), _resolve(before, now)
    events: list[Event] = manager.activity.query(
        user_id=user_id,
        since=None if start is None else start.timestamp(),
        before=None if end is None else end.timestamp(),
        kinds=list(kinds) or None,
        limit=limit,
    )
    if as_json:
        _emit_json({"events": [e.as_dict() for e in events]})
        return
    if not events:
        click.echo("No events.")
        return
    rows = [
        [
            _utc_text(e.at),
            e.kind,
            _clip(e.user_id, 24),
            e.handle or "-",
            e.ip or "-",
            _clip(e.device or e.user_agent, 28),
            _clip(_details_text(e.details), 60),
        ]
        for e in events
    ]
    click.echo(_table(("AT (UTC)", "KIND", "USER", "HANDLE", "IP", "DEVICE", "DETAILS"), rows))
    if len(events) == limit:
        oldest = events[-1].at.isoformat()
        click.echo(f"Older events: add --before '{oldest}'", err=True)


@cloakroom_group.command("keygen", with_appcontext=False)
@click.option("--id", "key_id", metavar="ID", help="Name the key (letters, digits, -): ID:KEY.")
def keygen_command(key_id: str | None) -> None:
    """Print a new encryption key for CLOAKROOM_ENCRYPTION_KEYS."""
    key = generate_key()
    text = key if key_id is None else f"{key_id}:{key}"
    try:
        parse_key(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--id") from None
    click.echo(text)
    click.echo(
        "Put it first in CLOAKROOM_ENCRYPTION_KEYS, keep the old keys after it, deploy, "
        "then run `flask cloakroom rekey`.",
        err=True,
    )


@cloakroom_group.command("rekey")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=500, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_store_errors
def rekey_command(batch_size: int, as_json: bool) -> None:
    """Re-encrypt sessions under the first encryption key.

    Rewrites every live session not sealed under the first key of
    CLOAKROOM_ENCRYPTION_KEYS.  Safe while the app serves requests.  When it reports no unreadable
    records, the old keys can be removed from the configuration.
    """
    manager = _manager()
    server_state_or_refuse(manager, "re-encrypt")
    now = manager.now()
    report: RekeyReport = _with_spinner(
        "Re-encrypting sessions", lambda: manager.rekey(now, batch_size=batch_size)
    )
    if as_json:
        _emit_json(
            {
                "examined": report.examined,
                "rewritten": report.rewritten,
                "current": report.current,
                "changed_meanwhile": report.changed_meanwhile,
                "unreadable": report.unreadable,
            }
        )
        return
    click.echo(f"examined           {report.examined}")
    click.echo(f"rewritten          {report.rewritten}")
    click.echo(f"already current    {report.current}")
    click.echo(f"changed meanwhile  {report.changed_meanwhile} (rewritten by the app itself)")
    click.echo(f"unreadable         {report.unreadable}")
    if report.unreadable:
        click.echo(
            f"{report.unreadable} record(s) open with no configured key (sealed under a key "
            "already removed, or corrupt): those sessions are dead already and go with "
            "`flask cloakroom purge` once expired.",
            err=True,
        )
    elif not manager.settings.encryption_keys:
        click.echo("CLOAKROOM_ENCRYPTION_KEYS is not set: sessions are stored unencrypted.")
    else:
        click.echo("Every live session is under the first key: older keys can be removed.")
        if len(manager.settings.encryption_keys) > 1:
            click.echo(
                "Activity-log entries written before the switch stay sealed under the old key: "
                "once it is removed they are unreadable (and skipped).",
                err=True,
            )
