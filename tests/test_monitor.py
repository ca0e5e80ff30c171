"""The monitor through its public methods, with injected signals, a fake clock and a seeded rng."""

from __future__ import annotations

import collections
import gc
import itertools
import json
import logging
import math
import os
import random
import statistics
from typing import Any

import pytest

from memwatch.config import Config
from memwatch.monitor import MAX_SAMPLE_INTERVAL, Monitor
from tests.fixtures import PAGE_SIZE, STATM_RESIDENT_PAGES, FakeClock, make_signals

CANARY = "canary-Tk_91xQzP0wLmN"

OUTCOMES = [
    pytest.param(200, "ok", id="200"),
    pytest.param(201, "ok", id="201"),
    pytest.param(302, "ok", id="302"),
    pytest.param(304, "ok", id="304"),
    pytest.param(401, "rejected", id="401"),
    pytest.param(403, "rejected", id="403"),
    pytest.param(400, "client_error", id="400"),
    pytest.param(404, "client_error", id="404"),
    pytest.param(422, "client_error", id="422"),
    pytest.param(429, "client_error", id="429"),
    pytest.param(500, "server_error", id="500"),
    pytest.param(503, "server_error", id="503"),
]
OUTCOME_OF = {p.values[0]: p.values[1] for p in OUTCOMES}


def monitor(clock: FakeClock | None = None, signals: Any = None, **options: Any) -> Monitor:
    return Monitor(
        Config(**options),
        signals=signals or make_signals(),
        clock=clock or FakeClock(),
        rng=random.Random(20261123),
    )


def serve(
    m: Monitor,
    route: str,
    method: str = "GET",
    auth: str = "anonymous",
    credential: str | None = None,
    status: int = 200,
) -> None:
    """One request through the monitor's per-request path, as a middleware drives it."""
    probe = m.request_entry()
    m.request_exit(route, method, auth, credential, status, probe)


# --- counting ----------------------------------------------------------------------------------


def test_counts_per_key_are_exact() -> None:
    # GIVEN a mix of routes, methods, schemes and statuses, shuffled
    traffic = [
        (route, method, auth, status)
        for route, method, auth, status, n in [
            ("/users/{id}", "GET", "bearer", 200, 37),
            ("/users/{id}", "GET", "bearer", 401, 11),
            ("/users/{id}", "DELETE", "basic", 403, 3),
            ("/orders", "POST", "apikey", 201, 23),
            ("/orders", "POST", "apikey", 422, 5),
            ("/orders", "POST", "apikey", 503, 2),
            ("/", "GET", "anonymous", 302, 19),
        ]
        for _ in range(n)
    ]
    random.Random(5).shuffle(traffic)
    m = monitor()
    # WHEN they are served
    for route, method, auth, status in traffic:
        serve(m, route, method, auth, "cred" if auth != "anonymous" else None, status)
    # THEN every (route, method, auth, outcome) is counted exactly
    expected = collections.Counter((r, me, a, OUTCOME_OF[s]) for r, me, a, s in traffic)
    snap = m.snapshot()
    assert snap.counts == dict(expected)
    assert snap.requests == len(traffic) == m.requests


@pytest.mark.parametrize(("status", "outcome"), OUTCOMES)
def test_outcome_of_status(status: int, outcome: str) -> None:
    m = monitor()
    serve(m, "/x", status=status)
    assert m.snapshot().counts == {("/x", "GET", "anonymous", outcome): 1}


@pytest.mark.parametrize(
    ("method", "label"),
    [
        *[
            pytest.param(m, m, id=m)
            for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        ],
        pytest.param("PROPFIND", "OTHER", id="webdav"),
        pytest.param("BREW", "OTHER", id="made up"),
        pytest.param("get", "OTHER", id="lower case is another method"),
        pytest.param("G" * 10_000, "OTHER", id="huge"),
        pytest.param("", "OTHER", id="empty"),
    ],
)
def test_method_label(method: str, label: str) -> None:
    m = monitor()
    serve(m, "/x", method=method)
    assert list(m.snapshot().counts) == [("/x", label, "anonymous", "ok")]


# --- when samples are taken --------------------------------------------------------------------


def test_samples_every_n_requests() -> None:
    # A huge budget keeps the cost of readings out of the picture; the clock does not move.
    m = monitor(sample_every_requests=10, sample_every_seconds=3600.0, sample_budget_us=1e6)
    for _ in range(35):
        serve(m, "/x")
    assert [s.requests for s in m.history] == [10, 20, 30]


def test_samples_every_t_seconds() -> None:
    # GIVEN requests 0.3 s apart and a period of 1 s (the request count never triggers)
    clock = FakeClock()
    start = clock()
    m = monitor(clock, sample_every_requests=10**6, sample_every_seconds=1.0, sample_budget_us=1e6)
    # WHEN 100 requests arrive
    for _ in range(100):
        clock.advance(0.3)
        serve(m, "/x")
    # THEN a sample is taken by the first request at least 1 s after the previous sample
    times = [start] + [s.time for s in m.history]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 100 // 4
    assert all(1.0 <= gap < 1.0 + 0.3 for gap in gaps), gaps


@pytest.mark.parametrize(
    "cost_us", [0.0, 30.0, 144.0], ids=["cheap heap", "1 M blocks", "5 M blocks"]
)
def test_sampling_interval_stretches_with_the_cost_of_a_heap_reading(cost_us: float) -> None:
    # GIVEN a heap reading that costs cost_us microseconds (it advances a fake perf clock)
    perf = FakeClock()

    def heap() -> int:
        perf.advance(cost_us * 1e-6)
        return 1_000_000

    clock = FakeClock()
    budget = 0.25
    m = monitor(
        clock,
        make_signals(heap=heap, perf=perf),
        sample_every_requests=10,
        sample_every_seconds=1.0,
        sample_budget_us=budget,
        warmup_requests=100_000,  # in the warm-up: no boost towards a first verdict
    )
    for _ in range(60):  # the monitor learns the cost from its readings (request count 0)
        m.take_sample()
    # WHEN requests arrive 10 s apart (the period alone would sample on every request)
    n = 3000
    for _ in range(n):
        clock.advance(10.0)
        serve(m, "/x")
    # THEN samples are spaced by the cost: never more than budget µs of heap reading per request,
    # a walk being charged at twice its time (it leaves the caches cold for the app)
    marks = [s.requests for s in m.history if s.requests > 0]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    expected = min(max(1, math.ceil(2 * cost_us / budget)), MAX_SAMPLE_INTERVAL)  # capped
    assert len(gaps) >= min(n // (expected + 1), m.config.history_size) - 2
    assert min(gaps) >= expected
    assert max(gaps) <= expected + 1  # and no more than the cost demands
    if cost_us == 144.0:
        assert min(gaps) >= 144 / 0.25


def test_a_frozen_clock_still_samples_every_n_requests_when_readings_are_cheap() -> None:
    m = monitor(sample_every_requests=25, sample_every_seconds=1.0)
    for _ in range(100):
        serve(m, "/x")
    marks = [s.requests for s in m.history]
    assert marks == [25, 50, 75, 100]


# --- distinct credentials ----------------------------------------------------------------------


@pytest.mark.parametrize("distinct", [1, 25, 1000, 5000])
def test_distinct_credentials_are_estimated(distinct: int) -> None:
    m = monitor(sample_every_requests=10**6)
    for _repeat in range(3):
        for i in range(distinct):
            serve(m, "/me", auth="bearer", credential=f"{CANARY}-{i}")
    serve(m, "/", auth="anonymous")
    serve(m, "/", auth="basic", credential="only-one")
    estimates = m.snapshot().distinct_credentials
    assert estimates["bearer"] == pytest.approx(distinct, rel=0.05)
    assert estimates["basic"] == pytest.approx(1, abs=0.5)
    assert estimates["apikey"] == 0
    assert "anonymous" not in estimates


# --- failing readings --------------------------------------------------------------------------


class FailingProcess:
    """A psutil.Process stand-in whose reading fails with a message quoting a secret."""

    def __init__(self) -> None:
        self.calls = 0

    def memory_info(self) -> Any:
        self.calls += 1
        raise PermissionError(f"cannot read /proc/1/status for token {CANARY}")


def test_a_failing_rss_reader_is_counted_and_logged_once_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN no statm file and a process object that always fails
    process = FailingProcess()
    m = monitor(
        signals=make_signals(statm_path=None, process=process),
        sample_every_requests=10**6,
        request_sample_rate=0.0,
    )
    caplog.set_level(logging.DEBUG, logger="memwatch")
    # WHEN three samples are taken
    samples = [m.take_sample() for _ in range(3)]
    # THEN each has no RSS but still its heap reading, and each failure is counted
    assert all(s is not None and s.rss_bytes is None for s in samples)
    assert all(s is not None and s.heap_blocks == 50_000 for s in samples)
    assert process.calls == 3
    assert m.snapshot().internal_errors == 3
    assert m.errors.by_where == {"signals.rss": 3}
    # AND it is logged once, naming the exception type, never its message
    records = [r for r in caplog.records if r.name == "memwatch"]
    assert len(records) == 1
    assert "PermissionError" in caplog.text and "signals.rss" in caplog.text
    assert CANARY not in caplog.text


def test_a_failing_heap_reader_leaves_the_rest_of_the_sample() -> None:
    def heap() -> int:
        raise MemoryError(CANARY)

    m = monitor(signals=make_signals(heap=heap), request_sample_rate=0.0)
    sample = m.take_sample()
    assert sample is not None
    assert sample.heap_blocks is None
    assert sample.rss_bytes == STATM_RESIDENT_PAGES * PAGE_SIZE
    assert m.errors.by_where == {"signals.heap": 1}


def test_snapshot_is_a_copy() -> None:
    m = monitor()
    serve(m, "/a")
    m.take_sample()
    snap = m.snapshot()
    serve(m, "/a")
    serve(m, "/b")
    m.take_sample()
    assert snap.counts == {("/a", "GET", "anonymous", "ok"): 1}
    assert snap.requests == 1 and len(snap.history) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_afresh() -> None:
    # GIVEN a monitor that counted requests in the parent
    m = monitor()
    for _ in range(5):
        serve(m, "/a")
    m.take_sample()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            snap = m.snapshot()
            serve(m, "/child")
            os.write(
                write,
                json.dumps(
                    {
                        "requests": snap.requests,
                        "history": len(snap.history),
                        "pid": m.pid,
                        "after": m.snapshot().counts.get(("/child", "GET", "anonymous", "ok"), 0),
                    }
                ).encode(),
            )
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    # THEN the child's monitor is empty and its own, and the parent's is untouched
    assert child == {"requests": 0, "history": 0, "pid": pid, "after": 1}
    assert m.snapshot().requests == 5 and m.pid == os.getpid()


def test_sampling_is_boosted_from_the_warm_up_to_the_first_verdict() -> None:
    perf = FakeClock()

    def heap() -> int:
        perf.advance(60e-6)  # 60 µs a reading: 120 requests apart at the 1 µs budget
        return 200_000

    clock = FakeClock()
    m = monitor(clock, make_signals(heap=heap, perf=perf), warmup_requests=1000)
    for _ in range(60):
        m.take_sample()
    gaps_by_phase: dict[str, list[int]] = {"warm-up": [], "boost": [], "judging": []}
    last = 0
    for _ in range(12_000):
        clock.advance(0.001)
        serve(m, "/x")
        newest = m.history[-1].requests
        if newest != last:
            phase = (
                "warm-up"
                if newest < 1000
                else ("judging" if m.detector.verdict.status != "warming_up" else "boost")
            )
            gaps_by_phase[phase].append(newest - last)
            last = newest
    # 120 requests apart (the cost) while warming up and once judging; in between, four times
    # the budget allows 30, and the period (50) rules: the first verdict comes sooner
    assert statistics.median(gaps_by_phase["warm-up"][5:]) == 120
    assert statistics.median(gaps_by_phase["boost"]) == 50
    assert statistics.median(gaps_by_phase["judging"]) == 120


def test_steady_state_spaces_periodic_work_by_its_whole_cost_and_a_suspicion_restores_it() -> None:
    # GIVEN readings that cost 8 µs a sample (timed by the monitor's own timer), a flat heap,
    # a sample every 20 requests and a detector with a 48-sample window
    perf = FakeClock()
    blocks = [200_000]

    def heap() -> int:
        perf.advance(8e-6)
        return blocks[0]

    clock = FakeClock()
    m = Monitor(
        Config(
            warmup_requests=400,
            sample_every_requests=20,
            window_samples=48,
            steady_budget_us=1.0,
            sample_budget_us=100.0,  # heap readings never hold back time-based samples
            diagnosis="off",
        ),
        signals=make_signals(heap=heap, perf=perf),
        clock=clock,
        rng=random.Random(20261206),
        timer=perf,
    )
    gaps: dict[str, list[int]] = collections.defaultdict(list)
    last = 0

    def run(requests: int, leak: int = 0) -> None:
        nonlocal last
        for _ in range(requests):
            clock.advance(0.001)
            blocks[0] += leak
            serve(m, "/x")
            newest = m.history[-1].requests if len(m.history) else 0
            if newest != last:
                steady = m._steady
                suspicious = m.detector.confirming or m.detector.verdict.suspected
                phase = "steady" if steady else ("suspicious" if suspicious else "early")
                gaps[phase].append(newest - last)
                last = newest

    # WHEN the detector has judged a full window and suspects nothing
    run(5_000)
    # THEN samples come at the period until then, and in steady state as far apart as the
    # sample's whole cost, charged twice, allows in its share of the budget: 2 x 8 / 0.4 = 40
    assert m.detector.verdict.status == "ok"
    assert statistics.median(gaps["early"]) == 20
    assert statistics.median(gaps["steady"]) == 40
    # AND measured requests are spaced by their own cost in steady state (none of it is timed
    # here but the heap readings of heavy pairs, so the rate is only bounded by the budget)
    assert 0.0 < m._pair_rate <= m.config.request_sample_rate
    # AND at low traffic samples still come every sample_every_seconds (1 s here)
    before = len(m.history)
    for _ in range(30):
        clock.advance(0.3)
        serve(m, "/x")
    times = [m.history[i].time for i in range(before - 1, len(m.history))]
    assert len(times) >= 7
    assert all(b - a <= 1.0 + 0.3 + 1e-9 for a, b in itertools.pairwise(times)), times
    assert m._steady
    # WHEN the heap starts growing by 4 blocks (256 B) per request
    run(8_000, leak=4)
    # THEN the rise of the heap's lower envelope ends the steady state at once (the early
    # density returns before the detector has judged anything), and the suspicion is
    # confirmed, with samples at the period again while it is
    assert m._dense_until > 0
    assert m.detector.verdict.suspected
    assert statistics.median(gaps["suspicious"]) == 20
    assert not m._steady


# --- the fast path: requests queued as records, drained in batches ---------------------------


def serve_fast(
    m: Monitor,
    template: str | None,
    path: str | None = None,
    auth: str = "anonymous",
    credential: str | None = None,
    status: int = 200,
) -> bool:
    """One request as the middlewares record it; True when it was a measured one."""
    probe = m.request_entry()
    fingerprint = m.fingerprint(credential) if credential else None
    record = (template, path, "GET", auth, status, fingerprint)
    if probe is None:
        m.enqueue(record)
        return False
    m.record_measured(*record, probe)
    return True


def test_fast_path_counts_are_exact_and_samples_come_every_n_requests() -> None:
    m = monitor(sample_every_requests=10, sample_every_seconds=3600.0, sample_budget_us=1e6)
    for i in range(35):
        serve_fast(m, "/x" if i % 2 else None, path=f"/users/{i}", status=404 if i % 5 else 200)
    # A sample is taken at the entry of the request it is due at, after draining the queue.
    assert [s.requests for s in m.history] == [10, 20, 30]
    counts = m.snapshot().counts
    assert counts == {
        ("/x", "GET", "anonymous", "client_error"): 14,
        ("/x", "GET", "anonymous", "ok"): 3,
        ("/users/{id}", "GET", "anonymous", "client_error"): 14,
        ("/users/{id}", "GET", "anonymous", "ok"): 4,
    }
    assert m.requests == 35


def test_fast_path_samples_every_t_seconds_at_low_traffic() -> None:
    # GIVEN requests 0.3 s apart, a period of 1 s and a request count that never triggers
    clock = FakeClock()
    start = clock()
    m = monitor(clock, sample_every_requests=10**6, sample_every_seconds=1.0, sample_budget_us=1e6)
    for _ in range(100):
        clock.advance(0.3)
        serve_fast(m, "/x")
    # THEN the queue is drained often enough that every sample comes within a request of due
    times = [start] + [s.time for s in m.history]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 100 // 4 - 1
    assert all(1.0 <= gap < 1.0 + 0.3 + 1e-9 for gap in gaps), gaps


def test_fast_path_credentials_reach_the_sketches() -> None:
    m = monitor(sample_every_requests=10**6, sample_every_seconds=3600.0)
    for i in range(3000):
        serve_fast(m, "/x", auth="bearer", credential=f"{CANARY}-{i % 1000}")
    distinct = m.snapshot().distinct_credentials["bearer"]
    assert 950 <= distinct <= 1050
    assert 700 <= m.first_seen <= 1300  # one in four sampled, times four


def test_fast_path_measures_the_configured_share_of_requests() -> None:
    m = monitor(request_sample_rate=0.05, sample_every_requests=10**6)
    measured = sum(serve_fast(m, "/x") for _ in range(20_000))
    # Pairs: a measured request and the next one to enter, so about 2 x 5 %, never 0.
    assert 1400 <= measured <= 2600
    assert m.snapshot().requests == 20_000


def test_the_queue_is_bounded_when_nothing_drains_it() -> None:
    from memwatch.monitor import PENDING_MAX

    m = monitor()
    for _ in range(PENDING_MAX + 1000):
        m.enqueue(("/x", None, "GET", "anonymous", 200, None))  # no request_entry(): no drain
    assert len(m._pending) == PENDING_MAX
    assert m.snapshot().requests == PENDING_MAX


def test_fast_path_counts_are_exact_under_threads() -> None:
    import threading

    m = monitor(sample_every_requests=50, request_sample_rate=0.05)

    def worker(n: int) -> None:
        for i in range(5000):
            serve_fast(m, f"/r{n % 3}", auth="bearer", credential=f"t{i % 50}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    snap = m.snapshot()
    assert snap.requests == 40_000
    assert sum(snap.counts.values()) == 40_000
    assert snap.counts[("/r0", "GET", "bearer", "ok")] == 3 * 5000


def test_collect_check_readings_do_not_count_the_detector_s_own_window() -> None:
    """The collect check's full-collection readings are taken before the detector builds its
    window of samples: counted, that window (a few thousand blocks, growing until it is full)
    looked like a leak of about 10 B/request under uvicorn."""
    from memwatch.signals import Sample

    def live_samples() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is Sample)

    baseline = live_samples()
    served = [0]
    full = [gc.get_stats()[2]["collections"]]
    seen: list[int] = []

    def heap() -> int:
        # Right after a full collection (the check's reading): how many samples are alive?
        now = gc.get_stats()[2]["collections"]
        if now != full[0]:
            full[0] = now
            seen.append(live_samples() - baseline)
        return 50_000 + 40 * served[0]  # a leak the detector suspects and the check confirms

    clock = FakeClock()
    m = Monitor(
        Config(warmup_requests=0, sample_every_requests=10, diagnosis="off"),
        signals=make_signals(heap=heap),
        clock=clock,
        rng=random.Random(5),
    )
    for _ in range(6000):
        served[0] += 1
        clock.advance(0.01)
        m.request_exit("/me", "GET", "bearer", None, 200, m.request_entry())
        if m.detector.verdict.suspected:
            break
    check = m.detector.collect_check
    assert m.detector.verdict.suspected and check is not None and check.collections >= 2
    assert len(seen) >= 2
    # The window holds up to 192 samples; at the readings at most the newest one is alive.
    assert max(seen) <= 2, seen



@pytest.mark.parametrize("speedups", [True, False])
def test_the_request_gate_knows_whether_a_diagnosis_window_runs(speedups: bool) -> None:
    # The compiled paths read the gate's flag instead of the diagnosis at every request.
    from memwatch.recorder import make_gate

    m = monitor(speedups=speedups)
    assert m._gate.window_open is False
    try:
        assert m.start_diagnosis("test", force=True)
        assert m.diagnosis.window is not None
        assert m._gate.window_open is True
        # A gate attached while a window runs (a new one, as after a fork) is told at once.
        fresh = make_gate(compiled=speedups)
        m.diagnosis.attach(fresh)
        assert fresh.window_open is True
    finally:
        m.diagnosis.abandon()
    assert m.diagnosis.window is None
    assert fresh.window_open is False
