"""The process verdict on synthetic series with known answers, and the collect check."""

from __future__ import annotations

import gc
import math
import random
import sys
from collections.abc import Callable

import pytest

from memwatch.config import Config
from memwatch.detector import CHECK_BYTES, CollectCheck, Detector, Verdict
from memwatch.signals import Sample

BLOCK = 64.0  # Config().heap_block_bytes
EVERY = 50  # requests between samples


def series(
    heap: Callable[[int], float],
    *,
    n: int = 600,
    noise_blocks: float = 20.0,
    seed: int = 1,
    pending: Callable[[int], int] | None = None,
    rss: Callable[[int], float] | None = None,
) -> list[Sample]:
    """Samples every EVERY requests; ``heap(requests)`` in bytes above a base of 200,000 blocks."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for i in range(n):
        requests = (i + 1) * EVERY
        waiting = pending(requests) if pending else 0
        blocks = 200_000 + heap(requests) / BLOCK + rng.gauss(0.0, noise_blocks) + waiting
        out.append(
            Sample(
                time=i * 0.1,
                wall=1e9 + i * 0.1,
                requests=requests,
                rss_bytes=int(50e6 + (rss(requests) if rss else 0.0)),
                heap_blocks=int(blocks),
                gc_pending=waiting,
                gc_collections=(i, 0, 0),
                traced_bytes=None,
            )
        )
    return out


def run(samples: list[Sample], detector: Detector | None = None) -> tuple[Verdict, int | None]:
    """Evaluates after every envelope block, as the monitor does; (last verdict, requests at
    the first suspected verdict)."""
    config = Config()
    detector = detector or Detector(config)
    first: int | None = None
    verdict = detector.verdict
    for end in range(config.envelope_width, len(samples) + 1, config.envelope_width):
        if samples[end - 1].requests < config.warmup_requests:
            continue
        verdict = detector.evaluate(samples[max(0, end - 1024) : end], 0.0)
        if verdict.suspected and first is None:
            first = samples[end - 1].requests
    return verdict, first


def test_noise_only_is_never_suspected() -> None:
    for seed in range(5):
        verdict, first = run(series(lambda r: 0.0, seed=seed))
        assert first is None, seed
        assert verdict.status == "ok"


def test_linear_growth_is_suspected_early_with_its_rate() -> None:
    verdict, first = run(series(lambda r: 40.0 * r))
    assert first is not None and first <= 6_000
    assert verdict.suspected and verdict.signal == "heap"
    assert verdict.bytes_per_request == pytest.approx(40.0, rel=0.15)


def test_small_leak_below_the_minimum_rate_is_not_suspected() -> None:
    _verdict, first = run(series(lambda r: 3.0 * r, noise_blocks=2.0))
    assert first is None


def test_saturating_growth_plateaus_and_never_alerts() -> None:
    # Caches that fill towards 2 MB with a time constant of 500 requests, then stay (still
    # growing by 37 B/request when the warm-up of 2,000 requests ends).
    _verdict, first = run(series(lambda r: 2e6 * (1.0 - math.exp(-r / 500.0))))
    assert first is None


def test_step_during_warm_up_then_flat_never_alerts() -> None:
    _verdict, first = run(series(lambda r: 500_000.0 if r > 1_500 else 0.0))
    assert first is None


def test_step_growth_that_keeps_stepping_is_suspected() -> None:
    # 64 KiB every 1,000 requests: about 65 B/request in steps.
    verdict, first = run(series(lambda r: 65_536.0 * (r // 1_000)))
    assert first is not None
    assert verdict.bytes_per_request == pytest.approx(65.5, rel=0.3)


def test_sawtooth_of_pending_garbage_is_not_a_leak() -> None:
    # Container garbage piles up between generation-0 collections every 700 requests.
    _verdict, first = run(series(lambda r: 0.0, pending=lambda r: (r % 700) * 2))
    assert first is None


def test_sawtooth_on_top_of_a_leak_is_still_suspected() -> None:
    verdict, first = run(series(lambda r: 30.0 * r, pending=lambda r: (r % 700) * 2))
    assert first is not None and verdict.suspected


def test_large_buffers_seen_by_rss_only() -> None:
    verdict, first = run(series(lambda r: 0.0, rss=lambda r: 4096.0 * r))
    assert first is not None
    assert verdict.signal == "rss"


def test_clears_with_hysteresis_when_growth_stops() -> None:
    samples = series(lambda r: 40.0 * min(r, 12_000))
    verdict, first = run(samples)
    assert first is not None
    assert not verdict.suspected and verdict.alerts == 1


# --- the collect check ---------------------------------------------------------------------


class FakeHeap:
    """A heap whose collected size is known: ``retained`` bytes per request stay, the rest is
    garbage that a collection gives back. Readings come through the check's seams."""

    def __init__(self, retained: float) -> None:
        self.retained = retained
        self.requests = 0
        self.collections = 0

    def collect(self) -> None:
        self.collections += 1

    def blocks(self) -> int:
        return int(200_000 + self.retained * self.requests / BLOCK)


def run_checked(
    samples: list[Sample], heap: FakeHeap, reasons: list[str] | None = None
) -> tuple[Verdict, int | None, Detector]:
    config = Config()
    detector = Detector(config, CollectCheck(heap.blocks, min_requests=1000, collect=heap.collect))
    first: int | None = None
    verdict = detector.verdict
    for end in range(config.envelope_width, len(samples) + 1, config.envelope_width):
        heap.requests = samples[end - 1].requests
        if heap.requests < config.warmup_requests:
            continue
        verdict = detector.evaluate(samples[max(0, end - 1024) : end], 0.0)
        if reasons is not None and "heap" in verdict.trends:
            reasons.append(verdict.trends["heap"].reason)
        if verdict.suspected and first is None:
            first = heap.requests
    return verdict, first, detector


def test_collect_check_rejects_growth_a_collection_reclaims() -> None:
    # The trend says 20 B/request, but after a full collection nothing stays.
    heap = FakeHeap(retained=0.0)
    reasons: list[str] = []
    verdict, first, detector = run_checked(series(lambda r: 20.0 * r), heap, reasons)
    assert first is None and not verdict.suspected
    assert heap.collections >= 2
    assert any("reclaimed" in reason for reason in reasons)
    assert detector.collect_check is not None and detector.collect_check.rate == 0.0


def test_collect_check_confirms_retained_growth_one_check_later() -> None:
    heap = FakeHeap(retained=20.0)
    _verdict, unchecked = run(series(lambda r: 20.0 * r))
    verdict, first, _detector = run_checked(series(lambda r: 20.0 * r), heap)
    assert unchecked is not None and first is not None and verdict.suspected
    assert first - unchecked <= 2_000  # one check (two collections 1,000 requests apart)
    assert heap.collections == 2  # and no more while the verdict holds


def test_rss_suspicion_is_kept_where_the_allocator_cannot_be_read() -> None:
    heap = FakeHeap(retained=0.0)
    verdict, first, _detector = run_checked(series(lambda r: 0.0, rss=lambda r: 4096.0 * r), heap)
    assert first is not None and verdict.signal == "rss"


class FakeMalloc:
    def __init__(self, heap: FakeHeap, per_request: float) -> None:
        self.heap = heap
        self.per_request = per_request

    def __call__(self) -> int:
        return int(10e6 + self.per_request * self.heap.requests)


@pytest.mark.parametrize(("in_use", "flagged"), [(0.0, False), (4096.0, True)])
def test_rss_suspicion_is_checked_against_the_allocator(in_use: float, flagged: bool) -> None:
    """RSS growing by 4 KiB/request: a leak of large buffers if the allocator's bytes in use
    grow as much, fragmentation or arenas if they stay flat."""
    heap = FakeHeap(retained=0.0)
    config = Config()
    detector = Detector(
        config,
        CollectCheck(
            heap.blocks,
            min_requests=1000,
            collect=heap.collect,
            read_malloc=FakeMalloc(heap, in_use),
        ),
    )
    samples = series(lambda r: 0.0, rss=lambda r: 4096.0 * r)
    suspected = []
    reasons = []
    for end in range(3, len(samples) + 1, 3):
        heap.requests = samples[end - 1].requests
        if heap.requests < config.warmup_requests:
            continue
        verdict = detector.evaluate(samples[:end], 0.0)
        suspected.append(verdict.suspected)
        if "rss" in verdict.trends:
            reasons.append(verdict.trends["rss"].reason)
    assert any(suspected) is flagged
    if not flagged:
        assert any("fragmentation" in r for r in reasons)
    else:
        assert verdict.collected_malloc_bytes_per_request == pytest.approx(4096.0, rel=0.01)


class _Cycle:
    def __init__(self) -> None:
        self.me = self
        self.payload = [object() for _ in range(4)]


def test_collect_check_with_the_real_collector() -> None:
    """Real cyclic garbage grows the heap between readings; gc.collect() gives it back."""
    check = CollectCheck(sys.getallocatedblocks, min_requests=100)
    assert check.check(0, BLOCK, max_age=10_000) is None  # the anchor
    was_enabled = gc.isenabled()
    gc.disable()  # the garbage must wait for the check's collection
    try:
        for _ in range(2_000):
            _Cycle()
        kept = [_Cycle() for _ in range(2_000)]
        rate = check.check(1_000, BLOCK, max_age=10_000)
    finally:
        if was_enabled:
            gc.enable()
    assert rate is not None
    # 2,000 kept cycles of 6 blocks or more over 1,000 requests: at least 12 blocks/request;
    # the 2,000 garbage ones are not counted.
    assert 12 * BLOCK <= rate < 2 * 14 * BLOCK
    assert check.collections == 2 and check.seconds > 0
    del kept


def test_deferred_check_reads_only_when_the_owner_takes_the_reading() -> None:
    # GIVEN a deferred check over a heap that keeps 20 B/request
    heap = FakeHeap(retained=20.0)
    heap.requests = 2000
    check = CollectCheck(heap.blocks, min_requests=1000, collect=heap.collect, deferred=True)
    # WHEN the detector asks for its anchor, nothing is collected: a reading is wanted
    assert check.check(2000, BLOCK, max_age=10_000) is None
    assert check.wanted and heap.collections == 0 and check.anchor is None
    # AND the owner takes it before the next evaluation, which uses it as the anchor
    check.take(2000)
    assert not check.wanted and heap.collections == 1
    assert check.check(2000, BLOCK, max_age=10_000) is None
    assert check.anchor is not None and check.anchor.requests == 2000
    # WHEN the check is due 1,000 requests later, it asks again; with the reading, it answers
    heap.requests = 3000
    assert check.check(3000, BLOCK, max_age=10_000) is None and check.wanted
    check.take(3000)
    assert check.check(3000, BLOCK, max_age=10_000) == pytest.approx(20.0, abs=0.1)
    # AND a reading that no evaluation used is dropped, not kept to go stale
    check.take(3500)
    check.discard()
    assert check.collected(3600) is None and check.wanted


def test_check_span_grows_with_the_requests_in_flight() -> None:
    # GIVEN a 40 B/request trend and its check, first with one request in flight at a time
    spans = {}
    for concurrency in (1, 8):
        heap = FakeHeap(retained=40.0)
        check = CollectCheck(heap.blocks, min_requests=100, collect=heap.collect)
        check.concurrency = concurrency
        detector = Detector(Config(), check)
        samples = series(lambda r: 40.0 * r)
        first = None
        for end in range(3, len(samples) + 1, 3):
            heap.requests = samples[end - 1].requests
            if heap.requests < Config().warmup_requests:
                continue
            if detector.evaluate(samples[:end], 0.0).suspected:
                first = heap.requests
                break
        assert first is not None
        spans[concurrency] = first
    # THEN with eight in flight the check waits for eight times the growth (from its anchor at
    # the end of the warm-up) before it answers: each request in flight holds its objects at a
    # reading. With one, the trend's own evidence is what the verdict waits for.
    warmup = Config().warmup_requests
    assert spans[1] < warmup + 8 * CHECK_BYTES // 40 <= spans[8]
