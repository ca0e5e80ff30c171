"""prometheus_client multiprocess mode: one ``/metrics`` for all the workers of a server.

Under gunicorn or ``uvicorn --workers N`` every worker is its own process with its own monitor,
and a scrape reaches whichever worker accepts it. When ``PROMETHEUS_MULTIPROC_DIR`` is set,
each worker publishes its state into prometheus_client's per-process files, at most once a
second and only what changed, and ``/metrics`` aggregates the files of all workers:

- counters (requests, leak alerts, internal errors) are summed over workers;
- gauges (RSS, heap, verdict, growth rates, route estimates, distinct credentials) are kept
  per worker with a ``pid`` label (``liveall``: a dead worker's series disappear once
  :func:`memwatch.gunicorn.child_exit` or :func:`mark_process_dead` has run);
- the per-request delta histogram is summed over workers.

The request path is not touched: publishing happens when a sample is taken, and at scrape time
for the worker that serves the scrape.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_dead

if TYPE_CHECKING:
    from memwatch.monitor import Monitor

ENV = "PROMETHEUS_MULTIPROC_DIR"
PUBLISH_EVERY_SECONDS = 1.0


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark_process_dead(pid: int) -> None:
    """Removes a dead worker's live gauges (call it from the server's child-exit hook)."""
    if enabled():
        _mark_dead(pid)  # type: ignore[no-untyped-call]


def aggregate_registry() -> CollectorRegistry:
    """A registry that reads every worker's files (built per scrape, as prometheus_client
    recommends)."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


class Publisher:
    """Writes one worker's monitor state into prometheus_client's multiprocess files."""

    def __init__(self, monitor: Monitor) -> None:
        from memwatch.monitor import DELTA_BUCKETS

        self.monitor = monitor
        private = CollectorRegistry(auto_describe=False)  # never the global REGISTRY
        route = ["route", "method", "auth"]

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> Gauge:
            return Gauge(name, doc, labels or [], registry=private, multiprocess_mode="liveall")

        self.requests = Counter(
            "memwatch_requests",
            "Requests seen by memwatch, by route template, method, auth scheme and outcome.",
            ["route", "method", "auth", "outcome"],
            registry=private,
        )
        self.alerts = Counter(
            "memwatch_leak_alerts", "Times a leak became suspected.", registry=private
        )
        self.errors = Counter(
            "memwatch_internal_errors",
            "memwatch's own internal failures (each caught; the request went on).",
            registry=private,
        )
        self.deltas = Histogram(
            "memwatch_request_memory_delta_bytes",
            "Python heap growth across individually measured requests, in bytes.",
            ["route", "auth"],
            buckets=[b for b in DELTA_BUCKETS if math.isfinite(b)],
            registry=private,
        )
        self.rss = gauge("memwatch_process_resident_memory_bytes", "Resident set size, bytes.")
        self.heap = gauge("memwatch_python_heap_blocks", "Allocated Python heap blocks.")
        self.traced = gauge("memwatch_traced_memory_bytes", "Memory traced by tracemalloc.")
        self.tracing = gauge("memwatch_tracemalloc_active", "1 during a diagnosis window.")
        self.suspected = gauge("memwatch_leak_suspected", "1 when this worker leaks.")
        self.per_request = gauge(
            "memwatch_growth_bytes_per_request", "Growth per request by signal.", ["signal"]
        )
        self.per_second = gauge(
            "memwatch_growth_bytes_per_second", "Growth per second by signal.", ["signal"]
        )
        self.retained = gauge(
            "memwatch_route_retained_bytes_per_request", "Retained bytes per request.", route
        )
        self.route_suspected = gauge(
            "memwatch_route_leak_suspected", "1 when a route is suspected.", route
        )
        self.distinct = gauge(
            "memwatch_distinct_credentials", "Distinct credentials by auth scheme.", ["auth"]
        )
        self._published_counts: dict[tuple[str, str, str, str], int] = {}
        self._published_alerts = 0
        self._published_errors = 0
        self._last = 0.0
        self._lock = threading.Lock()
        if monitor.delta_log is None:
            # Exact per-request deltas for the summed histogram (bounded; drained each publish).
            # Last: a publisher whose files could not be created must not leave it filling.
            monitor.delta_log = collections.deque(maxlen=10_000)

    def maybe_publish(self) -> None:
        if time.monotonic() - self._last >= PUBLISH_EVERY_SECONDS:
            self.publish()

    def publish(self) -> None:
        """Writes what changed since the last call (safe to call from any thread)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._last = time.monotonic()
            self._publish()
        finally:
            self._lock.release()

    def _publish(self) -> None:
        monitor = self.monitor
        snap = monitor.snapshot()
        for key, count in snap.counts.items():
            delta = count - self._published_counts.get(key, 0)
            if delta > 0:
                self.requests.labels(*key).inc(delta)
                self._published_counts[key] = count
        verdict = snap.verdict
        if verdict.alerts > self._published_alerts:
            self.alerts.inc(verdict.alerts - self._published_alerts)
            self._published_alerts = verdict.alerts
        if snap.internal_errors > self._published_errors:
            self.errors.inc(snap.internal_errors - self._published_errors)
            self._published_errors = snap.internal_errors
        log = monitor.delta_log
        while log:
            route, auth, value = log.popleft()
            self.deltas.labels(route, auth).observe(value)
        # Before the first periodic sample, read now rather than publish zeros.
        last = snap.history[-1] if snap.history else monitor.read_signals()
        if last is not None:
            if last.rss_bytes is not None:
                self.rss.set(last.rss_bytes)
            if last.heap_blocks is not None:
                self.heap.set(last.heap_blocks)
        self.traced.set(last.traced_bytes or 0 if last is not None else 0)
        self.tracing.set(1 if snap.diagnosis_active else 0)
        self.suspected.set(1 if verdict.suspected else 0)
        for signal, trend in verdict.trends.items():
            self.per_request.labels(signal).set(_finite(trend.bytes_per_request))
            self.per_second.labels(signal).set(_finite(trend.bytes_per_second))
        for estimate in snap.routes:
            if estimate.retained_bytes_per_request is None:
                continue
            self.retained.labels(*estimate.key).set(_finite(estimate.retained_bytes_per_request))
            self.route_suspected.labels(*estimate.key).set(1 if estimate.suspected else 0)
        for scheme, value in snap.distinct_credentials.items():
            self.distinct.labels(scheme).set(round(value))
