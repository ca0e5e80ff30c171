"""The report model: aggregation per (route, method, auth), bounds, and the JSON contract."""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import random

import pytest

from memwatch.config import Config
from memwatch.monitor import Monitor
from memwatch.report import (
    MAX_HISTORY_POINTS,
    MAX_ROUTES_IN_REPORT,
    Leak,
    build_report,
    to_dict,
    to_json,
)
from tests.fixtures import PAGE_SIZE, STATM_RESIDENT_PAGES, FakeClock, make_signals

NOW = 1_795_000_000.0
CANARY = "Cr3d-Canary-9f8e7d6c5b4a"

# (route, method, auth, status, how many)
TRAFFIC = [
    ("/users/{id}", "GET", "bearer", 200, 40),
    ("/users/{id}", "GET", "bearer", 404, 5),
    ("/users/{id}", "GET", "bearer", 500, 2),
    ("/users/{id}", "GET", "basic", 401, 9),
    ("/orders", "POST", "apikey", 201, 30),
    ("/orders", "POST", "apikey", 422, 3),
    ("/", "GET", "anonymous", 200, 12),
    ("/health", "BREW", "anonymous", 200, 1),
]


def quiet_monitor(**options: object) -> Monitor:
    """A monitor on fixture signals that never samples on its own (requests or time)."""
    options.setdefault("sample_every_requests", 10**9)
    options.setdefault("sample_every_seconds", 10**9)
    options.setdefault("request_sample_rate", 0.0)
    return Monitor(
        Config(**options),  # type: ignore[arg-type]
        signals=make_signals(),
        clock=FakeClock(),
        rng=random.Random(7),
    )


def feed(monitor: Monitor, traffic: list[tuple[str, str, str, int, int]]) -> None:
    for route, method, auth, status, n in traffic:
        for i in range(n):
            credential = None if auth == "anonymous" else f"{CANARY}-{i}"
            monitor.request_exit(route, method, auth, credential, status, None)


def test_routes_are_aggregated_over_outcomes_and_sorted_by_requests() -> None:
    # GIVEN traffic on several routes, with several outcomes each
    monitor = quiet_monitor()
    feed(monitor, TRAFFIC)
    # WHEN the report is built
    report = build_report(monitor.snapshot(), now=NOW)
    # THEN each (route, method, auth) appears once with the sum over its outcomes
    expected: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for route, method, auth, _status, n in TRAFFIC:
        expected[(route, method if method != "BREW" else "OTHER", auth)] += n
    got = {(r.route, r.method, r.auth): r.requests for r in report.routes}
    assert got == dict(expected)
    # AND the busiest come first
    counts = [r.requests for r in report.routes]
    assert counts == sorted(counts, reverse=True)
    assert report.process is not None
    assert report.process.requests == sum(n for *_, n in TRAFFIC)


def test_report_keeps_the_busiest_routes_up_to_the_cap() -> None:
    monitor = quiet_monitor(max_routes=1000)
    n_routes = MAX_ROUTES_IN_REPORT + 100
    feed(monitor, [(f"/r{i}", "GET", "anonymous", 200, 1 + i % 7) for i in range(n_routes)])
    report = build_report(monitor.snapshot(), now=NOW)
    assert len(report.routes) == MAX_ROUTES_IN_REPORT
    kept = min(r.requests for r in report.routes)
    dropped = n_routes - MAX_ROUTES_IN_REPORT
    # Everything left out was no busier than the least busy route kept.
    all_counts = sorted((1 + i % 7 for i in range(n_routes)), reverse=True)
    assert kept == all_counts[MAX_ROUTES_IN_REPORT - 1]
    assert sum(all_counts[MAX_ROUTES_IN_REPORT:]) <= kept * dropped


@pytest.mark.parametrize(
    "n_samples",
    [
        0,
        1,
        2,
        MAX_HISTORY_POINTS - 1,
        MAX_HISTORY_POINTS,
        MAX_HISTORY_POINTS + 1,
        2 * MAX_HISTORY_POINTS - 1,
        2 * MAX_HISTORY_POINTS,
        2 * MAX_HISTORY_POINTS + 1,
        1000,
        2000,
    ],
)
def test_history_is_thinned_to_the_bound_keeping_first_and_last(n_samples: int) -> None:
    # GIVEN a monitor with n samples taken one second apart
    clock = FakeClock()
    monitor = Monitor(
        Config(history_size=2000, sample_every_requests=10**9, sample_every_seconds=10**9),
        signals=make_signals(),
        clock=clock,
        rng=random.Random(1),
    )
    for _i in range(n_samples):
        monitor.request_exit("/", "GET", "anonymous", None, 200, None)
        clock.advance(1.0)
        monitor.take_sample()
    # WHEN the report is built
    history = build_report(monitor.snapshot(), now=NOW).history
    # THEN it holds at most MAX points, all of them when there are few, first and last included
    if n_samples <= MAX_HISTORY_POINTS:
        assert len(history) == n_samples
    else:
        assert MAX_HISTORY_POINTS // 2 < len(history) <= MAX_HISTORY_POINTS
    if n_samples:
        assert history[0].seconds == 0.0 and history[0].requests == 1
        assert history[-1].requests == n_samples
        assert history[-1].seconds == pytest.approx(n_samples - 1.0)
        assert all(a.requests < b.requests for a, b in itertools.pairwise(history))
        assert history[-1].rss_bytes == STATM_RESIDENT_PAGES * PAGE_SIZE


def test_json_has_the_contract_keys_and_types() -> None:
    # GIVEN a report with a leak verdict
    monitor = quiet_monitor()
    feed(monitor, TRAFFIC)
    monitor.take_sample()
    leak = Leak(
        suspected=True,
        status="suspected",
        signal="heap",
        growth_bytes_per_request=812.0,
        growth_bytes_per_second=40500.0,
        confidence=0.999,
        since="2026-11-23T01:02:03Z",
        scales_with="distinct_credentials",
        advice="Bound app.views.AUDIT_LOG",
    )
    # WHEN it is rendered as JSON
    data = json.loads(to_json(build_report(monitor.snapshot(), leak=leak, now=NOW)))
    # THEN the contract's keys are there, with the contract's types
    assert {"leak", "routes", "sites", "roots"} <= set(data)
    assert data["leak"] == to_dict(build_report(monitor.snapshot(), leak=leak, now=NOW))["leak"]
    assert data["leak"]["growth_bytes_per_request"] == leak.growth_bytes_per_request
    for key, kind in [
        ("suspected", bool),
        ("signal", str),
        ("growth_bytes_per_request", float),
        ("growth_bytes_per_second", float),
        ("confidence", float),
        ("since", str),
        ("scales_with", str),
        ("advice", str),
    ]:
        assert isinstance(data["leak"][key], kind), key
    assert data["leak"]["suspected"] is True
    route = data["routes"][0]
    assert {
        "route",
        "method",
        "auth",
        "requests",
        "retained_bytes_per_request",
        "suspected",
    } <= set(route)
    assert isinstance(route["requests"], int)
    assert data["sites"] == [] and data["roots"] == []
    generated = datetime.datetime.fromisoformat(data["generated_at"].replace("Z", "+00:00"))
    assert data["generated_at"].endswith("Z") and generated.timestamp() == NOW
    assert data["process"]["rss_bytes"] == STATM_RESIDENT_PAGES * PAGE_SIZE


def test_default_leak_section_comes_from_the_monitor() -> None:
    monitor = quiet_monitor()
    data = json.loads(to_json(build_report(monitor.snapshot(), now=NOW)))
    assert data["leak"]["suspected"] is False
    assert data["leak"]["status"] in {"warming_up", "ok", "unknown"}
    assert data["routes"] == []
    assert data["history"] == []


def test_no_credential_reaches_the_report() -> None:
    monitor = quiet_monitor()
    feed(monitor, TRAFFIC)
    monitor.take_sample()
    body = to_json(build_report(monitor.snapshot(), now=NOW))
    assert CANARY.encode() not in body
    assert CANARY[:12].encode() not in body
    data = json.loads(body)
    assert set(data["process"]["distinct_credentials"]) <= {
        "bearer",
        "basic",
        "digest",
        "apikey",
        "session",
        "other",
    }
    # Distinct credentials are counted (not listed): 40 + 5 + 2 bearer credentials, 0..39 repeat.
    assert data["process"]["distinct_credentials"]["bearer"] == pytest.approx(40, rel=0.1)
