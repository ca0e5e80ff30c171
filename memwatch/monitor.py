"""The per-process state: request counters, sampled readings, distinct-credential sketches.

Both middlewares feed one :class:`Monitor`. Its per-request path does plain work only: the
request is numbered at entry (``next()`` on a counter, one comparison with the number at which
anything else is due), and at its end one tuple of its labels (and, when it carries a
credential, a keyed hash of it) is appended to a queue. The queue is folded into the counters
and the fixed-size sketches in batches, at the entry of the request a drain is due at, and
before every sample, scrape and report, so counts are exact whenever they are read. Anything
whose cost grows with the heap (the heap-block count) runs on a sample of requests, at a rate
derived from its measured cost.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from memwatch.attribution import (
    CHANNELS,
    Pair,
    Probe,
    RouteAttribution,
    RouteEstimate,
    RouteKey,
    merge_estimates,
    window_estimates,
)
from memwatch.auth import AUTH_SCHEMES, AuthClassifier
from memwatch.config import Config
from memwatch.detector import MAX_CONCURRENCY, MIN_POINTS, CollectCheck, Detector, Verdict
from memwatch.diagnosis import Diagnosis, DiagnosisResult, Tag, combined
from memwatch.errors import InternalErrors, logger
from memwatch.recorder import Recorder, make_gate, make_recorder
from memwatch.routes import RouteTable, normalize_path
from memwatch.signals import Sample, SampleRing, Signals
from memwatch.sketch import Fingerprinter, FirstSeenFilter, HyperLogLog

LeakCallback = Callable[["Monitor", Verdict], object]

# One credential in FIRST_SEEN_SAMPLING goes through the first-seen filter (chosen by its keyed
# hash, so a credential is always in or always out): a quarter of the cost, the same shape.
FIRST_SEEN_SAMPLING = 4
# The most requests between two periodic samples, whatever a heap walk costs (at 5 M blocks,
# 144 µs, twice that at the default budget gives about 600).
MAX_SAMPLE_INTERVAL = 1000
# t an estimate from per-request deltas needs to name a route while windows are on (about
# one chance in three million under the null, against one in 740 at t = 3).
STRICT_PAIR_T = 5.0
# How many times the sampling budget is spent between the warm-up and the first verdict.
BOOST = 4
# The most requests between two evaluations of the detector, whatever one costs.
MAX_EVAL_SPACING = 2000
# Steady state (the detector has judged a full window and suspects nothing): the shares of
# ``steady_budget_us`` that samples, detector evaluations and measured requests may spend.
STEADY_SAMPLE_SHARE = 0.4
STEADY_DETECTOR_SHARE = 0.4
STEADY_PROBE_SHARE = 0.2
# Measured time is charged this many times over: work done between two requests leaves the
# caches cold for the app, which costs it about as much again (measured in place).
CACHE_CHARGE = 2.0
# The most requests between two evaluations in steady state, whatever one costs.
MAX_STEADY_EVAL_SPACING = 20000
# The detector's window reaches back at most this many windows' worth of requests at the
# configured period (window_samples x sample_every_requests), and always holds the samples
# the trend test needs: sparse samples must not stretch it over 100,000 requests and more.
WINDOW_SPAN = 2
# Steady state ends early when the lower envelope of the heap (or of RSS) has risen, over the
# last SENTINEL_SAMPLES samples, faster than SENTINEL_RATE times the detector's minimum growth:
# the early density then returns for a window's worth of requests, so that a leak that starts
# late is judged on dense samples. (A rise that is no leak costs that CPU, never an alert: the
# detector still decides.)
SENTINEL_SAMPLES = 8
SENTINEL_RATE = 2.0
# 2**17 bits (16 KiB): small enough to stay in cache; rotated at 20 % saturation, that is about
# 7,000 sampled (28,000 actual) credentials per filter.
FIRST_SEEN_BITS = 2**17

# The most fast-path records waiting for a drain (a drain runs at least this often).
DRAIN_MAX = 256
# In steady state: the compiled recorder keeps a tally of a few label sets, not a queue, so a
# drain's fixed cost is spread over more requests (samples still come when due).
DRAIN_MAX_STEADY = 1024
# The queue's hard bound (never reached while request_entry() runs: it drains every DRAIN_MAX).
PENDING_MAX = 65536
# Drains per ``sample_every_seconds`` at low traffic, so that time-based samples stay on time.
DRAINS_PER_PERIOD = 4

# Samples a snapshot carries (spread over the whole history): what the report's charts show.
HISTORY_POINTS = 240

OUTCOMES = ("ok", "rejected", "client_error", "server_error")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Buckets of the per-request heap delta histogram, in bytes. A delta can be negative (a request
# that frees more than it allocates): those all fall in the first bucket (le="0"). Negative
# bucket bounds would make prometheus_client drop _sum and _count (OpenMetrics forbids them
# together), and dashboards need the count and the mean.
DELTA_BUCKETS = (
    0.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    math.inf,
)

RequestKey = tuple[str, str, str, str]  # route, method, auth, outcome
# A request as the middlewares queue it: (template or None, raw path when there is no template,
# method, auth scheme, status as an int or a WSGI status line, credential fingerprint or None).
Record = tuple["str | None", "str | None", str, str, "int | str | None", "int | None"]


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "rejected"
    if status < 500:
        return "client_error"
    return "server_error"


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


def status_code(status: int | str | None) -> int:
    """An ASGI status (int) or a WSGI status line (``"404 Not Found"``); 500 when unreadable."""
    if type(status) is int:
        return status
    try:
        return int(str(status)[:3])
    except ValueError:
        return 500


@dataclass
class DeltaHistogram:
    """Plain-state histogram of sampled per-request heap deltas (exported at scrape time)."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(DELTA_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(DELTA_BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
                break
        self.count += 1
        self.total += value


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the monitor's state for exporters and the report."""

    pid: int
    started_wall: float
    requests: int
    counts: dict[RequestKey, int]
    deltas: dict[tuple[str, str], DeltaHistogram]
    distinct_credentials: dict[str, float]
    history: list[Sample]
    internal_errors: int
    routes_overflowed: int
    verdict: Verdict
    routes: list[RouteEstimate]
    scales_with: str | None
    diagnosis: DiagnosisResult | None = None
    diagnosis_windows: int = 0
    diagnosis_active: bool = False


class Monitor:
    """Everything memwatch knows about this process, fed by the middlewares.

    :param config: The options.
    :param signals: Where readings come from (a seam for tests and other platforms).
    :param clock: Monotonic clock, seconds.
    :param rng: Random source for per-request sampling (seed it in tests).
    :param timer: Clock that times periodic work (samples, measured requests), seconds.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        signals: Signals | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        timer: Callable[[], float] = time.perf_counter,
        on_leak: LeakCallback | None = None,
        on_clear: LeakCallback | None = None,
    ) -> None:
        self.config = config or Config()
        self.on_leak = on_leak
        self.on_clear = on_clear
        # Called after each periodic sample, from the sampling thread (multiprocess publishing).
        self.sample_hooks: list[Callable[[], object]] = []
        # Individual per-request deltas for the multiprocess publisher (None: not kept).
        self.delta_log: collections.deque[tuple[str, str, float]] | None = None
        self.signals = signals or Signals()
        self.errors = InternalErrors()
        self.routes = RouteTable(self.config.max_routes)
        self.auth = AuthClassifier(self.config)
        self._clock = clock
        self._timer = timer
        self._random = (rng or random.Random()).random
        self._own_process()
        # The fast path's queue: ``enqueue`` (deque.append, atomic under the GIL) is all a
        # request does with the monitor's state; :meth:`drain` folds the queue into the
        # counters in batches, where equal records are counted once by ``Counter`` in C.
        # Bounded: a host that never calls request_entry() (which drains) loses counts, not
        # memory.
        self._pending: collections.deque[Record] = collections.deque(maxlen=PENDING_MAX)
        self.enqueue = self._pending.append
        self._reset_state()
        _MONITORS.add(self)

    def _reset_state(self) -> None:
        self.pid = os.getpid()
        self.started_wall = time.time()
        self.requests = 0
        self._counts: dict[RequestKey, int] = {}
        self._deltas: dict[tuple[str, str], DeltaHistogram] = {}
        self._sketches = {scheme: HyperLogLog() for scheme in AUTH_SCHEMES if scheme != "anonymous"}
        self._first_seen_filter = FirstSeenFilter(bits=FIRST_SEEN_BITS)
        self._first_seen_old: FirstSeenFilter | None = None
        self.first_seen = 0
        self._inflight: Probe | None = None
        self._closable: Probe | None = None
        self._heavy_share = 1.0
        self.attribution = {channel: RouteAttribution() for channel in CHANNELS}
        check = None
        if self.config.collect_check:
            check = CollectCheck(
                self.signals.heap_blocks,
                min_requests=self.config.collect_check_requests,
                read_malloc=self.signals.malloc_in_use,
                deferred=True,
            )
        self.detector = Detector(self.config, check)
        self.diagnosis = Diagnosis(self.config)
        self.diagnosis.on_result = self._diagnosed
        self.diagnosis.on_error = self._diagnosis_failed
        self.route_estimates: list[RouteEstimate] = []
        self.scales_with: str | None = None
        self._samples_since_eval = 0
        self._judged_samples = 0  # samples taken after the warm-up
        self._first_full_evaluation = False
        self._requests_at_eval = 0
        self._eval_cost_us = 0.0
        # Whole measured costs (time.perf_counter, smoothed), microseconds: a sample (readings,
        # bookkeeping, hooks; evaluations apart) and a measured request's pair of probes (both
        # readings and both requests' labelling), and what probes spent since the last sample.
        self._sample_cost_us = 0.0
        self._probe_cost_us = 0.0
        self._probe_spent = 0.0
        self._probe_pairs = 0
        self._steady = False
        self._dense_until = 0  # requests: steady state waits until then (a rise was seen)
        self.history = SampleRing(self.config.history_size)
        self._last_sample_time = self._clock()
        self._last_sample_requests = 0
        self._min_interval = self.config.sample_every_requests
        self._cost_interval = 1
        self._pair_rate = self.config.request_sample_rate
        # Requests are numbered at entry; one comparison per request decides whether anything
        # besides counting is due (a drain, a sample, a probe, a pair to close).
        self._pending.clear()
        # The new gate is complete (its recorder, its window flag) before it is published, and
        # the old one is retired after: the compiled middlewares, which keep the gate between
        # requests, then look again and find the new one ready.
        gate = make_gate(compiled=self.config.speedups)
        gate.recorder = self._make_recorder()
        self.diagnosis.attach(gate)
        old = self.__dict__.get("_gate")
        self._gate = gate
        if old is not None:
            old.retired = True
        self._next_drain = 0
        self._next_probe = self._probe_gap()
        self._last_drain_ticket = 0
        self._last_drain_time = self._clock()

    def _own_process(self) -> None:
        """What a process must not share with its parent: the locks (a fork copies them as they
        were, held or not) and the fingerprint key."""
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._fingerprinter = Fingerprinter(compiled=self.config.speedups)
        self.fingerprint = self._fingerprinter.fingerprint

    def _after_fork(self) -> None:
        # A worker forked from a master that served requests (or held a lock) starts afresh.
        self._own_process()
        self._reset_state()

    @property
    def recorder(self) -> Recorder:
        """The fast path's recorder (see :meth:`_make_recorder`). It is kept on the request gate,
        which the compiled middlewares hold between requests: they reach it without a look-up."""
        recorder = self._gate.recorder
        assert recorder is not None
        return recorder

    @recorder.setter
    def recorder(self, recorder: Recorder) -> None:
        self._gate.recorder = recorder

    def _make_recorder(self) -> Recorder:
        """The fast path's recorder: classifies, fingerprints and counts (compiled) or queues
        (Python) a request in one call; compiled when ``memwatch._speedups`` is built and
        ``config.speedups`` allows it. Made with the state it counts into."""
        return make_recorder(
            self.enqueue,
            self.auth,
            self._fingerprinter,
            compiled=self.config.speedups,
            sketches=self._sketches,
        )

    # --- the per-request path ----------------------------------------------------------------

    def request_entry(self) -> Probe | None:
        """Called when a request enters; returns a probe if the request is measured.

        A measured request takes readings at its entry; the first request to enter after it
        has finished takes them again (see :mod:`memwatch.attribution`). Drains of the queue
        and periodic samples also run here, at the entry of the request whose number is due.
        """
        ticket = self._gate.due()
        if ticket is None:
            return None
        return self._event(ticket)

    def _probe_gap(self) -> int:
        """Requests until the next measured one: geometric, so that measured requests are a
        random ``request_sample_rate`` share that never aliases with periodic traffic."""
        rate = self._pair_rate
        if rate >= 1.0:
            return 1
        if rate <= 0.0:
            return 1 << 62
        u = self._random()
        return 1 + int(math.log1p(-u) / math.log1p(-rate)) if u < 1.0 else 1

    def _event(self, ticket: int) -> Probe | None:
        probe = None
        if self._closable is not None:
            probe = self._probe_close()  # read before the drain frees the queued records
        if ticket >= self._next_drain:
            self._drain_due(ticket)
        if probe is None and ticket >= self._next_probe:
            self._next_probe = ticket + self._probe_gap()
            if self._inflight is None:
                probe = self._probe_open()
        self._gate.next_event = (
            0 if self._closable is not None else min(self._next_drain, self._next_probe)
        )
        return probe

    def _drain_due(self, ticket: int) -> None:
        """Drains the queue, takes a sample if one is due, and schedules the next drain."""
        if not self._drain_lock.acquire(blocking=False):
            return  # another thread is draining
        try:
            self._drain_locked()
            # Requests entered before this one and not finished: in flight now. The collect
            # check's readings hold what the requests in flight hold.
            check = self.detector.collect_check
            if check is not None and ticket - self.requests > check.concurrency:
                check.concurrency = min(ticket - self.requests, MAX_CONCURRENCY)
            now = self._clock()
            done = ticket - self._last_drain_ticket
            elapsed = now - self._last_drain_time
            self._last_drain_ticket = ticket
            self._last_drain_time = now
        finally:
            self._drain_lock.release()
        if self._sample_due(now):
            self.take_sample()
        # The next drain: when the next sample is due by count, or sooner at low traffic so
        # that a sample due by time waits at most a fraction of sample_every_seconds.
        left = self._min_interval - (self.requests - self._last_sample_requests)
        gap = min(max(left, 1), DRAIN_MAX_STEADY if self._steady else DRAIN_MAX)
        if elapsed > 0:
            per_period = done / elapsed * self.config.sample_every_seconds
            gap = min(gap, max(1, int(per_period / DRAINS_PER_PERIOD)))
        self._next_drain = ticket + gap

    def _sample_due(self, now: float) -> bool:
        since = self.requests - self._last_sample_requests
        return since >= self._min_interval or (
            since >= self._cost_interval
            and now - self._last_sample_time >= self.config.sample_every_seconds
        )

    def drain(self) -> None:
        """Folds every queued request into the counters and sketches (exports call it)."""
        with self._drain_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        # What the compiled recorder counted itself (its fingerprints are in the sketches
        # already), then the queue: the Python recorder's requests and measured ones. The
        # requests it keeps for a batch are counted first, as before any reading.
        self._flush_recorder()
        tallied, noted, _dropped = self.recorder.take()
        queue = self._pending
        n = len(queue)
        if not (n or tallied or noted):
            return
        # Counted in C as they are popped (popleft in a C loop, not a swap: an append racing
        # the drain is never lost): equal records (same labels, same credential) once each.
        # Then, in Python, once per distinct record: its label set's count, and its credential
        # folded into the sketches (adding a known credential again changes nothing: the
        # HyperLogLog keeps the larger rank, the first-seen filter says "seen"). The compiled
        # recorder's tally arrives already counted per label set.
        grouped = collections.Counter(itertools.starmap(queue.popleft, itertools.repeat((), n)))
        labels: dict[tuple[str | None, str | None, str, str, int | str | None], int] = tallied
        n += sum(tallied.values())
        routes = self.routes
        sketches = self._sketches
        with self._lock:
            for record, k in grouped.items():
                label = record[:5]
                labels[label] = labels.get(label, 0) + k
                fingerprint = record[5]
                if fingerprint is not None:
                    sketch = sketches.get(record[3])
                    if sketch is not None:
                        sketch.add(fingerprint)
                    if fingerprint % FIRST_SEEN_SAMPLING == 0:
                        self._note_credential(fingerprint)
            for fingerprint in set(noted):  # sampled by the compiled recorder
                self._note_credential(fingerprint)
            counts = self._counts
            for (template, path, method, auth, status), k in labels.items():
                if template is not None:
                    route = routes.label(template, k)
                else:
                    route = routes.for_path(path or "/", k)
                code = status if type(status) is int else status_code(status)
                key = (
                    route,
                    method if method in METHODS else "OTHER",
                    auth,
                    "ok" if code < 400 else outcome_of(code),
                )
                counts[key] = counts.get(key, 0) + k
            self.requests += n

    def record_measured(
        self,
        template: str | None,
        path: str | None,
        method: str,
        auth: str,
        status: int | str | None,
        fingerprint: int | None,
        probe: Probe | None,
    ) -> tuple[str, str, str]:
        """Queues a request that the fast path does not cover (a measured request, or one in a
        diagnosis window) and returns its (route, method, auth) label now."""
        start = self._timer() if probe is not None else 0.0
        if template is not None:
            route = self.routes.label(template)
        else:
            route = self.routes.for_path(path or "/")
        key = (route, method_label(method), auth)
        self.enqueue((template, path, method, auth, status, fingerprint))
        if probe is not None:
            with self._lock:
                self._probe_done(probe, key)
            self._probe_spent += self._timer() - start
        return key

    def _flush_recorder(self) -> None:
        """Counts the requests the recorder keeps for a batch, before a drain and before a
        reading: they hold their headers, which would otherwise be freed between a sample's or
        a pair's readings and pass for memory given back. A kept request that cannot be
        classified is lost and counted as an error; the others are counted."""
        try:
            self.recorder.flush()
        except Exception as exc:
            self.errors.record("recorder.flush", exc)

    def _read_probe(self, heavy: bool) -> Probe:
        signals = self.signals
        heap = rss = None
        if heavy:
            heap = signals.heap_blocks()
            try:
                rss = signals.rss_bytes()
            except Exception as exc:
                self.errors.record("signals.rss", exc)
        return Probe(signals.gc_pending(), signals.collections_total(), heap, rss)

    def _probe_open(self) -> Probe | None:
        self._flush_recorder()  # (work of the requests kept: not the probe's cost)
        start = self._timer()
        probe = self._read_probe(self._random() < self._heavy_share)
        with self._lock:
            if self._inflight is None and self._closable is None:
                self._inflight = probe
                self._probe_spent += self._timer() - start
                return probe
        return None  # another thread opened one first

    def _probe_close(self) -> Probe | None:
        self._flush_recorder()
        start = self._timer()
        with self._lock:
            first, self._closable = self._closable, None
        if first is None:
            return None
        probe = self._read_probe(first.heap is not None)
        pair = Pair(first, probe, self.config.heap_block_bytes)
        first.pair = probe.pair = pair
        # A pair's whole cost (both readings, both requests' labelling) spaces the pairs in
        # steady state (microseconds, per pair, at the next sample).
        self._probe_spent += self._timer() - start
        self._probe_pairs += 1
        return probe

    def request_exit(
        self,
        route: str,
        method: str,
        auth: str,
        credential: str | None,
        status: int,
        probe: Probe | None,
    ) -> None:
        """Records a finished request (its response fully sent, or failed)."""
        fingerprint = self._fingerprinter.fingerprint(credential) if credential else None
        # method_label() and outcome_of(), inlined for the common cases: this runs per request.
        if method not in METHODS:
            method = "OTHER"
        key = (route, method, auth, "ok" if status < 400 else outcome_of(status))
        with self._lock:
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
            self.requests = requests = self.requests + 1
            if fingerprint is not None:
                sketch = self._sketches.get(auth)
                if sketch is not None:
                    sketch.add(fingerprint)
                if fingerprint % FIRST_SEEN_SAMPLING == 0:
                    self._note_credential(fingerprint)
            if probe is not None:
                self._probe_done(probe, (route, method, auth))
            since = requests - self._last_sample_requests
        if since >= self._min_interval or (
            since >= self._cost_interval
            and self._clock() - self._last_sample_time >= self.config.sample_every_seconds
        ):
            self.take_sample()

    def _note_credential(self, fingerprint: int) -> None:
        """Counts first-seen credentials with two rotating Bloom filters (under the lock).

        When the current filter fills up, the previous one is dropped and a fresh one starts;
        a credential is first-seen only if neither knows it, so rotation causes no burst.
        """
        current = self._first_seen_filter
        new = current.add(fingerprint)
        old = self._first_seen_old
        if new and (old is None or old.add(fingerprint)):
            self.first_seen += FIRST_SEEN_SAMPLING
        if current.saturation() > 0.2:
            self._first_seen_old = current
            self._first_seen_filter = FirstSeenFilter(bits=FIRST_SEEN_BITS)

    def _probe_done(self, probe: Probe, key: RouteKey) -> None:
        """Completes a probe (under the lock): opens its pair for closing, or records it."""
        probe.key = key
        if probe is self._inflight:
            self._inflight = None
            self._closable = probe  # the next request to enter closes the pair
            self._gate.next_event = 0
            return
        pair = probe.pair
        if pair is None or pair.a.key is None or pair.b.key is None:
            return
        pair.a.pair = pair.b.pair = None
        if self.requests < self.config.warmup_requests:
            return  # warm-up allocations land on whichever routes come first: keep them out
        for channel, delta in pair.deltas.items():
            self.attribution[channel].add(pair.a.key, pair.b.key, delta)
        heap = pair.deltas.get("heap")
        if heap is not None:
            route, _method, auth = pair.a.key
            hist = self._deltas.get((route, auth))
            if hist is None:
                hist = self._deltas[(route, auth)] = DeltaHistogram()
            hist.observe(heap)
            if self.delta_log is not None:
                self.delta_log.append((route, auth, heap))

    # --- periodic samples -------------------------------------------------------------------

    def take_sample(self) -> Sample | None:
        """Reads every signal once and appends the sample to the history.

        Concurrent callers do not queue: whoever holds the sampling lock takes the sample.
        """
        if not self._sample_lock.acquire(blocking=False):
            return None
        try:
            start = self._timer()
            self.drain()
            sample = self.read_signals()
            self.history.append(sample)
            self._last_sample_time = sample.time
            self._last_sample_requests = sample.requests
            for hook in self.sample_hooks:
                try:
                    hook()
                except Exception as exc:
                    self.errors.record("sample_hook", exc)
            self._samples_since_eval += 1
            if sample.requests >= self.config.warmup_requests:
                self._judged_samples += 1
            if self._steady and self._rising():
                # Dense again for a window's worth of requests: a late leak judged on dense
                # samples, at the detector's own budget.
                cfg = self.config
                self._dense_until = sample.requests + cfg.window_samples * cfg.sample_every_requests
            self._sample_cost_us = _smoothed(self._sample_cost_us, (self._timer() - start) * 1e6)
            self._adapt_to_cost()
            if self._evaluation_due(sample):
                self.evaluate()
                if self._steady != self._in_steady_state():
                    self._adapt_to_cost()  # a suspicion to confirm: dense again from now on
            return sample
        finally:
            self._sample_lock.release()

    def _evaluation_due(self, sample: Sample) -> bool:
        """Every envelope block, but no more often than the detector's CPU budget allows.

        After the warm-up: once at once (the collect check's first reading), then not until
        the window holds enough samples for a trend, and then at once again.
        """
        cfg = self.config
        if self._samples_since_eval < cfg.envelope_width:
            return False
        if sample.requests < cfg.warmup_requests:
            return False
        if self.diagnosis.window is not None:
            return False  # tracing moves the heap: judged again after the window
        check = self.detector.collect_check
        if check is not None and check.wanted:
            return True  # the collect check's reading, taken at the start of the evaluation
        needed = MIN_POINTS * cfg.envelope_width
        if self._judged_samples < needed:
            if self.detector.verdict.evaluations:
                self._samples_since_eval = 0
                return False
            return True
        if not self._first_full_evaluation:
            self._first_full_evaluation = True
            return True
        # The detector's cost, amortised over the requests between evaluations, stays within
        # its per-request budget (a full evaluation costs about a millisecond).
        budget = self.config.detector_budget_us
        if self.detector.confirming:
            budget *= 10  # a suspicion waits for confirmation: look again sooner, briefly
        # Capped: an evaluation timed during a diagnosis window (tracing makes everything
        # slower) must not silence the detector for tens of thousands of requests.
        spacing = min(self._eval_cost_us / budget, MAX_EVAL_SPACING)
        if self._steady:
            # Steady state: evaluations share steady_budget_us (an evaluation is a burst of a
            # millisecond or so; its own time is what it costs).
            steady = self.config.steady_budget_us * STEADY_DETECTOR_SHARE
            spacing = max(spacing, min(self._eval_cost_us / steady, MAX_STEADY_EVAL_SPACING))
        return sample.requests - self._requests_at_eval >= spacing

    def _window(self) -> list[Sample]:
        """The samples the detector judges: the last ``window_samples``, but none taken more
        than ``WINDOW_SPAN`` windows' worth of requests (at ``sample_every_requests``) before
        the last one, unless the trend test needs them (``MIN_POINTS`` envelope blocks).

        At the configured period the window is ``window_samples`` long, as always. Samples
        spaced by the steady-state budget would otherwise stretch it over 100,000 requests and
        more, and a leak that starts then would have to fill a large part of that before the
        robust slope saw it (75,000 requests for 220 B/request, measured in process).
        """
        cfg = self.config
        ring = self.history
        if not len(ring):
            return []
        since = ring[-1].requests - WINDOW_SPAN * cfg.window_samples * cfg.sample_every_requests
        recent = ring.count_since(since, cfg.window_samples)
        return ring.tail(max(recent, MIN_POINTS * cfg.envelope_width))

    def evaluate(self) -> Verdict:
        """Runs the detector and attribution over the history; reports transitions."""
        start = time.thread_time()  # this thread's CPU: the cost the budget is about
        check = self.detector.collect_check
        collecting = check.seconds if check is not None else 0.0
        try:
            if check is not None and check.wanted:
                # Before the window is built: the reading must not count its samples.
                check.take(self.requests)
            history = self._window()
            before = self.detector.verdict.suspected
            verdict = self.detector.evaluate(history, time.time())
            if check is not None:
                check.discard()
            self._update_attribution(history, verdict)
            if verdict.suspected != before:
                self._transition(verdict)
            # A collect check's collections are rare and paid once, not at every evaluation:
            # they stay out of the cost that spaces evaluations.
            spent = time.thread_time() - start
            if check is not None:
                spent -= check.seconds - collecting
            self._eval_cost_us = max(spent, 0.0) * 1e6
            mode = self.config.diagnosis
            if (mode == "always" or (mode == "triggered" and verdict.suspected)) and (
                self.diagnosis.can_start()
            ):
                self.start_diagnosis("leak suspected" if verdict.suspected else "always")
            return verdict
        except Exception as exc:
            self.errors.record("detector", exc)
            return self.detector.verdict
        finally:
            self._samples_since_eval = 0
            self._requests_at_eval = self.requests

    def _update_attribution(self, history: list[Sample], verdict: Verdict) -> None:
        from memwatch.attribution import scales_with
        from memwatch.detector import signal_series

        with self._lock:
            channels = {name: acc.copy() for name, acc in self.attribution.items()}
            per_key: dict[RouteKey, int] = {}
            for (route, method, auth, _outcome), n in self._counts.items():
                per_key[(route, method, auth)] = per_key.get((route, method, auth), 0) + n
            total = self.requests
        shares = {k: n / total for k, n in per_key.items()} if total else {}
        estimates = merge_estimates(
            {name: acc.estimates(shares) for name, acc in channels.items()},
            container_bytes=2.0 * self.config.heap_block_bytes,
        )
        minimum = self.config.min_route_bytes
        diagnosed = self.diagnosis.last
        if diagnosed is not None and diagnosed.routes:
            estimates = window_estimates(diagnosed, estimates, minimum)
        # With diagnosis windows on, a window names the routes; until one has, an estimate from
        # per-request deltas must be far beyond chance to name one alone: every route is tested
        # on three channels at every evaluation, and t >= 3 then comes up by chance.
        strict = self.config.diagnosis != "off"
        self.route_estimates = [
            dataclasses.replace(
                e,
                suspected=verdict.suspected
                and e.significant
                and (e.retained_bytes_per_request or 0.0) >= minimum
                and (
                    not strict
                    or e.channel == "diagnosis"
                    or (e.t is not None and e.t >= STRICT_PAIR_T)
                ),
            )
            for e in estimates
        ]
        if verdict.suspected and verdict.signal is not None:
            cfg = self.config
            start = max(cfg.warmup_requests, self.detector.floor_requests)
            window = [s for s in history if s.requests >= start]
            window = window[-cfg.window_samples :]
            _xs, _ts, values = signal_series(window, verdict.signal, cfg.heap_block_bytes)
            if len(values) == len(window):
                # Too few samples since the last window gives None: the last answer holds.
                self.scales_with = (
                    scales_with(window, values, cfg.envelope_width) or self.scales_with
                )
            split = None
            if diagnosed is not None:
                # The routes under suspicion (all of them when none is named yet).
                suspected = {e.key for e in self.route_estimates if e.suspected}
                splits = [
                    v
                    for k, v in diagnosed.credential_splits.items()
                    if not suspected or k in suspected
                ]
                split = combined(splits) if splits else None
            # A window measures it per request: better than the regression, which cannot tell
            # the two apart when new credentials arrive at a steady share of the traffic.
            measured = split.scales_with(minimum) if split is not None else None
            if measured is not None:
                self.scales_with = measured
        else:
            self.scales_with = None

    # --- diagnosis windows --------------------------------------------------------------------

    def start_diagnosis(self, reason: str, *, force: bool = False) -> bool:
        """Opens a diagnosis window now (unless one runs, or the duty cycle forbids it)."""
        try:
            return self.diagnosis.start(reason, self.requests, force=force)
        except Exception as exc:
            self.errors.record("diagnosis.start", exc)
            return False

    def window_tag(
        self, path: str, method: str, auth: str, credential: str | None = None
    ) -> Tag | None:
        """The trampoline for a request entering during a window; drives the window on."""
        diagnosis = self.diagnosis
        window = diagnosis.window
        if window is None:
            return None
        if window.tagging and not window.should_drain():
            novel = self.credential_is_new(credential) if credential else None
            return window.tag_for((normalize_path(path), method_label(method), auth), novel)
        window.tagging = False
        if window.ready():
            try:
                diagnosis.step(self.requests)  # the snapshots run on the diagnosis thread
            except Exception as exc:
                self.errors.record("diagnosis.step", exc)
                diagnosis.abandon()
        return None

    def credential_is_new(self, credential: str) -> bool | None:
        """Whether a credential has not been seen yet (True), has (False), or is not among
        those the first-seen filter samples (None). Records nothing."""
        fingerprint = self._fingerprinter.fingerprint(credential)
        if fingerprint % FIRST_SEEN_SAMPLING:
            return None
        self.drain()  # credentials of queued requests are known already
        with self._lock:
            old = self._first_seen_old
            return not (
                self._first_seen_filter.contains(fingerprint)
                or (old is not None and old.contains(fingerprint))
            )

    def _diagnosis_failed(self, exc: BaseException) -> None:
        self.errors.record("diagnosis.finish", exc)
        self.detector.restart_after(self.requests)

    def _diagnosed(self, result: DiagnosisResult) -> None:
        self.detector.restart_after(self.requests)
        logger.info(
            "memwatch: diagnosis window done (%s): %d requests in %.1f s, %d sites, %d routes",
            result.reason,
            result.requests,
            result.duration_seconds,
            len(result.sites),
            len(result.routes),
        )
        self._update_attribution(self._window(), self.detector.verdict)
        if self.detector.verdict.suspected and not getattr(self, "_advice_logged", True):
            from memwatch.report import log_leak_advice  # report imports this module

            self._advice_logged = log_leak_advice(self.snapshot())

    def _transition(self, verdict: Verdict) -> None:
        """One WARNING when a leak is first suspected, one when it clears; then the callbacks."""
        if verdict.suspected:
            from memwatch.advice import UNDIAGNOSED, leak_advice  # on first use: saves memory

            suspects = [e for e in self.route_estimates if e.suspected]
            where = ", ".join(f"{e.key[1]} {e.key[0]} auth={e.key[2]}" for e in suspects[:5])
            advice = leak_advice(self.snapshot())
            self._advice_logged = advice is not None and advice.shape != UNDIAGNOSED
            logger.warning(
                "memwatch: memory leak suspected on %s: %.0f bytes/request, %.0f bytes/s, "
                "confidence %.4f; routes: %s; scales with %s; advice: %s",
                verdict.signal,
                verdict.bytes_per_request or 0.0,
                verdict.bytes_per_second or 0.0,
                verdict.confidence or 0.0,
                where or "not yet attributed",
                self.scales_with or "unknown",
                advice.log_text() if advice else "none",
                extra={
                    "memwatch_event": "leak_suspected",
                    "memwatch_signal": verdict.signal,
                    "memwatch_routes": [list(e.key) for e in suspects[:5]],
                    "memwatch_advice": advice.as_dict() if advice else None,
                },
            )
            callback = self.on_leak
        else:
            logger.warning(
                "memwatch: the suspected memory leak has cleared",
                extra={"memwatch_event": "leak_cleared"},
            )
            callback = self.on_clear
        if callback is not None:
            try:
                callback(self, verdict)
            except Exception as exc:
                self.errors.record("callback", exc)

    def read_signals(self) -> Sample:
        """Reads every signal now; a reading that fails is None and counted as an error."""
        self._flush_recorder()
        signals = self.signals
        rss: int | None = None
        heap: int | None = None
        try:
            rss = signals.rss_bytes()
        except Exception as exc:
            self.errors.record("signals.rss", exc)
        try:
            heap = signals.heap_blocks()
        except Exception as exc:
            self.errors.record("signals.heap", exc)
        try:
            pending = signals.gc_pending()
            collections_ = signals.gc_collections()
            traced = signals.traced_bytes()
        except Exception as exc:
            self.errors.record("signals.gc", exc)
            pending, collections_, traced = 0, (), None
        return Sample(
            time=self._clock(),
            wall=time.time(),
            requests=self.requests,
            rss_bytes=rss,
            heap_blocks=heap,
            gc_pending=pending,
            gc_collections=collections_,
            traced_bytes=traced,
            first_seen=self.first_seen,
        )

    def _in_steady_state(self) -> bool:
        """Whether periodic work runs on ``steady_budget_us``: the detector has judged a full
        window of samples (taken at the early phase's density), suspects nothing and is not
        confirming a suspicion, and no diagnosis window is open."""
        cfg = self.config
        detector = self.detector
        verdict = detector.verdict
        return (
            self._first_full_evaluation
            and (
                self._judged_samples >= cfg.window_samples
                # a large heap's samples are sparser from the start: its window is full when
                # it spans as many requests as it may (see _window)
                or self.requests - cfg.warmup_requests
                >= WINDOW_SPAN * cfg.window_samples * cfg.sample_every_requests
            )
            and verdict.status == "ok"  # judged, and nothing suspected
            and not detector.confirming
            and self.diagnosis.window is None
            and self.requests >= self._dense_until
        )

    def _rising(self) -> bool:
        """Whether the lower envelope of the heap (blocks net of pending containers) or of
        RSS rose faster than ``SENTINEL_RATE`` times its minimum growth per request over the
        last ``SENTINEL_SAMPLES`` samples (read from the ring's columns: once per steady sample)."""
        cfg = self.config
        ring = self.history
        width = cfg.envelope_width
        if len(ring) < SENTINEL_SAMPLES + width:
            return False
        at_now, heap_now, rss_now = ring.lows(0, width)
        at_then, heap_then, rss_then = ring.lows(SENTINEL_SAMPLES, width)
        elapsed = at_now - at_then
        if elapsed <= 0:
            return False
        for low, old, scale, minimum in (
            (heap_now, heap_then, cfg.heap_block_bytes, cfg.min_growth_bytes),
            (rss_now, rss_then, 1.0, cfg.min_growth_rss),
        ):
            if low is None or old is None:
                continue  # a reading missing: no envelope
            if (low - old) * scale / elapsed > SENTINEL_RATE * minimum:
                return True
        return False

    def _adapt_to_cost(self) -> None:
        """Stretches sampling so heap-sized readings stay within the per-request CPU budget."""
        budget = self.config.sample_budget_us
        every = self.config.sample_every_requests
        if self.requests >= self.config.warmup_requests and not self._first_full_evaluation:
            # From the end of the warm-up to the first verdict (a few thousand requests, once
            # per process): BOOST times the budget, so that samples come at the period
            # (sample_every_requests) even on a large heap, and a leak present from the start
            # is judged within about 5,000 requests. (Sampling faster than the period made the
            # first window so short that the warm-up's decaying tail passed for a leak.)
            budget *= BOOST
        cost = self.signals.heap_cost_us
        # A walk is charged at twice its time (it leaves the caches cold for the app), and the
        # interval is capped so that the detector is never starved of samples.
        self._cost_interval = min(max(1, math.ceil(2.0 * cost / budget)), MAX_SAMPLE_INTERVAL)
        self._min_interval = max(every, self._cost_interval)
        if self._probe_pairs:
            self._probe_cost_us = _smoothed(
                self._probe_cost_us, self._probe_spent * 1e6 / self._probe_pairs
            )
            self._probe_spent = 0.0
            self._probe_pairs = 0
        self._steady = steady = self._in_steady_state()
        if steady and self._sample_cost_us > 0.0:
            # Steady state: the whole sample, not only its heap walk, within its share of
            # steady_budget_us. (Samples due by time, at low traffic, keep the interval above:
            # sample_every_seconds still holds there.)
            share = self.config.steady_budget_us * STEADY_SAMPLE_SHARE
            interval = math.ceil(CACHE_CHARGE * self._sample_cost_us / share)
            self._min_interval = max(self._min_interval, min(interval, MAX_SAMPLE_INTERVAL))
        # Every probe reads the container count (O(1)); a heavy one also reads the heap and RSS,
        # twice per pair. (A suspected leak opens a diagnosis window, which attributes better
        # than more readings would.) A walk of the heap also leaves the caches cold for the app:
        # it is charged at twice its measured time.
        self._pair_rate = self.config.request_sample_rate
        if steady and self._probe_cost_us > 0.0:
            share = self.config.steady_budget_us * STEADY_PROBE_SHARE
            self._pair_rate = min(self._pair_rate, share / (CACHE_CHARGE * self._probe_cost_us))
        budget = self.config.pair_budget_us
        heavy_cost = 2.0 * (2.0 * cost + 2.0)
        heavy_rate = budget / heavy_cost
        # (Relative to the configured rate: in steady state, fewer pairs, of the same mix.)
        rate = self.config.request_sample_rate
        self._heavy_share = min(1.0, heavy_rate / max(rate, 1e-9))

    # --- reading the state --------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        self.drain()
        with self._lock:
            counts = dict(self._counts)
            deltas = {
                key: DeltaHistogram(list(h.buckets), h.count, h.total)
                for key, h in self._deltas.items()
            }
            distinct = {scheme: sketch.estimate() for scheme, sketch in self._sketches.items()}
            requests = self.requests
        return Snapshot(
            pid=self.pid,
            started_wall=self.started_wall,
            requests=requests,
            counts=counts,
            deltas=deltas,
            distinct_credentials=distinct,
            history=self.history.thinned(HISTORY_POINTS),
            internal_errors=self.errors.total,
            routes_overflowed=self.routes.overflowed,
            verdict=dataclasses.replace(self.detector.verdict),
            routes=list(self.route_estimates),
            scales_with=self.scales_with,
            diagnosis=self.diagnosis.last,
            diagnosis_windows=self.diagnosis.windows,
            diagnosis_active=self.diagnosis.window is not None,
        )


def _smoothed(previous: float, cost: float) -> float:
    """An exponentially smoothed cost, microseconds; one slow reading (preemption on a busy
    machine, a page fault) moves it by at most four times the previous value's fifth."""
    if previous <= 0.0:
        return cost
    return 0.8 * previous + 0.2 * min(cost, 4.0 * previous)


_MONITORS: weakref.WeakSet[Monitor] = weakref.WeakSet()


def all_monitors() -> list[Monitor]:
    """The monitors alive in this process."""
    return list(_MONITORS)


def _reinit_after_fork() -> None:
    for monitor in list(_MONITORS):
        monitor._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)
