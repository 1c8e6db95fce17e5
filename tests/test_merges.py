"""The per-process merge queue (merges.py): batches, arrival order, errors, timeouts.

End to end, tests/test_concurrency.py shows the batching at work on every store (its
output counts the writes: fewer than the requests). Here the queue alone, with threads
and events to hold a batch open while others line up behind it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from flask_cloakroom.errors import StoreUnavailable
from flask_cloakroom.merges import MergeQueue


def line_up(
    queue: MergeQueue[str, Any], key: str, names: list[str], merge: Any, timeout: float = 5.0
) -> dict[str, Any]:
    """Start a thread per name, in order, each merging its name; return name -> result."""
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            results[name] = queue.merge(key, name, merge, timeout=timeout)
        except Exception as error:
            results[name] = error

    threads = []
    for name in names:
        thread = threading.Thread(target=run, args=(name,))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)  # arrive in this order
    for thread in threads:
        thread.join(10)
    return results


def test_requests_queued_behind_a_merge_go_as_one_batch_in_arrival_order() -> None:
    queue: MergeQueue[str, Any] = MergeQueue()
    batches: list[list[str]] = []
    first_running = threading.Event()
    release = threading.Event()

    def merge(batch: list[str]) -> tuple[str, ...]:
        batches.append(batch)
        if batch == ["a"]:
            first_running.set()
            release.wait(5)  # hold the first batch while b, c, d line up
        return tuple(batch)

    results: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: results.update(a=queue.merge("k", "a", merge, timeout=5))
    )
    first.start()
    first_running.wait(5)
    waiting = threading.Thread(
        target=lambda: results.update(line_up(queue, "k", ["b", "c", "d"], merge))
    )
    waiting.start()
    time.sleep(0.2)
    release.set()
    first.join(5)
    waiting.join(10)
    assert batches == [["a"], ["b", "c", "d"]]
    assert results == {
        "a": ("a",),
        "b": ("b", "c", "d"),
        "c": ("b", "c", "d"),
        "d": ("b", "c", "d"),
    }
    # Another session's line is separate, and an idle queue keeps nothing.
    assert queue.merge("other", "x", lambda batch: tuple(batch), timeout=1) == ("x",)
    assert queue._lines == {}


def test_a_failed_batch_fails_each_of_its_requests_and_the_line_goes_on() -> None:
    queue: MergeQueue[str, Any] = MergeQueue()
    first_running = threading.Event()
    release = threading.Event()
    calls: list[list[str]] = []

    def merge(batch: list[str]) -> str:
        calls.append(batch)
        if batch == ["a"]:
            first_running.set()
            release.wait(5)
            return "a done"
        if "b" in batch:
            raise StoreUnavailable("the store went away")
        return "fine"

    results: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: results.update(a=queue.merge("k", "a", merge, timeout=5))
    )
    first.start()
    first_running.wait(5)
    waiting = threading.Thread(
        target=lambda: results.update(line_up(queue, "k", ["b", "c"], merge))
    )
    waiting.start()
    time.sleep(0.15)
    release.set()
    first.join(5)
    waiting.join(10)
    assert results["a"] == "a done"
    assert isinstance(results["b"], StoreUnavailable) and isinstance(results["c"], StoreUnavailable)
    assert queue.merge("k", "e", merge, timeout=1) == "fine"  # the line was handed on
    assert queue._lines == {}


def test_a_request_that_waits_too_long_leaves_the_line() -> None:
    queue: MergeQueue[str, Any] = MergeQueue()
    first_running = threading.Event()
    release = threading.Event()
    batches: list[list[str]] = []

    def merge(batch: list[str]) -> str:
        batches.append(batch)
        if batch == ["a"]:
            first_running.set()
            release.wait(5)
        return "ok"

    first = threading.Thread(target=lambda: queue.merge("k", "a", merge, timeout=5))
    first.start()
    first_running.wait(5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"took more than 0\.2 s"):
        queue.merge("k", "late", merge, timeout=0.2)
    assert 0.15 <= time.monotonic() - started < 2.0
    release.set()
    first.join(5)
    assert batches == [["a"]]  # the request that gave up was not merged afterwards
    assert queue._lines == {}
