"""A store wrapper that counts and times every operation of the store it wraps.

Used for metrics (store latency), by the benchmarks (store operations per
request) and by the tests (round trips).  Each call of a store method is one
operation; for the built-in stores one operation is one round trip, except
where a store documents otherwise.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .base import PURGE_BATCH_SIZE, EventRecord, Record, Store

_T = TypeVar("_T")

#: Called after each operation with its name, its duration in seconds, and
#: whether it raised.
Observer = Callable[[str, float, bool], None]


class InstrumentedStore(Store):
    """Wraps ``inner``; ``calls`` counts operations by method name."""

    def __init__(self, inner: Store, observer: Observer | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.observer = observer
        self.calls: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget the counts so far."""
        self.calls.clear()

    @property
    def reads(self) -> int:
        """How many single-session reads (``load``) were made."""
        return self.calls["load"]

    @property
    def writes(self) -> int:
        """How many single-session writes (``save``, ``rotate``, ``update_locked``, ``delete``)."""
        calls = self.calls
        return calls["save"] + calls["rotate"] + calls["update_locked"] + calls["delete"]

    def _op(self, name: str, work: Callable[[], _T]) -> _T:
        self.calls[name] += 1
        if self.observer is None:
            return work()
        started = time.perf_counter()
        failed = True
        try:
            result = work()
            failed = False
            return result
        finally:
            self.observer(name, time.perf_counter() - started, failed)

    def load(self, key: str) -> Record | None:
        return self._op("load", lambda: self.inner.load(key))

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        return self._op("save", lambda: self.inner.save(record, expected=expected, now=now))

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        return self._op(
            "rotate", lambda: self.inner.rotate(old_key, record, expected=expected, now=now)
        )

    def update_locked(
        self, key: str, change: Callable[[Record | None], Record | None], *, now: float
    ) -> Record | None:
        # Forwarded so that the inner store's own lock is used, not the base
        # class's optimistic retries.
        return self._op("update_locked", lambda: self.inner.update_locked(key, change, now=now))

    def delete(self, key: str) -> bool:
        return self._op("delete", lambda: self.inner.delete(key))

    def delete_many(self, keys: Iterable[str]) -> int:
        return self._op("delete_many", lambda: self.inner.delete_many(keys))

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        return self._op("user_records", lambda: self.inner.user_records(user_id, now=now))

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        return self._op("scan", lambda: self.inner.scan(cursor=cursor, limit=limit))

    def purge_expired(
        self,
        *,
        now: float,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return self._op(
            "purge_expired",
            lambda: self.inner.purge_expired(now=now, batch_size=batch_size, progress=progress),
        )

    def count_expired(self, *, now: float) -> int | None:
        return self._op("count_expired", lambda: self.inner.count_expired(now=now))

    def count(self, *, now: float) -> int:
        return self._op("count", lambda: self.inner.count(now=now))

    def ping(self) -> None:
        self._op("ping", self.inner.ping)

    def add_events(self, events: Sequence[EventRecord]) -> None:
        self._op("add_events", lambda: self.inner.add_events(events))

    def events(
        self,
        *,
        user_id: str | None = None,
        kinds: Sequence[str] | None = None,
        since: float | None = None,
        before: float | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        return self._op(
            "events",
            lambda: self.inner.events(
                user_id=user_id, kinds=kinds, since=since, before=before, limit=limit
            ),
        )

    def prune_events(self, *, before: float) -> int:
        return self._op("prune_events", lambda: self.inner.prune_events(before=before))

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()
