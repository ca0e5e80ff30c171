"""Acceptance of leak detection and attribution on the detection corpus (docs/detection.md).

Every app of :mod:`tests.corpus` runs under a real server (gunicorn sync, gunicorn gthread or
uvicorn; one worker), wrapped with ``memwatch.wrap(app)`` at default settings, and receives the
seeded random traffic of :mod:`tests.corpus.traffic`; memwatch's verdict is read from
``/memwatch/report.json`` every 500 requests.

- A leaking app must be flagged within 20,000 requests with its leaking (route, method, auth)
  among the suspected routes, keep the verdict once given, and say what the growth scales with.
- A clean app must never be flagged in 20,000 requests (checked at every poll and with the alert
  counter of ``/metrics``), and memwatch must have judged it (status ``ok``) for at least the
  last 5,000 of them: a detector still warming up raises no alarm but proves nothing.
- The false-alarm soak is the clean apps' server runs: 5 x 20,000 requests, zero alerts. The
  same 100,000 requests driven in process (see :mod:`tests.corpus.inprocess`) run with
  ``MEMWATCH_SOAK=1`` only (see the note at that test).
- The corpus itself is checked in process, without memwatch: the leaking apps retain what the
  catalogue says on their leaking route (tracemalloc), the clean apps retain nothing after
  warm-up (heap blocks).

The runs print one line per poll; pytest shows them for a failing case.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from pathlib import Path
from typing import Any

import pytest

from tests.corpus import inprocess
from tests.corpus.catalog import CLEAN, LEAKING, Case
from tests.corpus.harness import MIN_JUDGED_REQUESTS, CaseResult, run_case

# `corpus`: part of `make test`; `make corpus` runs the corpora alone.
pytestmark = [pytest.mark.integration, pytest.mark.corpus]

SOAK_REQUESTS = 100_000
SOAK_SEED = 7


def _trend(result: CaseResult) -> str:
    """The polls as a compact table, for assertion messages."""
    rows = []
    for p in result.polls:
        marked = ", ".join(
            f"{r['method']} {r['route']} {r['auth']}" for r in p["routes"] if r["suspected"]
        )
        growth = p["growth_bytes_per_request"]
        rows.append(
            f"  {p['requests']:6d} {p['status']:10s} {p['signal'] or '-':5s} "
            f"{'-' if growth is None else f'{growth:8.1f}'} B/req "
            f"scales_with={p['scales_with']} rss={p['rss_bytes']} heap={p['heap_blocks']} [{marked}]"
        )
    return "\n".join(rows[-40:])


def _describe(result: CaseResult) -> str:
    return f"{result.summary()}\npolls:\n{_trend(result)}\nserver log:\n{result.server_log_tail}"


@pytest.mark.parametrize("case", LEAKING, ids=lambda c: c.name)
def test_leak_is_flagged_on_its_route(case: Case, tmp_path: Path) -> None:
    # GIVEN a leaking app under its server, WHEN its traffic runs until the leaking route is
    # marked (plus 1,000 requests to see the verdict hold) or 20,000 requests
    result = run_case(case, log_dir=tmp_path)
    assert case.leak is not None
    # THEN the leak is flagged, on the right route, method and auth scheme
    assert not result.unexpected_statuses, _describe(result)
    assert result.first_flagged is not None, _describe(result)
    assert result.detected is not None and result.detected <= case.max_requests, _describe(result)
    assert case.leak.route in result.routes_marked, _describe(result)
    # AND the verdict holds, and says what the growth scales with
    assert result.cleared_at is None, _describe(result)
    if case.leak.scales_with is not None:
        assert result.scales_with == case.leak.scales_with, _describe(result)
    assert result.passed, _describe(result)


@pytest.mark.parametrize("case", CLEAN, ids=lambda c: c.name)
def test_clean_app_is_never_flagged(case: Case, tmp_path: Path) -> None:
    # GIVEN a clean app (bounded caches, warm-up, capped logs), WHEN 20,000 requests run
    result = run_case(case, max_requests=max(case.max_requests, 20_000), log_dir=tmp_path)
    # THEN memwatch judged it (past warm-up, enough samples) for a good part of the run
    assert result.requests >= 20_000, _describe(result)
    assert result.first_verdict is not None, _describe(result)
    assert result.requests - result.first_verdict >= MIN_JUDGED_REQUESTS, _describe(result)
    # AND no poll ever saw a suspected leak, and no alert was ever raised in between
    assert not result.unexpected_statuses, _describe(result)
    assert result.first_flagged is None, _describe(result)
    assert result.alerts_total == 0, _describe(result)
    assert result.passed, _describe(result)


@functools.cache
def _soak_runs() -> dict[str, concurrent.futures.Future[dict[str, Any]]]:
    """Runs the soak of every clean app once, two child processes at a time (two cores); each
    test then reads its own app's outcome (or exception)."""
    requests = SOAK_REQUESTS // len(CLEAN)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return {
            case.name: pool.submit(inprocess.soak_in_subprocess, case, requests, SOAK_SEED)
            for case in CLEAN
        }


# The acceptance soak is the clean apps under their real servers above (5 x 20,000 requests,
# zero alerts). The same 100,000 requests driven in process, without a server (the driver and
# the load share the app's process and heap), are a second check. Until 2026-12-04 two of the
# clean apps drew a false alarm at 20-70 B/request in some of these runs (fastapi_plain on the
# heap, wsgi_id_paths on RSS): the collect check's readings counted the detector's own window
# of samples, which grows until the window is full (the cause found). With that fixed all five
# pass; in `make test` since.
@pytest.mark.parametrize("case", CLEAN, ids=lambda c: c.name)
def test_false_alarm_soak_in_process(case: Case) -> None:
    # GIVEN the clean apps, 100,000 requests split between them, driven in process (one child
    # process per app, so that each has its own heap and memwatch; two at a time)
    outcome = _soak_runs()[case.name].result()
    # THEN memwatch judges it for most of the run, never suspects a leak, never raises an alert
    flagged = [p for p in outcome["polls"] if p["suspected"]]
    judged = [
        p["requests"] for p in outcome["polls"] if p["status"] not in ("warming_up", "unknown")
    ]
    assert outcome["requests"] == SOAK_REQUESTS // len(CLEAN), outcome["requests"]
    assert judged, f"never judged in {outcome['requests']} requests"
    assert outcome["requests"] - judged[0] >= MIN_JUDGED_REQUESTS, judged[0]
    assert outcome["unexpected_statuses"] == 0, outcome
    assert not flagged, (
        f"{case.name}: false alarm at {flagged[0]['requests']} requests: {flagged[0]}"
        if flagged
        else ""
    )
    assert outcome["alerts_total"] == 0, outcome["alerts_total"]


@pytest.mark.skipif(os.environ.get("MEMWATCH_SOAK") != "1", reason="MEMWATCH_SOAK=1 only")
@pytest.mark.soak
@pytest.mark.parametrize("case", CLEAN, ids=lambda c: c.name)
def test_false_alarm_long_soak_in_process(case: Case) -> None:
    # The long version: 100,000 requests per clean app.
    outcome = inprocess.soak_in_subprocess(case, SOAK_REQUESTS, seed=SOAK_SEED + 1, timeout=1800)
    flagged = [p for p in outcome["polls"] if p["suspected"]]
    assert outcome["unexpected_statuses"] == 0, outcome
    assert not flagged, flagged[:1]
    assert outcome["alerts_total"] == 0, outcome["alerts_total"]


def _measure(case: Case) -> dict[str, Any]:
    if case.leak is None:
        # A clean app, unwrapped: 2,000 requests of warm-up, then 4,000 counted in heap blocks.
        return inprocess.measure_in_subprocess(case, warmup=2000, requests=4000, traced=False)
    # A leaking app, unwrapped: 1,500 requests of warm-up, then 2,000 traced by tracemalloc.
    return inprocess.measure_in_subprocess(case, warmup=1500, requests=2000, traced=True)


@functools.cache
def _measure_runs() -> dict[str, concurrent.futures.Future[dict[str, Any]]]:
    """Measures every app once, two child processes at a time (no server, no memwatch)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return {case.name: pool.submit(_measure, case) for case in (*LEAKING, *CLEAN)}


@pytest.mark.parametrize("case", [*LEAKING, *CLEAN], ids=lambda c: c.name)
def test_corpus_apps_retain_what_the_catalogue_says(case: Case) -> None:
    # GIVEN the app without memwatch, after its warm-up
    measured = _measure_runs()[case.name].result()
    if case.leak is None:
        # THEN a clean app keeps (next to) nothing: well below memwatch's smallest growth rate
        # of interest (8 B/request, 1/8 heap block at 64 B/block)
        assert abs(measured["blocks_per_request"]) < 0.1, measured
        return
    # THEN a leaking app keeps about what the catalogue says per request of its leaking route
    # (containers grow their tables in steps, hence the tolerance), in the range the corpus is
    # meant to cover
    per_request = measured["bytes_per_leaking_request"]
    assert per_request is not None, measured
    if case.leak.large:
        assert case.leak.bytes_per_request >= 60_000
        assert per_request >= 60_000, measured
    else:
        assert 250 <= case.leak.bytes_per_request <= 3_000
    assert 0.6 <= per_request / case.leak.bytes_per_request <= 1.6, (case.leak, measured)


@pytest.mark.parametrize("case", LEAKING, ids=lambda c: c.name)
def test_catalogue_sites_point_at_the_leaking_lines(case: Case) -> None:
    # The corpus apps change: the recorded leaking line must still be the one that allocates.
    assert case.leak is not None and case.leak.site is not None
    path, line = case.leak.site
    text = (Path(__file__).resolve().parents[2] / path).read_text().splitlines()[line - 1]
    assert case.leak.site_text in text, (path, line, text)
