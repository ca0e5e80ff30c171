"""Prometheus export: a collector that builds memwatch's metric families at scrape time.

The request path never touches prometheus_client: it bumps plain counters in the monitor, and
:class:`MemwatchCollector` turns a snapshot of them into families when Prometheus scrapes. Label
sets are bounded by construction: routes by the route table's cap, ``auth`` and ``outcome`` by
fixed vocabularies, ``method`` by a fixed set plus ``OTHER``.

Use it with any registry::

    registry = CollectorRegistry()
    registry.register(MemwatchCollector(monitor))
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from memwatch.monitor import DELTA_BUCKETS, Monitor


class MemwatchCollector(Collector):
    """Builds memwatch's metric families from the monitor's state at scrape time.

    :param monitor: The monitor to read.
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        # An empty describe() lets the registry accept the collector without calling collect()
        # at registration time (which would read the signals during start-up).
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._families())
        except Exception as exc:
            # A scrape still answers, with what is left to say: memwatch's own failures.
            self.monitor.errors.record("exporter.collect", exc)
            families = [_internal_errors(self.monitor.errors.total)]
        return iter(families)

    def _families(self) -> Iterator[Metric]:
        monitor = self.monitor
        snap = monitor.snapshot()

        requests = CounterMetricFamily(
            "memwatch_requests",
            "Requests seen by memwatch, by route template, method, auth scheme and outcome.",
            labels=["route", "method", "auth", "outcome"],
        )
        for (route, method, auth, outcome), count in sorted(snap.counts.items()):
            requests.add_metric([route, method, auth, outcome], count)
        yield requests

        reading = monitor.read_signals()
        rss = GaugeMetricFamily(
            "memwatch_process_resident_memory_bytes",
            "Resident set size of this process, in bytes.",
        )
        if reading.rss_bytes is not None:
            rss.add_metric([], reading.rss_bytes)
        yield rss
        heap = GaugeMetricFamily(
            "memwatch_python_heap_blocks", "Allocated Python heap blocks (sys.getallocatedblocks)."
        )
        if reading.heap_blocks is not None:
            heap.add_metric([], reading.heap_blocks)
        yield heap
        yield GaugeMetricFamily(
            "memwatch_traced_memory_bytes",
            "Memory traced by tracemalloc, in bytes (0 when tracing is off).",
            value=reading.traced_bytes or 0,
        )
        yield GaugeMetricFamily(
            "memwatch_tracemalloc_active",
            "1 while tracemalloc is tracing (a diagnosis window), else 0.",
            value=1 if reading.traced_bytes is not None else 0,
        )

        verdict = snap.verdict
        yield GaugeMetricFamily(
            "memwatch_leak_suspected",
            "1 when memwatch suspects that this process leaks memory, else 0.",
            value=1 if verdict.suspected else 0,
        )
        yield CounterMetricFamily(
            "memwatch_leak_alerts",
            "Times a leak became suspected in this process.",
            value=verdict.alerts,
        )
        per_request = GaugeMetricFamily(
            "memwatch_growth_bytes_per_request",
            "Sustained memory growth per request by signal (Theil-Sen slope over the detector's "
            "window; 0 while no significant trend).",
            labels=["signal"],
        )
        per_second = GaugeMetricFamily(
            "memwatch_growth_bytes_per_second",
            "Sustained memory growth per second by signal (0 while no significant trend).",
            labels=["signal"],
        )
        for signal, trend in sorted(verdict.trends.items()):
            per_request.add_metric([signal], _finite(trend.bytes_per_request))
            per_second.add_metric([signal], _finite(trend.bytes_per_second))
        yield per_request
        yield per_second
        retained = GaugeMetricFamily(
            "memwatch_route_retained_bytes_per_request",
            "Estimated bytes retained per request, by route, method and auth scheme.",
            labels=["route", "method", "auth"],
        )
        route_suspected = GaugeMetricFamily(
            "memwatch_route_leak_suspected",
            "1 when a route's retained bytes per request are significantly above zero during a "
            "suspected leak, else 0.",
            labels=["route", "method", "auth"],
        )
        for route_estimate in sorted(snap.routes, key=lambda e: e.key):
            if route_estimate.retained_bytes_per_request is None:
                continue
            labels = list(route_estimate.key)
            retained.add_metric(labels, _finite(route_estimate.retained_bytes_per_request))
            route_suspected.add_metric(labels, 1 if route_estimate.suspected else 0)
        yield retained
        yield route_suspected

        histogram = HistogramMetricFamily(
            "memwatch_request_memory_delta_bytes",
            "Python heap growth across individually measured (sampled) requests, in bytes.",
            labels=["route", "auth"],
        )
        for (route, auth), hist in sorted(snap.deltas.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(DELTA_BUCKETS, hist.buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if math.isinf(bound) else repr(bound), cumulative))
            histogram.add_metric([route, auth], buckets, hist.total)
        yield histogram

        distinct = GaugeMetricFamily(
            "memwatch_distinct_credentials",
            "Estimated distinct credentials seen, by auth scheme (HyperLogLog of keyed hashes).",
            labels=["auth"],
        )
        for scheme, estimate in sorted(snap.distinct_credentials.items()):
            distinct.add_metric([scheme], round(estimate))
        yield distinct

        yield _internal_errors(snap.internal_errors)


def _internal_errors(total: int) -> CounterMetricFamily:
    return CounterMetricFamily(
        "memwatch_internal_errors",
        "memwatch's own internal failures (each caught; the request went on).",
        value=total,
    )


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def render_metrics(registry: CollectorRegistry, accept: str | None) -> tuple[str, bytes]:
    """The exposition in the format the scraper accepts (text, or OpenMetrics if asked)."""
    encoder, content_type = choose_encoder(accept or "")
    return content_type, encoder(registry)
