"""Readings of the process's memory through their seams: statm files, processes, functions."""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from memwatch.signals import Sample, SampleRing, Signals
from tests.fixtures import FIXTURES, STATM, FakeClock, make_signals

MiB = 1024 * 1024
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/statm").exists(),
    reason="needs /proc/self/statm",
)


class Process:
    """A psutil.Process stand-in with a fixed resident size."""

    def __init__(self, rss: int) -> None:
        self.rss = rss
        self.calls = 0

    def memory_info(self) -> Any:
        self.calls += 1
        return _Mem(self.rss)


class _Mem:
    def __init__(self, rss: int) -> None:
        self.rss = rss


@pytest.mark.parametrize(
    ("statm", "page_size"),
    [
        pytest.param(STATM, 4096, id="4 KiB pages"),
        pytest.param(STATM, 65536, id="64 KiB pages"),
        pytest.param(FIXTURES / "statm_10g", 4096, id="10 GiB resident"),
    ],
)
def test_rss_is_resident_pages_times_page_size(statm: Path, page_size: int) -> None:
    pages = int(statm.read_text().split()[1])
    process = Process(rss=1)
    signals = Signals(statm_path=str(statm), page_size=page_size, process=process)
    assert signals.rss_bytes() == pages * page_size
    assert signals.rss_bytes() == pages * page_size  # the kept descriptor reads again
    assert process.calls == 0  # statm is preferred
    signals.close()


def test_default_page_size_is_the_systems() -> None:
    if not hasattr(os, "sysconf"):
        pytest.skip("no sysconf")
    assert Signals(statm_path=str(STATM)).page_size == os.sysconf("SC_PAGE_SIZE")


def test_statm_is_reread_on_every_reading(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    statm.write_text("100 10 5 1 0 50 0\n")
    signals = Signals(statm_path=str(statm), page_size=4096)
    assert signals.rss_bytes() == 10 * 4096
    statm.write_text("100 20 5 1 0 50 0\n")  # same inode, new content: pread sees it
    assert signals.rss_bytes() == 20 * 4096
    signals.close()


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda tmp: str(tmp / "nope" / "statm"), id="missing file"),
        pytest.param(str, id="a directory"),
        pytest.param(lambda tmp: str(FIXTURES / "statm_garbage"), id="garbage"),
        pytest.param(lambda tmp: str(FIXTURES / "statm_empty"), id="empty"),
        pytest.param(lambda tmp: None, id="no path"),
    ],
)
def test_unreadable_statm_falls_back_to_the_process(
    make_path: Callable[[Path], str | None], tmp_path: Path
) -> None:
    # GIVEN a statm path that can not be used, and a process object
    process = Process(rss=123 * MiB)
    signals = Signals(statm_path=make_path(tmp_path), process=process)
    # WHEN RSS is read, twice
    first, second = signals.rss_bytes(), signals.rss_bytes()
    # THEN the process answers from the very first reading on, and statm is given up for good
    assert first == second == 123 * MiB
    assert process.calls == 2
    assert signals.statm_path is None


def test_no_statm_and_no_process_uses_psutil() -> None:
    signals = Signals(statm_path=None)
    rss = signals.rss_bytes()
    assert abs(rss - psutil.Process().memory_info().rss) < 64 * MiB
    assert rss > MiB


@linux_only
def test_real_statm_agrees_with_psutil() -> None:
    signals = Signals()
    assert signals.statm_path == "/proc/self/statm"
    assert abs(signals.rss_bytes() - psutil.Process().memory_info().rss) < 16 * MiB
    signals.close()


@linux_only
def test_a_forked_child_reads_its_own_rss_not_its_parents() -> None:
    # GIVEN a Signals object that has already read (and kept open) /proc/self/statm
    signals = Signals()
    parent_before = signals.rss_bytes()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            # WHEN the child allocates and touches 50 MiB, reading through the same object
            before = signals.rss_bytes()
            ballast = b"\x01" * (50 * MiB)
            after = signals.rss_bytes()
            fresh = Signals().rss_bytes()
            report = {"before": before, "after": after, "fresh": fresh, "n": len(ballast)}
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent_after = signals.rss_bytes()
    signals.close()
    # THEN the child saw its own 50 MiB grow (a descriptor still on the parent's statm would
    # show the parent, which only waited meanwhile), and agrees with a freshly opened reader
    assert child["after"] - child["before"] >= 40 * MiB, child
    assert abs(child["after"] - child["fresh"]) < 8 * MiB, child
    assert abs(parent_after - parent_before) < 40 * MiB


def test_heap_blocks_come_from_the_injected_function_and_are_timed() -> None:
    # GIVEN a heap reading that takes 144 µs on a fake perf clock
    perf = FakeClock()
    blocks = iter(range(1000, 10_000))

    def heap() -> int:
        perf.advance(144e-6)
        return next(blocks)

    signals = make_signals(heap=heap, perf=perf)
    # WHEN it is read many times
    readings = [signals.heap_blocks() for _ in range(60)]
    # THEN the values are the function's, and the measured cost settles on 144 µs
    assert readings == list(range(1000, 1060))
    assert signals.heap_cost_us == pytest.approx(144.0, rel=0.01)


def test_one_slow_heap_reading_does_not_dominate_the_cost() -> None:
    perf = FakeClock()
    costs = iter([1e-6] * 40 + [5e-3] + [1e-6] * 5)

    def heap() -> int:
        perf.advance(next(costs))
        return 1

    signals = make_signals(heap=heap, perf=perf)
    for _ in range(41):
        signals.heap_blocks()
    after_spike = signals.heap_cost_us
    assert after_spike < 5000.0  # smoothed, not the spike itself
    for _ in range(5):
        signals.heap_blocks()
    assert signals.heap_cost_us < after_spike


def test_gc_readings_come_from_the_injected_functions() -> None:
    signals = Signals(
        statm_path=str(STATM),
        gc_count=lambda: (123, 4, 5),
        gc_stats=lambda: [{"collections": 10}, {"collections": 2, "collected": 7}, {}],
    )
    assert signals.gc_pending() == 123
    assert signals.gc_collections() == (10, 2, 0)


def test_traced_bytes_only_while_tracing() -> None:
    if tracemalloc.is_tracing():  # pragma: no cover - someone else traces
        pytest.skip("tracemalloc already on")
    signals = make_signals()
    assert signals.traced_bytes() is None
    tracemalloc.start()
    try:
        ballast = [bytes(1000) for _ in range(100)]
        traced = signals.traced_bytes()
        assert traced is not None and traced >= 100 * 1000
        assert len(ballast) == 100
    finally:
        tracemalloc.stop()
    assert signals.traced_bytes() is None


def test_default_sources_are_the_interpreters() -> None:
    signals = Signals(statm_path=None, process=Process(rss=1))
    blocks = signals.heap_blocks()
    assert abs(blocks - sys.getallocatedblocks()) < 10_000
    assert signals.gc_collections() and all(isinstance(n, int) for n in signals.gc_collections())


def test_default_collection_counts_move_with_the_interpreters() -> None:
    """The per-generation counts that the gc hook keeps (read in O(1), without building
    ``gc.get_stats()``'s dicts) grow by exactly as many collections as the interpreter's own."""
    signals = Signals(statm_path=None, process=Process(rss=1))
    interpreters = Signals(statm_path=None, process=Process(rss=1), gc_stats=gc.get_stats)

    def both() -> tuple[tuple[int, ...], tuple[int, ...]]:
        # Read with automatic collections off: gc.get_stats() allocates, and a collection
        # between the two readings would count in one and not the other.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return signals.gc_collections(), interpreters.gc_collections()
        finally:
            if enabled:
                gc.enable()

    ours_before, theirs_before = both()
    for generation in (0, 1, 2, 1, 0, 0):
        gc.collect(generation)
    # and, unless collections are off, some automatic ones: cyclic garbage enough to pass
    # generation 0's threshold
    for _ in range(5000):
        cycle: list[object] = []
        cycle.append(cycle)
    ours_after, theirs_after = both()
    ours = [a - b for a, b in zip(ours_after, ours_before, strict=True)]
    theirs = [a - b for a, b in zip(theirs_after, theirs_before, strict=True)]
    assert ours == theirs
    assert ours[0] >= 3 and ours[1] >= 2 and ours[2] >= 1
    assert signals.collections_total() == sum(ours_after)


# --- the sample ring's envelope readings ------------------------------------------------------


def _ring_sample(rng: random.Random, n: int) -> Sample:
    return Sample(
        time=float(n),
        wall=1.7e9 + n,
        requests=50 * n,
        rss_bytes=None if rng.random() < 0.1 else rng.randrange(10**7, 2 * 10**7),
        heap_blocks=None if rng.random() < 0.1 else rng.randrange(10**5, 2 * 10**5),
        gc_pending=rng.randrange(0, 700),
        gc_collections=(n, n // 10, n // 100),
        traced_bytes=None,
    )


def _lows_from_samples(samples: list[Sample]) -> tuple[int, int | None, int | None]:
    heaps = [s.heap_blocks - s.gc_pending for s in samples if s.heap_blocks is not None]
    rsses = [s.rss_bytes for s in samples if s.rss_bytes is not None]
    return (
        samples[-1].requests,
        min(heaps) if len(heaps) == len(samples) else None,
        min(rsses) if len(rsses) == len(samples) else None,
    )


def test_ring_lows_match_the_samples_they_summarise() -> None:
    # GIVEN a ring that has wrapped around several times, with some readings missing
    rng = random.Random(3)
    ring = SampleRing(37)
    samples = [_ring_sample(rng, n) for n in range(1, 150)]
    for sample in samples:
        ring.append(sample)
    kept = samples[-37:]
    # THEN every block's lows are the minimum over the Samples the ring would build, and a
    # block with a missing reading has none for that signal
    seen_missing = False
    for width in (1, 3, 5):
        for back in range(0, 37 - width + 1):
            block = kept[len(kept) - back - width : len(kept) - back]
            expected = _lows_from_samples(block)
            assert ring.lows(back, width) == expected
            assert [ring[-1 - back - k] for k in range(width)] == block[::-1]
            seen_missing = seen_missing or None in expected
    assert seen_missing


def test_ring_lows_out_of_range() -> None:
    ring = SampleRing(8)
    for n in range(1, 5):
        ring.append(_ring_sample(random.Random(n), n))
    with pytest.raises(IndexError):
        ring.lows(2, 3)
    with pytest.raises(IndexError):
        ring.lows(0, 0)
    assert ring.lows(1, 3)[0] == 150
