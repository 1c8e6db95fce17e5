"""Merging the changes of concurrent requests into one busy session, in batches.

When a request's conditional write loses a race (another request wrote the session
since this one loaded it), its changes are applied again onto what is stored now,
under the store's lock (:meth:`~flask_cloakroom.stores.Store.update_locked`).  When
many requests write one session at once, each of them waits in line for that lock,
and the line's length times one merge's duration can outgrow the store timeout.

So the requests of one process in line for the same session merge as a batch: the
first in line takes everything queued behind it when its turn comes, applies all
those changes in arrival order in one read-merge-write, and hands the result to
each.  A request waits for the batch in progress and then its own, however long the
line; the store's lock is taken once per batch instead of once per request.  Two
requests of one batch that set the same key: the later arrival wins, as it would
have in line.  Requests of other processes are merged by their own process, and
batches of different processes take turns on the store's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import StoreUnavailable

__all__ = ["MergeQueue"]

_P = TypeVar("_P")
_R = TypeVar("_R")


class _Place(Generic[_P, _R]):
    """A request's place in a session's line."""

    __slots__ = ("batch", "done", "error", "outcome", "payload")

    def __init__(self, payload: _P) -> None:
        self.payload = payload
        self.done = threading.Event()
        #: Set for the request that is to merge a batch (itself first).
        self.batch: list[_Place[_P, _R]] | None = None
        self.outcome: _R | None = None
        self.error: BaseException | None = None


class MergeQueue(Generic[_P, _R]):
    """The lines of one process, one per busy session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[str, list[_Place[_P, _R]]] = {}  # key present: a batch runs

    def merge(
        self, key: str, payload: _P, merge_batch: Callable[[list[_P]], _R], *, timeout: float
    ) -> _R:
        """Have ``payload`` merged into session ``key``; return what its batch stored.

        ``merge_batch`` merges a batch's payloads (in arrival order) in one store
        operation and returns the outcome every request of the batch gets.  Waits
        up to ``timeout`` for a place in a batch, then raises StoreUnavailable.
        """
        place: _Place[_P, _R] = _Place(payload)
        with self._lock:
            line = self._lines.get(key)
            if line is None:
                self._lines[key] = []
                place.batch = [place]
            else:
                line.append(place)
        if place.batch is None:
            self._wait(key, place, timeout)
            if place.error is not None:
                raise place.error
            if place.batch is None:
                return place.outcome  # type: ignore[return-value]
        return self._run(key, place.batch, merge_batch)

    def _wait(self, key: str, place: _Place[_P, _R], timeout: float) -> None:
        if place.done.wait(timeout):
            return
        with self._lock:
            line = self._lines.get(key)
            if line is not None and place in line:
                line.remove(place)
                raise StoreUnavailable(
                    f"session {key}: the changes of other requests ahead of this one took "
                    f"more than {timeout:g} s to merge"
                )
        # Taken into a batch just now: it is being merged, within the store's timeouts.
        if not place.done.wait(4 * timeout):  # pragma: no cover - a merge that hangs
            raise StoreUnavailable(f"session {key}: a merge of concurrent changes hung")

    def _run(
        self, key: str, batch: list[_Place[_P, _R]], merge_batch: Callable[[list[_P]], _R]
    ) -> _R:
        try:
            outcome = merge_batch([place.payload for place in batch])
        except BaseException as error:
            for place in batch[1:]:
                place.error = error
                place.done.set()
            raise
        else:
            for place in batch[1:]:
                place.outcome = outcome
                place.done.set()
            return outcome
        finally:
            self._hand_over(key)

    def _hand_over(self, key: str) -> None:
        """The batch is done: the next in line merges everything queued by now."""
        with self._lock:
            line = self._lines[key]
            if not line:
                del self._lines[key]
                return
            self._lines[key] = []
            line[0].batch = line
        line[0].done.set()
