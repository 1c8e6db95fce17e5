"""A store with only the methods docs/stores.md says a store must have.

It is what a user writing their own store starts from ("Writing your own store"):
a dict behind a lock, with none of the optional overrides, so every default of
:class:`flask_cloakroom.stores.Store` (two-step ``rotate``, the retrying
``update_locked``, ``delete_many``, ``ping``, no activity log) runs under the contract
suite and the end-to-end tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask_cloakroom.stores import Record, Store
from flask_cloakroom.stores.base import PURGE_BATCH_SIZE


class MinimalStore(Store):
    """Records in a dict; only the abstract methods are implemented."""

    name = "minimal"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}

    def load(self, key: str) -> Record | None:
        with self._lock:
            return self._records.get(key)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        with self._lock:
            current = self._records.get(record.key)
            stored_version = None if current is None else current.version
            if stored_version != expected:  # create: nothing there; update: the same version
                return False
            self._records[record.key] = record
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._records.pop(key, None) is not None

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        with self._lock:  # no index: fine for a test, not for a store with many sessions
            return [r for r in self._records.values() if r.user_id == user_id]

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        with self._lock:
            keys = sorted(k for k in self._records if cursor is None or k > cursor)[:limit]
            page = [self._records[k] for k in keys]
        return page, (keys[-1] if len(keys) == limit else None)

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        deleted = 0
        while True:
            with self._lock:
                dead = [k for k, r in self._records.items() if r.expires_at <= now][:batch_size]
                for key in dead:
                    del self._records[key]
            if not dead:
                return deleted
            deleted += len(dead)
            if progress is not None:
                progress(len(dead))

    def count(self, *, now: float) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.expires_at > now)
