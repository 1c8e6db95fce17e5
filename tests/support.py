"""Test helpers shared by the test modules: a settable clock and a counting store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask_cloakroom.stores.instrumented import InstrumentedStore


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


#: Counts store operations (one call = one round trip for the built-in stores).
CountingStore = InstrumentedStore
