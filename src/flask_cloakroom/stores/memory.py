"""An in-process store for tests and single-process development.

Records live in a dict guarded by a lock; they vanish with the process and are
not shared between worker processes.  Use ``memory://`` as ``CLOAKROOM_STORE``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

from .base import PURGE_BATCH_SIZE, EventRecord, Record, Store, filter_events


class MemoryStore(Store):
    """Keeps records in this process's memory."""

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        self._by_user: dict[str, set[str]] = {}
        self._events: list[EventRecord] = []

    def load(self, key: str) -> Record | None:
        return self._records.get(key)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        with self._lock:
            current = self._records.get(record.key)
            if expected is None:
                if current is not None:
                    return False
            elif current is None or current.version != expected:
                return False
            self._put(record, current)
            return True

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        with self._lock:
            old = self._records.get(old_key)
            if old is None or old.version != expected or record.key in self._records:
                return False
            self._remove(old_key)
            self._put(record, None)
            return True

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        with self._lock:
            current = self._records.get(key)
            new = change(current)
            if new is not None:
                self._put(new, current)
            return new

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        with self._lock:
            keys = self._by_user.get(user_id, ())
            return [self._records[k] for k in keys if self._records[k].expires_at > now]

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        with self._lock:
            keys = sorted(self._records)
            start = 0 if cursor is None else bisect.bisect_right(keys, cursor)
            page = [self._records[k] for k in keys[start : start + limit]]
        return page, (page[-1].key if len(page) == limit else None)

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete expired records, taking the lock once per batch of ``batch_size``."""
        batch_size = max(1, batch_size)
        with self._lock:
            dead = [k for k, r in self._records.items() if r.expires_at <= now]
        deleted = 0
        for start in range(0, len(dead), batch_size):
            gone = 0
            with self._lock:
                for key in dead[start : start + batch_size]:
                    record = self._records.get(key)
                    # Re-check: the record may have been renewed since the list was made.
                    if record is not None and record.expires_at <= now:
                        self._remove(key)
                        gone += 1
            deleted += gone
            if progress is not None and gone:
                progress(gone)
        return deleted

    def count_expired(self, *, now: float) -> int:
        with self._lock:
            return len([r for r in self._records.values() if r.expires_at <= now])

    def count(self, *, now: float) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.expires_at > now)

    def _put(self, record: Record, current: Record | None) -> None:
        if current is not None and current.user_id != record.user_id:
            self._unindex(current)
        self._records[record.key] = record
        if record.user_id is not None:
            self._by_user.setdefault(record.user_id, set()).add(record.key)

    def _remove(self, key: str) -> bool:
        record = self._records.pop(key, None)
        if record is None:
            return False
        self._unindex(record)
        return True

    def _unindex(self, record: Record) -> None:
        if record.user_id is None:
            return
        keys = self._by_user.get(record.user_id)
        if keys is not None:
            keys.discard(record.key)
            if not keys:
                del self._by_user[record.user_id]

    # -- activity log ----------------------------------------------------------

    def add_events(self, events: Sequence[EventRecord]) -> None:
        with self._lock:
            self._events.extend(events)

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        with self._lock:
            # Newest first; among equal times, the later one first.
            order = sorted(range(len(self._events)), key=lambda i: (self._events[i].at, i))
            newest_first = [self._events[i] for i in reversed(order)]
        return filter_events(newest_first, user_id, kinds, since, before, limit)

    def prune_events(self, *, before: float) -> int:
        with self._lock:
            kept = [e for e in self._events if e.at >= before]
            pruned = len(self._events) - len(kept)
            self._events = kept
        return pruned
