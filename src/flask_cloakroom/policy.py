"""Timeouts and touch rules: pure functions of a session's :class:`Meta` and ``now``.

* **Idle timeout**: a session whose last recorded activity is older than the
  idle timeout is dead.  Activity is recorded at most once per touch
  interval, so a session may end up to one touch interval early; never late.
* **Absolute timeout**: every session is dead this long after it began (its
  last login, or its creation for an anonymous session), however active.
* Sessions started with ``login(..., remember=True)`` use the remember
  timeouts instead.

The browser cookie's expiry is only a hint; these rules are what decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .session import Meta

Expiry = Literal["idle", "absolute"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Timeout settings, in seconds."""

    idle: float
    absolute: float
    remember_idle: float
    remember_absolute: float
    touch_interval: float

    def idle_expiry(self, meta: Meta) -> float:
        """When the session dies if it is not used again."""
        return self._expiries(meta)[1]

    def absolute_expiry(self, meta: Meta) -> float:
        """When the session dies whatever happens."""
        return self._expiries(meta)[0]

    def expires_at(self, meta: Meta) -> float:
        """The sooner of the two expiries: the record's life in the store."""
        absolute, idle = self._expiries(meta)
        return min(absolute, idle)

    def expired(self, meta: Meta, now: float) -> Expiry | None:
        """Why the session is dead at ``now``, or ``None`` if it is alive."""
        absolute, idle = self._expiries(meta)
        if now >= absolute:
            return "absolute"
        if now >= idle:
            return "idle"
        return None

    def _expiries(self, meta: Meta) -> tuple[float, float]:
        """The absolute and the idle expiry, in one call (this runs on every request).

        The absolute timeout counts from the last login, or from the creation of
        a session that never logged in; "remember me" sessions use their own pair.
        """
        start = meta.auth_at if meta.auth_at is not None else meta.created_at
        if meta.remember:
            return start + self.remember_absolute, meta.last_seen_at + self.remember_idle
        return start + self.absolute, meta.last_seen_at + self.idle

    def touch_due(self, meta: Meta, now: float) -> bool:
        """Whether an unchanged session should still be written to record activity."""
        return now - meta.last_seen_at >= self.touch_interval
