"""The Prometheus collector on a fresh registry: exact values, contract names, no credentials."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from memwatch.config import Config
from memwatch.exporter import MemwatchCollector, render_metrics
from memwatch.monitor import Monitor
from tests.fixtures import PAGE_SIZE, STATM, STATM_RESIDENT_PAGES, FakeClock, make_signals

CANARY = "Sekr1t-Canary-Q7wErTy"

# Contract names (counters without their _total suffix, as the parser reports families).
CONTRACT_FAMILIES = {
    "memwatch_requests",
    "memwatch_process_resident_memory_bytes",
    "memwatch_python_heap_blocks",
    "memwatch_traced_memory_bytes",
    "memwatch_tracemalloc_active",
    "memwatch_growth_bytes_per_second",
    "memwatch_growth_bytes_per_request",
    "memwatch_leak_suspected",
    "memwatch_leak_alerts",
    "memwatch_route_retained_bytes_per_request",
    "memwatch_route_leak_suspected",
    "memwatch_request_memory_delta_bytes",
    "memwatch_distinct_credentials",
    "memwatch_internal_errors",
}


def setup(
    heap: Any = None, process: Any = None, statm: bool = True, **options: Any
) -> tuple[Monitor, CollectorRegistry]:
    options.setdefault("sample_every_requests", 10**6)
    options.setdefault("sample_every_seconds", 10**6)
    signals = make_signals(
        heap=heap or (lambda: 50_000),
        process=process,
        statm_path=str(STATM) if statm else None,
    )
    monitor = Monitor(Config(**options), signals=signals, clock=FakeClock(), rng=random.Random(11))
    registry = CollectorRegistry()
    registry.register(MemwatchCollector(monitor))
    return monitor, registry


def serve(
    monitor: Monitor,
    route: str,
    method: str = "GET",
    auth: str = "anonymous",
    credential: str | None = None,
    status: int = 200,
) -> None:
    probe = monitor.request_entry()
    monitor.request_exit(route, method, auth, credential, status, probe)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_requests_total_is_exact_per_label_set() -> None:
    monitor, registry = setup()
    traffic = [
        ("/users/{id}", "GET", "bearer", 200, 17),
        ("/users/{id}", "GET", "bearer", 401, 4),
        ("/orders", "POST", "apikey", 500, 3),
        ("/orders", "BREW", "anonymous", 404, 2),
    ]
    for route, method, auth, status, n in traffic:
        for i in range(n):
            serve(monitor, route, method, auth, f"c{i}" if auth != "anonymous" else None, status)
    value = registry.get_sample_value
    assert (
        value(
            "memwatch_requests_total",
            {"route": "/users/{id}", "method": "GET", "auth": "bearer", "outcome": "ok"},
        )
        == 17
    )
    assert (
        value(
            "memwatch_requests_total",
            {"route": "/users/{id}", "method": "GET", "auth": "bearer", "outcome": "rejected"},
        )
        == 4
    )
    assert (
        value(
            "memwatch_requests_total",
            {"route": "/orders", "method": "POST", "auth": "apikey", "outcome": "server_error"},
        )
        == 3
    )
    assert (
        value(
            "memwatch_requests_total",
            {"route": "/orders", "method": "OTHER", "auth": "anonymous", "outcome": "client_error"},
        )
        == 2
    )
    assert (
        value(
            "memwatch_requests_total",
            {"route": "/orders", "method": "BREW", "auth": "anonymous", "outcome": "client_error"},
        )
        is None
    )
    total = sum(
        s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        if f.name == "memwatch_requests"
        for s in f.samples
        if s.name == "memwatch_requests_total"
    )
    assert total == sum(n for *_, n in traffic)


def test_readings_are_exported() -> None:
    _monitor, registry = setup(heap=lambda: 123_456)
    value = registry.get_sample_value
    assert value("memwatch_process_resident_memory_bytes") == STATM_RESIDENT_PAGES * PAGE_SIZE
    assert value("memwatch_python_heap_blocks") == 123_456
    assert value("memwatch_leak_suspected") == 0
    assert value("memwatch_internal_errors_total") == 0


def test_tracemalloc_gauges_follow_tracing() -> None:
    if tracemalloc.is_tracing():  # pragma: no cover
        pytest.skip("tracemalloc already on")
    _monitor, registry = setup()
    assert registry.get_sample_value("memwatch_tracemalloc_active") == 0
    assert registry.get_sample_value("memwatch_traced_memory_bytes") == 0
    tracemalloc.start()
    try:
        ballast = [bytes(512) for _ in range(200)]
        assert registry.get_sample_value("memwatch_tracemalloc_active") == 1
        assert (registry.get_sample_value("memwatch_traced_memory_bytes") or 0) >= 200 * 512
        assert len(ballast) == 200
    finally:
        tracemalloc.stop()
    assert registry.get_sample_value("memwatch_tracemalloc_active") == 0


class Broken:
    def memory_info(self) -> Any:
        raise OSError(CANARY)


def test_failing_readings_count_as_internal_errors_and_drop_the_gauge() -> None:
    monitor, registry = setup(process=Broken(), statm=False)
    monitor.take_sample()
    assert registry.get_sample_value("memwatch_process_resident_memory_bytes") is None
    # The sample above failed once; the scrape's own reading fails too.
    assert (registry.get_sample_value("memwatch_internal_errors_total") or 0) >= 1
    assert CANARY not in generate_latest(registry).decode()


def test_distinct_credentials_gauge() -> None:
    monitor, registry = setup()
    for i in range(1000):
        serve(monitor, "/me", auth="bearer", credential=f"{CANARY}-{i}")
        serve(monitor, "/me", auth="bearer", credential=f"{CANARY}-{i}")
    for i in range(20):
        serve(monitor, "/login", auth="basic", credential=f"user{i}:pw")
    value = registry.get_sample_value
    assert value("memwatch_distinct_credentials", {"auth": "bearer"}) == pytest.approx(
        1000, rel=0.05
    )
    assert value("memwatch_distinct_credentials", {"auth": "basic"}) == pytest.approx(20, abs=1)
    assert value("memwatch_distinct_credentials", {"auth": "apikey"}) == 0
    assert value("memwatch_distinct_credentials", {"auth": "anonymous"}) is None


def test_request_memory_delta_histogram() -> None:
    # GIVEN every request measured, and a heap that grows by 10 blocks between two readings
    heap = iter(range(10_000, 10**9, 10))
    monitor, registry = setup(
        heap=lambda: next(heap), warmup_requests=0, request_sample_rate=1.0, heap_block_bytes=64.0
    )
    # WHEN 200 requests are served one after the other
    for _ in range(200):
        serve(monitor, "/grow", auth="session", credential="sid")
    # THEN the measured pairs are in the histogram, each at 10 blocks * 64 bytes
    labels = {"route": "/grow", "auth": "session"}
    value = registry.get_sample_value
    count = value("memwatch_request_memory_delta_bytes_bucket", {**labels, "le": "+Inf"}) or 0
    assert value("memwatch_request_memory_delta_bytes_count", labels) == count
    assert value("memwatch_request_memory_delta_bytes_sum", labels) == pytest.approx(640 * count)
    assert 50 <= count <= 100  # one pair per two requests, less any that spanned a collection
    assert value("memwatch_request_memory_delta_bytes_bucket", {**labels, "le": "256.0"}) == 0
    assert value("memwatch_request_memory_delta_bytes_bucket", {**labels, "le": "1024.0"}) == count
    assert value("memwatch_request_memory_delta_bytes_bucket", {**labels, "le": "0.0"}) == 0
    buckets = [
        s.value
        for s in families(registry)["memwatch_request_memory_delta_bytes"].samples
        if s.name.endswith("_bucket")
    ]
    assert buckets == sorted(buckets)  # cumulative


def test_exposition_parses_and_has_every_contract_family() -> None:
    monitor, registry = setup()
    serve(monitor, "/x", auth="bearer", credential="t")
    monitor.take_sample()
    found = families(registry)
    assert set(found) >= CONTRACT_FAMILIES, CONTRACT_FAMILIES - set(found)
    assert found["memwatch_requests"].type == "counter"
    assert found["memwatch_request_memory_delta_bytes"].type == "histogram"
    assert found["memwatch_leak_suspected"].type == "gauge"


def test_openmetrics_exposition_parses() -> None:
    monitor, registry = setup()
    serve(monitor, "/x", auth="bearer", credential="t")
    content_type, body = render_metrics(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    names = {f.name for f in openmetrics_families(body.decode())}
    assert {"memwatch_requests", "memwatch_internal_errors"} <= names
    plain_type, plain = render_metrics(registry, None)
    assert plain_type.startswith("text/plain")
    assert b"memwatch_requests_total" in plain


def test_no_credential_appears_in_the_exposition() -> None:
    # GIVEN requests carrying credentials in every place the classifier reads
    monitor, registry = setup()
    environs = [
        {"HTTP_AUTHORIZATION": f"Bearer {CANARY}"},
        {"HTTP_AUTHORIZATION": f"Basic {CANARY}"},
        {"HTTP_AUTHORIZATION": f'Digest username="{CANARY}", nonce="1"'},
        {"HTTP_X_API_KEY": CANARY},
        {"QUERY_STRING": f"access_token={CANARY}"},
        {"HTTP_COOKIE": f"sessionid={CANARY}"},
    ]
    for environ in environs:
        auth, credential = monitor.auth.from_environ(environ)
        assert credential == CANARY
        route = monitor.routes.for_path(f"/reset/{CANARY}")
        serve(monitor, route, auth=auth, credential=credential, status=401)
    monitor.take_sample()
    # WHEN scraped in both formats
    text = generate_latest(registry).decode()
    _, openmetrics = render_metrics(registry, "application/openmetrics-text")
    # THEN no credential (nor a piece of one) is there; the requests are
    for body in (text, openmetrics.decode()):
        assert CANARY not in body and CANARY[:10] not in body
    assert (
        registry.get_sample_value(
            "memwatch_requests_total",
            {"route": "/reset/{token}", "method": "GET", "auth": "bearer", "outcome": "rejected"},
        )
        == 2
    )  # Bearer header and access_token query


def test_route_label_set_is_bounded() -> None:
    monitor, registry = setup(max_routes=50)
    for i in range(1000):
        serve(
            monitor,
            monitor.routes.for_path(f"/page-{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x/{i}"),
        )
    routes = {s.labels["route"] for s in families(registry)["memwatch_requests"].samples}
    assert len(routes) <= 51
    assert "__other__" in routes
    assert registry.get_sample_value(
        "memwatch_requests_total",
        {"route": "__other__", "method": "GET", "auth": "anonymous", "outcome": "ok"},
    ) == 1000 - sum(
        registry.get_sample_value(
            "memwatch_requests_total",
            {"route": r, "method": "GET", "auth": "anonymous", "outcome": "ok"},
        )
        or 0
        for r in routes - {"__other__"}
    )


def test_fast_text_exposition_is_generate_latest_line_for_line() -> None:
    # GIVEN every family filled: routes that need escaping, histograms, distinct credentials
    heap = iter(range(10_000, 10**9, 10))
    monitor, registry = setup(
        heap=lambda: next(heap), warmup_requests=0, request_sample_rate=1.0, pair_budget_us=1e6
    )
    routes = ["/plain", '/quo"te', "/back\\slash", "/new\nline", "/comma,x=1"]
    for i in range(400):
        serve(
            monitor,
            routes[i % len(routes)],
            method=("GET", "POST", "BREW")[i % 3],
            auth=("bearer", "basic", "anonymous")[i % 3],
            credential=f"c{i}" if i % 3 < 2 else None,
            status=(200, 401, 404, 500)[i % 4],
        )
    monitor.take_sample()
    # WHEN memwatch's own writer and prometheus_client's encoder render the same registry
    _, fast = render_metrics(registry, None)
    slow = generate_latest(registry)

    # THEN they hold the same lines (the heap reading moves between the two reads)
    def lines(body: bytes) -> list[str]:
        return sorted(
            line
            for line in body.decode().splitlines()
            if not line.startswith("memwatch_python_heap_blocks ")
        )

    assert lines(fast) == lines(slow)
    assert '\\"' in fast.decode() and "\\n" in fast.decode()
