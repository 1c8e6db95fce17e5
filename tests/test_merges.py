"""The per-process merge queue (merges.py): batches, arrival order, errors, timeouts.

End to end, tests/test_concurrency.py shows the batching at work on every store (its
output counts the writes: fewer than the requests). Here the queue alone, with threads
and events to hold a batch open while others line up behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flask_cloakroom.errors import StoreUnavailable
from flask_cloakroom.merges import MergeQueue


class Held:
    """A session's line whose first batch (``"a"``) is held open until :meth:`release`,
    so that others can line up behind it; ``then`` answers every batch."""

    def __init__(self, then: Callable[[list[str]], Any]) -> None:
        self.queue: MergeQueue[str, Any] = MergeQueue()
        self.batches: list[list[str]] = []
        self.results: dict[str, Any] = {}
        running, self._release = threading.Event(), threading.Event()

        def merge(batch: list[str]) -> Any:
            self.batches.append(batch)
            if batch == ["a"]:
                running.set()
                self._release.wait(5)
            return then(batch)

        self.merge = merge
        self._first = threading.Thread(target=self._run, args=("a", 5.0))
        self._first.start()
        assert running.wait(5)

    def _run(self, name: str, timeout: float) -> None:
        try:
            self.results[name] = self.queue.merge("k", name, self.merge, timeout=timeout)
        except Exception as error:
            self.results[name] = error

    def line_up(self, *names: str) -> list[threading.Thread]:
        """Start a request per name, arriving in this order, behind the held one."""
        threads = []
        for name in names:
            thread = threading.Thread(target=self._run, args=(name, 5.0))
            thread.start()
            threads.append(thread)
            time.sleep(0.02)
        return threads

    def release(self, *waiting: threading.Thread) -> None:
        self._release.set()
        for thread in (self._first, *waiting):
            thread.join(10)


def test_requests_queued_behind_a_merge_go_as_one_batch_in_arrival_order() -> None:
    held = Held(tuple)
    held.release(*held.line_up("b", "c", "d"))
    assert held.batches == [["a"], ["b", "c", "d"]]
    together = ("b", "c", "d")
    assert held.results == {"a": ("a",), "b": together, "c": together, "d": together}
    # Another session's line is separate, and an idle queue keeps nothing.
    assert held.queue.merge("other", "x", tuple, timeout=1) == ("x",)
    assert held.queue._lines == {}


def test_a_failed_batch_fails_each_of_its_requests_and_the_line_goes_on() -> None:
    def then(batch: list[str]) -> str:
        if "b" in batch:
            raise StoreUnavailable("the store went away")
        return "fine"

    held = Held(then)
    held.release(*held.line_up("b", "c"))
    assert held.results["a"] == "fine"
    assert all(isinstance(held.results[name], StoreUnavailable) for name in "bc")
    assert held.queue.merge("k", "e", held.merge, timeout=1) == "fine"  # handed on
    assert held.queue._lines == {}


def test_a_request_that_waits_too_long_leaves_the_line() -> None:
    held = Held(lambda batch: "ok")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"took more than 0\.2 s"):
        held.queue.merge("k", "late", held.merge, timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 2.0
    held.release()
    assert held.batches == [["a"]]  # the request that gave up was not merged afterwards
    assert held.queue._lines == {}
