"""Prometheus metrics (``CLOAKROOM_METRICS = True``; needs ``flask-cloakroom[metrics]``).

Registered once per process in prometheus-client's default registry, with an
``app`` label so several apps can share a process:

``cloakroom_events_total{app, kind}``
    Session events by kind (logins, logouts, anomalies...).
``cloakroom_store_seconds{app, op}``
    A histogram of store operation latency (load, save, rotate...).
``cloakroom_store_errors_total{app, op}``
    Store operations that raised.
``cloakroom_live_sessions{app}``
    Live sessions, counted by the store when scraped (cached for 30 seconds,
    so a scrape never costs more than one count every 30 seconds).  The gauges
    hold an app's store weakly: an app that is dropped (an app factory run per
    test, say) is freed with its store, and its gauges go.
``cloakroom_redis_cache_lookups_total{app, result}``, and
``cloakroom_redis_cache_invalidations_total{app}``, ``cloakroom_redis_cache_records{app}``
    With ``CLOAKROOM_REDIS_CLIENT_CACHE``, in this process: cached reads
    (``result="hit"``) and reads that went to Redis (``"miss"``), records
    dropped because Redis said they changed, and records held.

Expose them as for any prometheus-client program, for example with
``prometheus_client.make_wsgi_app()`` mounted at ``/metrics``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .activity import Event
from .errors import ConfigError, NotSupported, StoreError
from .stores.base import Store

_CACHE_SECONDS = 30.0
_lock = threading.Lock()
_families: dict[str, Any] = {}
#: By app name: the app's store (held weakly) and its last count, when it was made.
_live: dict[str, tuple[Callable[[], Store | None], list[float]]] = {}
#: By app name: the store of an app with a client-side cache (held weakly).
_caches: dict[str, Callable[[], Any]] = {}


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise ConfigError(
            "CLOAKROOM_METRICS",
            "needs prometheus-client: pip install 'flask-cloakroom[metrics]' (or set it to False)",
        ) from error
    return prometheus_client


def _setup() -> dict[str, Any]:
    with _lock:
        if _families:
            return _families
        prometheus = _prometheus()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        _families["events"] = prometheus.Counter(
            "cloakroom_events", "Session events by kind.", ["app", "kind"]
        )
        _families["latency"] = prometheus.Histogram(
            "cloakroom_store_seconds",
            "Latency of session store operations.",
            ["app", "op"],
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                1.0,
            ),
        )
        _families["errors"] = prometheus.Counter(
            "cloakroom_store_errors", "Session store operations that failed.", ["app", "op"]
        )

        class LiveSessions(Collector):
            def collect(self) -> Iterator[Any]:
                family = GaugeMetricFamily(
                    "cloakroom_live_sessions", "Live sessions in the store.", labels=["app"]
                )
                for app, (held, cache) in list(_live.items()):
                    now = time.monotonic()
                    if now - cache[1] > _CACHE_SECONDS:
                        store = held()
                        if store is None:  # the app was dropped
                            _live.pop(app, None)
                            continue
                        try:
                            cache[0], cache[1] = float(store.count(now=time.time())), now
                        except (StoreError, NotSupported):
                            continue  # the store is down, or cannot count: no gauge
                    family.add_metric([app], cache[0])
                yield family
                yield from _cache_families()

        def _cache_families() -> Iterator[Any]:
            lookups = CounterMetricFamily(
                "cloakroom_redis_cache_lookups",
                "Session reads of the Redis client-side cache, by result.",
                labels=["app", "result"],
            )
            invalidations = CounterMetricFamily(
                "cloakroom_redis_cache_invalidations",
                "Cached records dropped because Redis said they changed.",
                labels=["app"],
            )
            records = GaugeMetricFamily(
                "cloakroom_redis_cache_records",
                "Records held by the Redis client-side cache.",
                labels=["app"],
            )
            for app, held in list(_caches.items()):
                store = held()
                if store is None:  # the app was dropped
                    _caches.pop(app, None)
                    continue
                stats = store.cache_stats()
                if stats is None:
                    continue
                lookups.add_metric([app, "hit"], stats["hits"])
                lookups.add_metric([app, "miss"], stats["misses"])
                invalidations.add_metric([app], stats["invalidations"])
                records.add_metric([app], stats["records"])
            yield from (lookups, invalidations, records)

        prometheus.REGISTRY.register(LiveSessions())
        return _families


class Metrics:
    """The metrics of one app: hand :meth:`observe_store` and :meth:`observe_event` around."""

    def __init__(self, app_name: str, store: Store) -> None:
        families = _setup()
        self.app = app_name
        self._events = families["events"]
        self._latency = families["latency"]
        self._errors = families["errors"]
        held = _weakly(store)
        _live[app_name] = (held, [0.0, float("-inf")])
        if callable(getattr(store, "cache_stats", None)):
            _caches[app_name] = held

    def observe_event(self, event: Event) -> None:
        """Count an event (an :class:`~flask_cloakroom.activity.ActivityLog` observer)."""
        self._events.labels(self.app, event.kind).inc()

    def observe_store(self, op: str, seconds: float, failed: bool) -> None:
        """Record one store operation (an :class:`InstrumentedStore` observer)."""
        self._latency.labels(self.app, op).observe(seconds)
        if failed:
            self._errors.labels(self.app, op).inc()


def _weakly(store: Store) -> Callable[[], Store | None]:
    """A weak reference to ``store``; a strong one for a store that takes none."""
    try:
        return weakref.ref(store)
    except TypeError:  # a third-party store with __slots__ and no __weakref__
        return lambda: store


def instrument(store: Store, metrics: Metrics) -> Store:
    """Wrap a store so every operation is timed into ``metrics``."""
    from .stores.instrumented import InstrumentedStore

    return InstrumentedStore(store, metrics.observe_store)
