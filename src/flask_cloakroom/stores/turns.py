"""Turns: a lock that a process's writers get in the order they asked for it.

``threading.Lock`` wakes an arbitrary waiter when it is released, so under a long
queue one writer can keep missing its turn until its timeout runs out while others
go through.  The stores' write locks (SQLite's single writer, a busy Redis
record's merges) need a bound on the wait instead: with :class:`Turns` a writer
waits for the writers ahead of it and no longer.
"""

from __future__ import annotations

import threading
from collections import deque

__all__ = ["Turns"]


class Turns:
    """A first-come, first-served lock with a timeout on the wait."""

    __slots__ = ("_held", "_mutex", "_waiting")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: deque[threading.Lock] = deque()
        self._held = False

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for this caller's turn; return whether it came."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            baton = threading.Lock()
            baton.acquire()
            self._waiting.append(baton)
        if baton.acquire(timeout=timeout):
            return True  # the last holder handed the lock over
        with self._mutex:
            try:
                self._waiting.remove(baton)
            except ValueError:  # handed over just as the wait ran out: it is ours
                return True
            return False

    def release(self) -> None:
        """End this turn: hand the lock to the longest waiter, if any."""
        with self._mutex:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._held = False
