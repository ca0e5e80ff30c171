"""The process-level leak verdict: a robust trend test per memory signal, with hysteresis.

Input: the monitor's periodic samples. Per signal (``heap``: Python heap blocks, converted to
bytes; ``rss``: resident set size; ``traced``: tracemalloc's traced bytes while tracing):

1. **Warm-up.** Samples before ``warmup_requests`` are ignored: apps keep filling caches,
   compiling templates and growing pools for thousands of requests.
2. **gc awareness.** The heap signal is ``heap_blocks - gc_pending``: container objects allocated
   since the last generation-0 collection (``gc.get_count()[0]``) are mostly garbage waiting for
   the collector; subtracting them removes the pile-up that rare collections leave. The lower
   envelope (the minimum of each block of consecutive samples) then removes what remains of the
   collection sawtooth.
3. **Trend.** Mann-Kendall on the envelope points of the sliding window (cheap, every evaluation);
   only when it finds an increasing trend, a Theil-Sen slope with its confidence interval (in
   bytes per request and per second) and the plateau test (:func:`memwatch.stats.plateau_test`),
   so that bounded caches and finished warm-ups never alert.
4. **Verdict per signal.** Suspected when the trend is significant (``p < alpha``), the lower
   confidence limit of the growth rate is above the signal's minimum rate, and growth has not
   flattened.
5. **Hysteresis.** The process verdict turns to suspected after ``confirm`` consecutive suspected
   evaluations and clears after ``clear`` consecutive clean ones.

The heap signal sees small objects sharply (down to a few bytes per request) but counts a large
buffer as one block; RSS sees large buffers but moves in coarse, never-returning steps. Both are
evaluated and the verdict names the signal with the strongest evidence.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memwatch.config import Config
from memwatch.signals import Sample
from memwatch.stats import lower_envelope_points, mann_kendall, plateau_test, theil_sen

SIGNALS = ("heap", "rss", "traced")
MIN_POINTS = 16  # envelope points needed before any verdict (the plateau test needs 16)
MAX_PAIRS = 1000  # pairwise slopes per Theil-Sen fit: bounds an evaluation to about a millisecond
# Bytes the suspected growth should add between the two readings of a collect check.
CHECK_BYTES = 32_768
# Requests in flight a collect check allows for (its span grows with them: each holds its own
# objects at a reading, so the readings of a server with many in flight move further).
MAX_CONCURRENCY = 16
# Share of the heap trend's growth rate that a collect check must find retained. The corpus's
# leaks keep 70-100 % of it: the trend also holds garbage promoted to the oldest generation,
# which piles up between full collections on top of the leak.
RETAINED_SHARE = 0.5
# The same for RSS, whose growth the allocator's bytes in use and the collected heap must
# explain: RSS also grows with fragmentation and per-thread arenas (gthread's four threads
# grow it by about 120 B/request for thousands of requests on a clean app).
RSS_RETAINED_SHARE = 0.75


@dataclass(frozen=True)
class SignalTrend:
    """The trend of one signal over the detector's window."""

    signal: str
    points: int
    p_value: float
    bytes_per_request: float | None = None  # Theil-Sen slope
    low: float | None = None  # lower confidence limit, bytes per request
    high: float | None = None
    bytes_per_second: float | None = None
    plateau: bool = False
    suspected: bool = False
    reason: str = ""


@dataclass
class Verdict:
    """The detector's current conclusion for the process."""

    status: str = "warming_up"  # warming_up | ok | suspected | unknown
    suspected: bool = False
    signal: str | None = None
    bytes_per_request: float | None = None
    bytes_per_second: float | None = None
    confidence: float | None = None
    since_wall: float | None = None
    trends: dict[str, SignalTrend] = field(default_factory=dict)
    evaluations: int = 0
    alerts: int = 0
    # The last collect check: heap growth between two full collections, and the allocator's
    # bytes in use over the same requests, bytes per request.
    collected_bytes_per_request: float | None = None
    collected_malloc_bytes_per_request: float | None = None


def signal_series(
    samples: Sequence[Sample], signal: str, heap_block_bytes: float
) -> tuple[list[float], list[float], list[float]]:
    """(requests, seconds, bytes) of one signal, skipping samples where it was unavailable."""
    xs: list[float] = []
    ts: list[float] = []
    ys: list[float] = []
    for s in samples:
        if signal == "heap":
            if s.heap_blocks is None:
                continue
            value = (s.heap_blocks - s.gc_pending) * heap_block_bytes
        elif signal == "rss":
            if s.rss_bytes is None:
                continue
            value = float(s.rss_bytes)
        else:
            if s.traced_bytes is None:
                continue
            value = float(s.traced_bytes)
        xs.append(float(s.requests))
        ts.append(s.time)
        ys.append(value)
    return xs, ts, ys


@dataclass(frozen=True)
class Collected:
    """Readings right after a full collection, and the requests finished then."""

    requests: int
    blocks: int  # Python heap blocks
    malloc: int | None  # the C allocator's bytes in use, where it can be read


class CollectCheck:
    """Tells retained growth from growth that a full garbage collection gives back, and real
    allocations from RSS that only fragmentation or per-thread arenas grew.

    Between two collections of the oldest generation (rare in a large process: it waits until
    the objects promoted since the last one reach a quarter of all long-lived objects) two kinds
    of memory pile up without being retained by anything: cyclic garbage that happened to be
    alive during a younger collection and was promoted, and freed objects parked in the
    interpreter's free lists (tuples, lists, dicts, floats, frames), whose high-water mark
    creeps up. Both grow the heap-block count steadily for tens of thousands of requests, like
    a leak of a few to a few dozen bytes per request; both go away at ``gc.collect()``. The
    only reading that separates them from a leak is the heap right after a full collection.
    RSS, for its part, also grows with fragmentation and the arenas that glibc gives each
    thread; the allocator's bytes in use (``mallinfo2()``) do not.

    So a suspicion is confirmed by two collected readings at least ``min_requests`` apart
    (:meth:`check`): growth between them is retained. Two collections per suspicion, never per
    request; they are timed (``seconds``) so that the caller can keep them out of its own cost
    accounting.

    A reading must not count memwatch's own temporaries: the detector's window of samples
    alone is a few thousand blocks, and it grows until the window is full, which a reading
    taken in the middle of an evaluation would take for retained growth (about 10 B/request
    for the first 20,000 requests under uvicorn). So the monitor builds the check ``deferred``:
    :meth:`check` then asks for a reading (``wanted``) and the monitor takes it (:meth:`take`)
    at the start of its next evaluation, before it builds the window.

    :param read: the heap-block reading (the monitor's signals seam).
    :param min_requests: fewest requests between the two readings of a check.
    :param collect: the full collection (a seam for tests).
    :param read_malloc: the allocator's bytes in use, or None where unknown.
    :param deferred: readings are taken by :meth:`take`, not inside :meth:`check`.
    """

    def __init__(
        self,
        read: Callable[[], int],
        *,
        min_requests: int,
        collect: Callable[[], object] = gc.collect,
        read_malloc: Callable[[], int | None] | None = None,
        deferred: bool = False,
    ) -> None:
        self._read = read
        self.deferred = deferred
        self.wanted = False  # deferred: a reading is wanted before the next evaluation
        self._fresh: Collected | None = None  # deferred: the reading taken for this evaluation
        self._read_malloc = read_malloc
        self._collect = collect
        self.min_requests = min_requests
        self.anchor: Collected | None = None
        self.rate: float | None = None  # heap bytes per request between the last two readings
        self.malloc_rate: float | None = None  # allocator bytes per request, likewise
        self.collections = 0
        self.seconds = 0.0  # thread CPU time spent collecting and reading
        # The most requests seen in flight at once (the owner keeps it, up to MAX_CONCURRENCY).
        self.concurrency = 1

    def reading(self, requests: int) -> Collected:
        start = time.thread_time()
        try:
            self._collect()
            malloc = self._read_malloc() if self._read_malloc is not None else None
            return Collected(requests, self._read(), malloc)
        finally:
            self.collections += 1
            self.seconds += time.thread_time() - start

    def take(self, requests: int) -> None:
        """Deferred: takes the wanted reading now, for the evaluation that follows."""
        self.wanted = False
        self._fresh = self.reading(requests)

    def discard(self) -> None:
        """Deferred: drops a reading that the evaluation did not use (it would be stale by the
        next one)."""
        self._fresh = None

    def collected(self, requests: int) -> Collected | None:
        """A collected reading now; deferred, the one taken before this evaluation, or None
        (and one is wanted before the next)."""
        if not self.deferred:
            return self.reading(requests)
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            self.wanted = True
        return fresh

    def check(self, requests: int, block_bytes: float, max_age: int, span: int = 0) -> float | None:
        """Retained heap growth, bytes per request, from the anchor reading to a reading now
        (and the allocator's in ``malloc_rate``).

        None while the check is under way: the anchor is taken now (the first call, or the
        anchor is older than ``max_age`` requests, so that an old anchor does not dilute a
        recent leak), or it is younger than ``min_requests`` (or than ``span``, the caller's
        estimate of the requests a measurable growth takes). A finished check's reading
        becomes the next anchor.
        """
        anchor = self.anchor
        if anchor is None or requests - anchor.requests > max(max_age, span):
            self.anchor = self.collected(requests)
            return None
        if requests - anchor.requests < max(self.min_requests, span):
            return None
        point = self.collected(requests)
        if point is None:
            return None  # deferred: read before the next evaluation
        self.anchor = point
        elapsed = point.requests - anchor.requests
        self.rate = (point.blocks - anchor.blocks) * block_bytes / elapsed
        self.malloc_rate = None
        if point.malloc is not None and anchor.malloc is not None:
            self.malloc_rate = (point.malloc - anchor.malloc) / elapsed
        return self.rate


class Detector:
    """Turns the sample history into a :class:`Verdict`; call :meth:`evaluate` per new sample.

    Not thread-safe: the monitor calls it from whichever thread holds its sampling lock.

    :param config: the options.
    :param collect_check: confirms heap-only suspicions with full collections (see
        :class:`CollectCheck`); None reports them on the trend alone.
    """

    def __init__(self, config: Config, collect_check: CollectCheck | None = None) -> None:
        self.config = config
        self.verdict = Verdict()
        self.collect_check = collect_check
        self._streak = 0  # consecutive suspected (>0) or clean (<0) evaluations
        self._retained = False  # a collect check confirmed the current suspicion
        # Samples before this many requests are left out (the end of the last diagnosis
        # window: tracing and its snapshots move the heap by thousands of blocks, a step that
        # a trend test would take for growth, or a plateau test for a stop).
        self.floor_requests = 0

    def restart_after(self, requests: int) -> None:
        """Judges only samples taken after ``requests`` from now on (the verdict is held until
        there are enough of them) and re-anchors the collect check."""
        self.floor_requests = requests
        if self.collect_check is not None:
            self.collect_check.anchor = None

    @property
    def confirming(self) -> bool:
        """Suspicious evaluations have begun but the verdict has not turned yet."""
        return not self.verdict.suspected and self._streak > 0

    def min_rate(self, signal: str) -> float:
        cfg = self.config
        return cfg.min_growth_rss if signal == "rss" else cfg.min_growth_bytes

    def trend(self, samples: Sequence[Sample], signal: str) -> SignalTrend | None:
        """The trend of one signal over the window, or None when there is too little data."""
        cfg = self.config
        xs, ts, ys = signal_series(samples, signal, cfg.heap_block_bytes)
        if signal == "traced" and len(xs) < len(samples):
            return None  # tracing was not on for the whole window
        width = cfg.envelope_width
        ex, ey = lower_envelope_points(ys, width, xs)
        if len(ey) < MIN_POINTS:
            return None
        et = lower_envelope_points(ys, width, ts)[0]
        mk = mann_kendall(ey)
        if mk.p_value >= cfg.alpha:
            return SignalTrend(signal, len(ey), mk.p_value, reason="no significant trend")
        slope = theil_sen(ex, ey, confidence=0.90, max_pairs=MAX_PAIRS)
        elapsed = et[-1] - et[0]
        rate = (ex[-1] - ex[0]) / elapsed if elapsed > 0 else 0.0
        per_second = slope.slope * rate
        base = SignalTrend(
            signal,
            len(ey),
            mk.p_value,
            bytes_per_request=slope.slope,
            low=slope.low,
            high=slope.high,
            bytes_per_second=per_second,
        )
        minimum = self.min_rate(signal)
        if slope.low < minimum:
            return _with(base, reason=f"growth below {minimum:g} B/request")
        flat = plateau_test(ex, ey, min_slope=minimum, max_pairs=MAX_PAIRS)
        if flat.plateau:
            return _with(base, plateau=True, reason="growth has flattened (plateau)")
        return _with(base, suspected=True, reason="significant sustained growth")

    def evaluate(self, samples: Sequence[Sample], now_wall: float) -> Verdict:
        cfg = self.config
        start = max(cfg.warmup_requests, self.floor_requests)
        window = [s for s in samples if s.requests >= start]
        window = window[-cfg.window_samples :]
        check = self.collect_check
        if check is not None and check.anchor is None and window:
            # The first collected reading when the warm-up ends, so that a suspicion arising
            # later finds its check half done (it needs a reading from before the growth).
            check.anchor = check.collected(window[-1].requests)
        trends: dict[str, SignalTrend] = {}
        for signal in SIGNALS:
            result = self.trend(window, signal)
            if result is not None:
                trends[signal] = result
        verdict = self.verdict
        verdict.evaluations += 1
        verdict.trends = trends
        if not trends:
            if verdict.suspected:
                return verdict  # too few samples since the floor: the verdict holds
            has_data = any(s.heap_blocks is not None or s.rss_bytes is not None for s in samples)
            verdict.status = "warming_up" if has_data or not samples else "unknown"
            return verdict
        suspects = [t for t in trends.values() if t.suspected]
        waiting = False
        if suspects and not verdict.suspected:
            suspects, waiting = self._check_collected(window, trends, suspects)
        if not suspects and not verdict.suspected:
            self._retained = False  # a later suspicion is checked afresh
        if suspects:
            self._streak = self._streak + 1 if self._streak > 0 else 1
        else:
            self._streak = self._streak - 1 if self._streak < 0 else -1
        if not verdict.suspected and self._streak >= cfg.confirm and not waiting:
            verdict.suspected = True
            verdict.since_wall = now_wall
            verdict.alerts += 1
        elif verdict.suspected and -self._streak >= cfg.clear:
            verdict.suspected = False
            verdict.since_wall = None
            self._retained = False
        if verdict.suspected and suspects:
            best = _strongest(suspects)
            verdict.signal = best.signal
            verdict.bytes_per_request = best.bytes_per_request
            verdict.bytes_per_second = best.bytes_per_second
            verdict.confidence = 1.0 - best.p_value
        elif not verdict.suspected:
            verdict.signal = None
            verdict.bytes_per_request = verdict.bytes_per_second = verdict.confidence = None
        verdict.status = "suspected" if verdict.suspected else "ok"
        return verdict

    def _check_collected(
        self,
        window: Sequence[Sample],
        trends: dict[str, SignalTrend],
        suspects: list[SignalTrend],
    ) -> tuple[list[SignalTrend], bool]:
        """Runs the collect check on a suspicion: (suspects left, still waiting).

        Heap and traced growth are checked against the heap after a full collection; RSS
        growth against the allocator's bytes in use (left unchecked where that cannot be read).
        """
        check = self.collect_check
        if check is None or self._retained:
            return suspects, False
        requests = window[-1].requests
        max_age = max(window[-1].requests - window[0].requests, 2 * check.min_requests)
        # Long enough for the suspected growth to add CHECK_BYTES per request in flight: the
        # collected readings still move by a few hundred blocks from one to the next (caches
        # turning over) and by what each request in flight holds (under uvicorn with eight
        # connections, FastAPI's readings swing by about 600 blocks, 40 KB).
        need = CHECK_BYTES * max(1, min(check.concurrency, MAX_CONCURRENCY))
        span = max(math.ceil(need / max(t.low or 0.0, self.min_rate(t.signal))) for t in suspects)
        rate = check.check(requests, self.config.heap_block_bytes, max_age, span)
        if rate is None:
            return suspects, True
        self.verdict.collected_bytes_per_request = rate
        self.verdict.collected_malloc_bytes_per_request = check.malloc_rate
        kept: list[SignalTrend] = []
        for t in suspects:
            if t.signal == "rss":
                # pymalloc's arenas come from mmap, not malloc: the Python heap is added.
                what = "the allocator's bytes in use and the collected heap"
                if check.malloc_rate is None:
                    kept.append(t)  # nothing to check it against here
                    continue
                measured = check.malloc_rate + max(rate, 0.0)
                needed = max(self.min_rate("rss"), RSS_RETAINED_SHARE * (t.bytes_per_request or 0))
            else:
                measured, what = rate, "the heap after a full collection"
                needed = RETAINED_SHARE * (t.bytes_per_request or 0.0)
            # A real leak keeps most of what the trend says; garbage, free lists and a decaying
            # warm-up keep markedly less.
            if measured >= needed:
                kept.append(t)
                continue
            if t.signal == "rss":
                reason = (
                    f"RSS grew but {what} grew by {measured:.1f} B/request: fragmentation or "
                    "allocator arenas, not a leak"
                )
            else:
                reason = (
                    f"a full collection reclaimed the growth ({what} grew by {measured:.1f} "
                    "B/request): garbage or free lists, not a leak"
                )
            trends[t.signal] = _with(t, suspected=False, reason=reason)
        self._retained = bool(kept)
        return kept, False


def _with(trend: SignalTrend, **changes: object) -> SignalTrend:
    from dataclasses import replace

    return replace(trend, **changes)  # type: ignore[arg-type]


def _strongest(trends: Sequence[SignalTrend]) -> SignalTrend:
    """The signal to report: heap unless RSS sees much more growth (large buffers)."""
    by_signal = {t.signal: t for t in trends}
    heap = by_signal.get("heap") or by_signal.get("traced")
    rss = by_signal.get("rss")
    if heap is None:
        assert rss is not None
        return rss
    if rss is None:
        return heap
    heap_rate = heap.bytes_per_request or 0.0
    rss_rate = rss.bytes_per_request or 0.0
    return rss if rss_rate > 4.0 * heap_rate and not math.isnan(rss_rate) else heap
