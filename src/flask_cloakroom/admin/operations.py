"""What the operator surfaces (``flask cloakroom`` and the admin dashboard) ask of a store.

Every function here keeps to the :class:`~flask_cloakroom.stores.Store`
contract and bounds its work: a page of sessions is one ``scan`` page (no
full scan per page view), event statistics read at most ``cap`` entries of
the activity log, and the live-session count, the only full count, is
cached for a few seconds.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..activity import Event
from ..cookiemode import CookieSessionManager
from ..errors import NotSupported, StoreError
from ..manager import SessionInfo, SessionManager
from ..stores.base import Store

#: How many activity-log entries statistics read at most.
EVENT_CAP = 10_000
#: How long a live-session count is reused, in seconds.
COUNT_TTL = 30.0
#: The longest scan cursor accepted from a URL or the command line.
MAX_CURSOR = 200

_count_cache: weakref.WeakKeyDictionary[Store, tuple[float, int]] = weakref.WeakKeyDictionary()
_count_lock = threading.Lock()


def server_state_or_refuse(manager: SessionManager, what: str) -> None:
    """Raise :class:`NotSupported` with a clear reason if the app runs in cookie mode."""
    if isinstance(manager, CookieSessionManager):
        raise NotSupported(
            f"cookie:// keeps each session in its browser's cookie, so the server has no "
            f"sessions to {what}. Use a server-side store (SQLite, PostgreSQL, Redis...) "
            "to operate on sessions."
        )


def is_cookie_mode(manager: SessionManager) -> bool:
    """Whether the app keeps no sessions on the server (``cookie://``)."""
    return isinstance(manager, CookieSessionManager)


# -- health ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """The result of one ``ping`` of the store."""

    store: str
    up: bool
    latency_ms: float | None
    error: str | None = None


def check_health(store: Store) -> Health:
    """Ping the store once and time it; a failure is reported, not raised."""
    description = store.describe()
    started = time.perf_counter()
    try:
        store.ping()
    except StoreError as error:
        return Health(description, False, None, str(error))
    return Health(description, True, (time.perf_counter() - started) * 1000)


def count_live(store: Store, now: float, *, max_age: float = COUNT_TTL) -> int:
    """The store's live-session count, reused for ``max_age`` seconds.

    Counting can cost a scan of the whole store (Redis, files), so pages
    viewed often do not count on every view.
    """
    with _count_lock:
        cached = _count_cache.get(store)
    if cached is not None and time.monotonic() - cached[0] < max_age:
        return cached[1]
    value = store.count(now=now)
    with _count_lock:
        _count_cache[store] = (time.monotonic(), value)
    return value


def forget_count(store: Store) -> None:
    """Drop the cached count of ``store`` (after a revocation, say)."""
    with _count_lock:
        _count_cache.pop(store, None)


# -- event statistics --------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Recent events of some kinds: hourly buckets for a chart, and totals.

    ``starts`` are the buckets' start times (Unix seconds, aligned on the
    bucket size), oldest first; ``counts[kind][i]`` is how many events of
    ``kind`` fell in bucket ``i`` (the last bucket is the current, partial
    one).  ``last_hour`` and ``last_day`` count the 3,600 and 86,400 seconds
    before ``now``.  ``capped`` says the log held more matching events than
    the ``cap`` read, so the oldest buckets and the day's totals are too low.
    """

    kinds: tuple[str, ...]
    bucket: int
    starts: list[float]
    counts: dict[str, list[int]]
    last_hour: dict[str, int]
    last_day: dict[str, int]
    capped: bool
    cap: int
    read: int


def tally_events(
    store: Store,
    *,
    kinds: Sequence[str],
    now: float,
    buckets: int = 24,
    bucket: int = 3600,
    cap: int = EVENT_CAP,
) -> Tally | None:
    """Count the activity log's recent events; ``None`` if the store keeps no log.

    One query of at most ``cap`` entries, newest first, read straight from the
    store: only each event's time and kind are used, so nothing is decrypted.
    """
    last = math.floor(now / bucket) * bucket
    starts = [float(last - bucket * (buckets - 1 - i)) for i in range(buckets)]
    since = min(starts[0], now - 86400)
    try:
        records = store.events(kinds=list(kinds), since=since, limit=cap)
    except NotSupported:
        return None
    counts = {kind: [0] * buckets for kind in kinds}
    hour = dict.fromkeys(kinds, 0)
    day = dict.fromkeys(kinds, 0)
    for record in records:
        if record.kind not in counts or record.at > now:
            continue
        index = int((record.at - starts[0]) // bucket)
        if 0 <= index < buckets:
            counts[record.kind][index] += 1
        if record.at >= now - 86400:
            day[record.kind] += 1
            if record.at >= now - 3600:
                hour[record.kind] += 1
    return Tally(
        kinds=tuple(kinds),
        bucket=bucket,
        starts=starts,
        counts=counts,
        last_hour=hour,
        last_day=day,
        capped=len(records) >= cap,
        cap=cap,
        read=len(records),
    )


# -- sessions ----------------------------------------------------------------------


def valid_cursor(cursor: str | None) -> str | None:
    """Check the shape of a scan cursor from outside; raise :class:`ValueError` if odd."""
    if cursor is None or cursor == "":
        return None
    if len(cursor) > MAX_CURSOR or not cursor.isascii() or not cursor.isprintable():
        raise ValueError("not a scan cursor of this store")
    return cursor


@dataclass(slots=True)
class Page:
    """A page of live sessions in the store's order, and where the next page starts."""

    sessions: list[SessionInfo]
    next_cursor: str | None
    examined: int


def live_page(
    manager: SessionManager,
    now: float,
    *,
    cursor: str | None,
    limit: int,
    current_key: str | None = None,
) -> Page:
    """One ``scan`` page, described; expired and unreadable records are left out.

    Costs one store page, whatever the store's size.  A bad cursor raises
    :class:`ValueError`.
    """
    server_state_or_refuse(manager, "list")
    records, next_cursor = manager.store.scan(cursor=valid_cursor(cursor), limit=limit)
    infos = [manager.describe(record, now, current_key) for record in records]
    return Page([i for i in infos if i is not None], next_cursor, len(records))


def revoke_all(
    manager: SessionManager,
    now: float,
    *,
    by: str,
    reason: str | None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """End every session of the store, page by page; return ``(live, deleted)``.

    ``live`` is how many live sessions ended (each gets a ``revoked`` event);
    ``deleted`` how many records were deleted, expired ones included.
    ``progress`` is called with the number of records handled in each page.
    """
    server_state_or_refuse(manager, "revoke")
    live = deleted = 0
    cursor: str | None = None
    while True:
        records, cursor = manager.store.scan(cursor=cursor, limit=batch_size)
        infos = [manager.describe(record, now, None) for record in records]
        if records:
            deleted += manager.store.delete_many([r.key for r in records])
        for info in infos:
            if info is None:
                continue
            live += 1
            manager.activity.emit(_revoked_event(info, now, by, reason))
        if progress is not None:
            progress(len(records))
        if cursor is None:
            forget_count(manager.store)
            return live, deleted


def _revoked_event(info: SessionInfo, now: float, by: str, reason: str | None) -> Event:
    details: dict[str, Any] = {"by": by, "reason": reason}
    return Event(
        kind="revoked",
        at=datetime.fromtimestamp(now, UTC),
        handle=info.handle,
        user_id=info.user_id,
        ip=info.ip,
        user_agent=info.user_agent,
        device=info.device,
        location=info.location,
        details=details,
    )


def session_as_dict(info: SessionInfo) -> dict[str, Any]:
    """A JSON-ready description of a session (times as ISO 8601 strings)."""
    return {
        "handle": info.handle,
        "user_id": info.user_id,
        "created_at": info.created_at.isoformat(),
        "last_seen_at": info.last_seen_at.isoformat(),
        "expires_at": info.expires_at.isoformat(),
        "login_at": None if info.login_at is None else info.login_at.isoformat(),
        "remember": info.remember,
        "ip": info.ip,
        "login_ip": info.login_ip,
        "user_agent": info.user_agent,
        "device": info.device,
        "location": info.location,
    }
