"""Test helpers shared by the test modules: a settable clock and a counting store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from flask_cloakroom.stores import Record, Store


class FakeClock:
    """A clock for tests: starts at a fixed time and moves only when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **kwargs: float) -> None:
        self.now += timedelta(seconds=seconds, **kwargs)

    def timestamp(self) -> float:
        return self.now.timestamp()


class CountingStore(Store):
    """Wraps a store and counts the operations made on it (one call = one round trip)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: Counter[str] = Counter()

    def reset(self) -> None:
        self.calls.clear()

    @property
    def reads(self) -> int:
        return self.calls["load"]

    @property
    def writes(self) -> int:
        return self.calls["save"] + self.calls["rotate"] + self.calls["delete"]

    def load(self, key: str) -> Record | None:
        self.calls["load"] += 1
        return self.inner.load(key)

    def save(self, record: Record, *, expected: int | None, now: float) -> bool:
        self.calls["save"] += 1
        return self.inner.save(record, expected=expected, now=now)

    def rotate(self, old_key: str, record: Record, *, expected: int, now: float) -> bool:
        self.calls["rotate"] += 1
        return self.inner.rotate(old_key, record, expected=expected, now=now)

    def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> int:
        self.calls["delete_many"] += 1
        return self.inner.delete_many(keys)

    def user_records(self, user_id: str, *, now: float) -> list[Record]:
        self.calls["user_records"] += 1
        return self.inner.user_records(user_id, now=now)

    def scan(
        self, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Record], str | None]:
        self.calls["scan"] += 1
        return self.inner.scan(cursor=cursor, limit=limit)

    def purge_expired(self, *, now: float, batch_size: int = 1000) -> int:
        self.calls["purge_expired"] += 1
        return self.inner.purge_expired(now=now, batch_size=batch_size)

    def count(self, *, now: float) -> int:
        self.calls["count"] += 1
        return self.inner.count(now=now)

    def close(self) -> None:
        self.inner.close()
