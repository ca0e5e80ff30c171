"""The per-process state: request counters, sampled readings, distinct-credential sketches.

Both middlewares feed one :class:`Monitor`. Its per-request path does plain work only: a dict
increment under a lock, a random draw, and, for a request that carries a credential, a keyed hash
folded into a fixed-size sketch. Anything whose cost grows with the heap (the heap-block count)
runs on a sample of requests, at a rate derived from its measured cost.
"""

from __future__ import annotations

import collections
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from memwatch.auth import AUTH_SCHEMES, AuthClassifier
from memwatch.config import Config
from memwatch.errors import InternalErrors
from memwatch.routes import RouteTable
from memwatch.signals import Sample, Signals
from memwatch.sketch import Fingerprinter, HyperLogLog

OUTCOMES = ("ok", "rejected", "client_error", "server_error")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Buckets of the per-request heap delta histogram, in bytes. Deltas can be negative (a request
# that frees more than it allocates, or a collection during the request).
DELTA_BUCKETS = (
    -65536.0,
    -4096.0,
    -512.0,
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


class Monitor:
    """Everything memwatch knows about this process, fed by the middlewares.

    :param config: The options.
    :param signals: Where readings come from (a seam for tests and other platforms).
    :param clock: Monotonic clock, seconds.
    :param rng: Random source for per-request sampling (seed it in tests).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        signals: Signals | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or Config()
        self.signals = signals or Signals()
        self.errors = InternalErrors()
        self.routes = RouteTable(self.config.max_routes)
        self.auth = AuthClassifier(self.config)
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._fingerprinter = Fingerprinter()
        self._reset_state()
        _MONITORS.add(self)

    def _reset_state(self) -> None:
        self.pid = os.getpid()
        self.started_wall = time.time()
        self.requests = 0
        self._counts: dict[RequestKey, int] = {}
        self._deltas: dict[tuple[str, str], DeltaHistogram] = {}
        self._sketches = {scheme: HyperLogLog() for scheme in AUTH_SCHEMES if scheme != "anonymous"}
        self.history: collections.deque[Sample] = collections.deque(
            maxlen=self.config.history_size
        )
        self._last_sample_time = self._clock()
        self._last_sample_requests = 0
        self._min_interval = self.config.sample_every_requests
        self._cost_interval = 1
        self._delta_rate = self.config.request_sample_rate

    def _after_fork(self) -> None:
        # A worker forked from a master that served requests (or held a lock) starts afresh.
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        self._fingerprinter = Fingerprinter()
        self._reset_state()

    # --- the per-request path ----------------------------------------------------------------

    def request_entry(self) -> int | None:
        """Called when a request enters; returns a heap reading if the request is measured."""
        if self._random() < self._delta_rate:
            return self.signals.heap_blocks()
        return None

    def request_exit(
        self,
        route: str,
        method: str,
        auth: str,
        credential: str | None,
        status: int,
        entry_heap: int | None,
    ) -> None:
        """Records a finished request (its response fully sent, or failed)."""
        delta: float | None = None
        if entry_heap is not None:
            delta = (self.signals.heap_blocks() - entry_heap) * self.config.heap_block_bytes
        fingerprint = self._fingerprinter.fingerprint(credential) if credential else None
        key = (route, method_label(method), auth, outcome_of(status))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            self.requests += 1
            if fingerprint is not None:
                sketch = self._sketches.get(auth)
                if sketch is not None:
                    sketch.add(fingerprint)
            if delta is not None:
                hist = self._deltas.get((route, auth))
                if hist is None:
                    hist = self._deltas[(route, auth)] = DeltaHistogram()
                hist.observe(delta)
            since = self.requests - self._last_sample_requests
        if since >= self._min_interval or (
            since >= self._cost_interval
            and self._clock() - self._last_sample_time >= self.config.sample_every_seconds
        ):
            self.take_sample()

    # --- periodic samples -------------------------------------------------------------------

    def take_sample(self) -> Sample | None:
        """Reads every signal once and appends the sample to the history.

        Concurrent callers do not queue: whoever holds the sampling lock takes the sample.
        """
        if not self._sample_lock.acquire(blocking=False):
            return None
        try:
            sample = self.read_signals()
            self.history.append(sample)
            self._last_sample_time = sample.time
            self._last_sample_requests = sample.requests
            self._adapt_to_cost()
            return sample
        finally:
            self._sample_lock.release()

    def read_signals(self) -> Sample:
        """Reads every signal now; a reading that fails is None and counted as an error."""
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
        )

    def _adapt_to_cost(self) -> None:
        """Stretches sampling so heap-sized readings stay within the per-request CPU budget."""
        budget = self.config.sample_budget_us
        cost = self.signals.heap_cost_us
        self._cost_interval = max(1, math.ceil(cost / budget))
        self._min_interval = max(self.config.sample_every_requests, self._cost_interval)
        # A measured request costs two heap readings.
        self._delta_rate = min(self.config.request_sample_rate, budget / (2.0 * cost))

    # --- reading the state --------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
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
            history=list(self.history),
            internal_errors=self.errors.total,
            routes_overflowed=self.routes.overflowed,
        )


_MONITORS: weakref.WeakSet[Monitor] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for monitor in list(_MONITORS):
        monitor._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)
