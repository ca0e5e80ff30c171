"""Diagnosis windows: tracemalloc for a bounded time, then which line and which route retain.

Tracing every allocation costs several times a request's CPU, so it runs only inside windows:
when the detector suspects a leak (mode ``triggered``), on demand (:func:`memwatch.diagnose`,
``POST /memwatch/diagnose``), or always (mode ``always``, for development). A window:

1. **Tags.** tracemalloc starts (unless the user already traces: then memwatch uses their tracing
   and never stops it) and a snapshot is taken. Each request that enters is called through a
   small trampoline function whose code object is unique to the request's (normalised path,
   method, auth scheme): ``<memwatch request 7>``. Every allocation the request makes, on any
   thread or task, has that frame in its traceback. This is what makes attribution immune to
   concurrency: threads and coroutines interleave in time, never in a stack.
2. **Drains.** After ``diagnosis_requests`` requests or ``diagnosis_seconds``, new requests are
   no longer tagged; the window waits until every tagged request has finished, so that what the
   tagged requests still hold is what they retained, not responses in flight.
3. **Reads.** One collection of the young generations (garbage made during the window is not a
   leak), a second snapshot, tracing stops (if memwatch started it), and the two snapshots are
   compared by traceback: the growing allocation sites (memwatch's own frames left out, the
   first frame in application code preferred over library frames) and, through the trampoline
   frames, the bytes retained per request by each route.

The wall-time duty cycle is capped (``diagnosis_duty_cycle``, default 5 %): after a window of
length d the next one waits at least d / duty_cycle - d. On-demand windows (``force=True`` here:
:func:`memwatch.diagnose`, ``POST /memwatch/diagnose``) skip that wait, but their callers ask
:meth:`Diagnosis.on_demand_wait` first: the first on-demand window of an instance always opens,
a later one only once the pause after the last window is over, unless its caller forces it.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import sysconfig
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memwatch.config import Config

if TYPE_CHECKING:
    # The holder search (memwatch.holders) is imported by the first window that needs it: a
    # process that never opens a window does not hold its code.
    from memwatch.holders import Census, Holder
    from memwatch.recorder import Gate

RouteKey = tuple[str, str, str]

TRAMPOLINE_PREFIX = "<memwatch request "
MAX_TAGS = 1024
# Each route's requests are spread round-robin over this many trampolines: replicates whose
# retained bytes per request give the route's estimate a spread, hence a t statistic.
BUCKETS = 4
MAX_SITES = 10
# Requests of each kind (first-seen credential, known credential; only the quarter of
# credentials the first-seen filter samples can be told apart) a window needs before it says
# whether growth follows credentials.
MIN_SPLIT_REQUESTS = 5

_MEMWATCH_DIR = os.path.dirname(os.path.abspath(__file__))
_DEMO_DIR = os.path.join(_MEMWATCH_DIR, "demo")
_LIBRARY_DIRS = tuple(
    {
        os.path.abspath(p)
        for p in (
            sysconfig.get_paths().get("stdlib"),
            sysconfig.get_paths().get("platstdlib"),
            sysconfig.get_paths().get("purelib"),
            sysconfig.get_paths().get("platlib"),
        )
        if p
    }
)


_STDLIB_DIRS = tuple(
    {
        os.path.abspath(p)
        for p in (sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib"))
        if p
    }
)


def made_by_memwatch(frames: list[tracemalloc.Frame]) -> bool:
    """True when the newest frame outside the standard library is memwatch's own (its report
    serialised by ``dataclasses``, its counters in a ``dict``): memwatch's bookkeeping, bounded
    and tested on its own, is not a site of the app's growth."""
    for frame in reversed(frames):
        name = frame.filename
        if name.startswith(TRAMPOLINE_PREFIX):
            return False
        if is_memwatch_file(name):
            return True
        if not (name.startswith(_STDLIB_DIRS) or name.startswith("<")) or (
            "site-packages" in name
        ):
            return False
    return False


def is_memwatch_file(filename: str) -> bool:
    return filename.startswith(_MEMWATCH_DIR) and not filename.startswith(_DEMO_DIR)


def is_library_file(filename: str) -> bool:
    return (
        filename.startswith(_LIBRARY_DIRS)
        or "site-packages" in filename
        or "dist-packages" in filename
        or filename.startswith("<")
    )


def display_path(filename: str) -> str:
    """A file name relative to the working directory or to sys.path, for reports."""
    cwd = os.getcwd() + os.sep
    if filename.startswith(cwd):
        return filename[len(cwd) :]
    for entry in sorted(sys.path, key=len, reverse=True):
        if entry and filename.startswith(entry + os.sep):
            return filename[len(entry) + 1 :]
    return filename


@dataclass(frozen=True)
class SiteStat:
    file: str
    line: int
    traceback: list[str]
    size_diff_bytes: int
    count_diff: int
    # Net growth in the window's second half: what the site keeps for good. Sites are ranked by
    # it: a cache that turns over allocates as much in the window as a leak (its frees of
    # entries from before the window are invisible to tracemalloc) but keeps nothing net once
    # the window's own entries are being evicted.
    kept_bytes: int = 0


@dataclass(frozen=True)
class RouteRetention:
    """What one route's tagged requests kept: net, in the window's second half."""

    key: RouteKey
    requests: int  # tagged requests of the route in the second half
    retained_bytes: int
    retained_bytes_per_request: float
    first_half_bytes_per_request: float = 0.0
    # Second-half bytes per request of each of the route's replicates (its requests spread
    # round-robin over BUCKETS trampolines) that saw two requests or more, and their mean over
    # its standard error (None with fewer than three such replicates).
    replicate_rates: tuple[float, ...] = ()
    t: float | None = None


@dataclass
class DiagnosisResult:
    """What one window found."""

    reason: str
    started_wall: float
    duration_seconds: float
    requests: int
    frames: int
    traced_bytes: int
    sites: list[SiteStat] = field(default_factory=list)
    routes: list[RouteRetention] = field(default_factory=list)
    unattributed_bytes: int = 0
    holders: list[Holder] = field(default_factory=list)
    types: list[tuple[str, int]] = field(default_factory=list)  # (type name, growth in objects)
    holder_search_partial: bool = False
    raw_sites: list[tuple[str, int]] = field(default_factory=list)  # absolute paths, for chains
    error: str | None = None
    # Tagged requests per (route, method, auth) over the whole window: the denominators of the
    # holders' entries per request (memwatch.advice).
    route_requests: dict[RouteKey, int] = field(default_factory=dict)
    extension_modules: list[str] = field(default_factory=list)  # loaded, not the stdlib's
    # What requests with a first-seen credential kept against requests with a known one, over
    # the window (only requests whose credential the first-seen filter samples).
    credentials: CredentialSplit | None = None
    # The same, per (route, method, auth): growth on one route follows credentials or not.
    credential_splits: dict[RouteKey, CredentialSplit] = field(default_factory=dict)


@dataclass(frozen=True)
class CredentialSplit:
    """What requests that brought a new credential kept in a window, and what the others kept."""

    new_requests: int
    new_bytes: int
    known_requests: int
    known_bytes: int

    def scales_with(self, minimum: float) -> str | None:
        """``distinct_credentials`` when new credentials keep at least ``minimum`` bytes each
        and known ones under a quarter of that; ``requests`` when known ones keep at least
        ``minimum`` and at least half as much as new ones (or new ones were too few to
        compare: growth that known credentials bring does not follow credentials); None when
        too few requests were seen to tell."""
        enough_new = self.new_requests >= MIN_SPLIT_REQUESTS
        if self.known_requests < MIN_SPLIT_REQUESTS:
            return None
        known = self.known_bytes / self.known_requests
        new = self.new_bytes / self.new_requests if enough_new else 0.0
        if enough_new and new >= minimum and known <= 0.25 * new:
            return "distinct_credentials"
        if known >= minimum and (not enough_new or known >= 0.5 * new):
            return "requests"
        return None


class Tag:
    """A trampoline (one per request key in a window) and the window it belongs to.

    ``novel`` says whether the requests it carries brought a first-seen credential (True), a
    known one (False), or either / no credential / not sampled (None).
    """

    __slots__ = ("asgi", "bucket", "index", "novel", "window", "wsgi")

    def __init__(
        self, index: int, window: Window, novel: bool | None = None, bucket: int = 0
    ) -> None:
        self.index = index
        self.window = window
        self.novel = novel
        self.bucket = bucket
        namespace: dict[str, Any] = {}
        source = (
            "def wsgi(app, environ, start_response):\n"
            "    return app(environ, start_response)\n"
            "async def asgi(app, scope, receive, send):\n"
            "    await app(scope, receive, send)\n"
        )
        exec(compile(source, f"{TRAMPOLINE_PREFIX}{index}>", "exec"), namespace)
        self.wsgi: Callable[[Any, Any, Any], Iterable[bytes]] = namespace["wsgi"]
        self.asgi: Callable[[Any, Any, Any, Any], Awaitable[None]] = namespace["asgi"]


class Window:
    """A running diagnosis window (see the module docstring).

    It runs in two halves separated by a drained checkpoint snapshot. The first half shows what
    requests allocate and keep for a while; the second half's *net* growth per request is what
    they keep for good: a bounded cache that turns over (an ``lru_cache`` at its size) frees in
    the second half about as much as it allocates, a leak does not.
    """

    def __init__(self, config: Config, reason: str, requests_at_start: int) -> None:
        self.config = config
        self.reason = reason
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.requests_at_start = requests_at_start
        self.half = 1
        self.tagging = False  # until prepare() has run
        self.busy = True  # a census or a snapshot is being taken on the diagnosis thread
        self.inflight = 0
        self.tagged_requests = 0
        self._tagged_in_half = 0
        self._half_started = self.started
        self.lock = threading.Lock()
        self.census: Census | None = None
        self.typestats: dict[str, int] = {}
        self.own_tracing = False
        self.frames = 0
        self.before: tracemalloc.Snapshot | None = None
        self.middle: tracemalloc.Snapshot | None = None
        self._tags: dict[tuple[str, str, str, bool | None, int], Tag] = {}
        self._buckets: dict[int, int] = {}  # trampoline index -> replicate
        self._sequence: dict[tuple[str, str, str], int] = {}  # requests tagged per key
        # Second-half requests per (route, replicate).
        self.bucket_counts: Counter[tuple[RouteKey, int]] = Counter()
        self._novel: dict[int, bool] = {}  # trampoline index -> novel, for sampled credentials
        self.novel_counts: Counter[tuple[RouteKey, bool]] = Counter()  # by route and novelty
        self._overflow: Tag | None = None
        self.labels: dict[int, Counter[RouteKey]] = {}  # all requests, per trampoline
        self._places: dict[tuple[str, int], str] = {}  # allocation site -> "file:line"
        self.half_counts: tuple[Counter[RouteKey], Counter[RouteKey]] = (Counter(), Counter())

    def prepare(self) -> None:
        """Census, type counts, tracing and the first snapshot (on the diagnosis thread); then
        requests are tagged."""
        from memwatch.holders import take_census

        # The census and type counts first: they run much faster before tracing starts.
        self.census = take_census()
        self.typestats = _typestats()
        self.own_tracing = not tracemalloc.is_tracing()
        if self.own_tracing:
            tracemalloc.start(self.config.diagnosis_frames)
        self.frames = tracemalloc.get_traceback_limit()
        self.before = tracemalloc.take_snapshot()
        with self.lock:
            self.started = time.monotonic()
            self._half_started = self.started
            self.busy = False
            self.tagging = True

    def tag_for(self, key: tuple[str, str, str], novel: bool | None = None) -> Tag | None:
        """The trampoline for a request entering now, or None while the window drains.

        :param novel: the request brought a first-seen credential (True), a known one (False),
            or it is not known (None).
        """
        with self.lock:
            if not self.tagging:
                return None
            # Round-robin per request key, not over all requests: with a global counter, traffic
            # that alternates routes (a health check every other request) would send each
            # route to the same replicates every time.
            seen = self._sequence.get(key, 0)
            if seen or len(self._sequence) < MAX_TAGS:
                self._sequence[key] = seen + 1
            bucket = seen % BUCKETS
            full = (*key, novel, bucket)
            tag = self._tags.get(full)
            if tag is None:
                if len(self._tags) < MAX_TAGS:
                    tag = self._tags[full] = Tag(len(self._tags), self, novel, bucket)
                    self._buckets[tag.index] = bucket
                    if novel is not None:
                        self._novel[tag.index] = novel
                else:
                    if self._overflow is None:
                        self._overflow = Tag(MAX_TAGS, self)
                    tag = self._overflow
            self.inflight += 1
            self.tagged_requests += 1
            self._tagged_in_half += 1
            return tag

    def release(self, tag: Tag, label: RouteKey | None) -> None:
        """A tagged request finished; ``label`` is its final (route, method, auth).

        No tagged request spans the checkpoint (it waits for them), so the current half is the
        request's half.
        """
        with self.lock:
            self.inflight -= 1
            if label is not None:
                self.labels.setdefault(tag.index, Counter())[label] += 1
                self.half_counts[self.half - 1][label] += 1
            if tag.novel is not None and label is not None:
                self.novel_counts[(label, tag.novel)] += 1
            if label is not None and self.half == 2 and tag is not self._overflow:
                self.bucket_counts[(label, tag.bucket)] += 1

    def should_drain(self) -> bool:
        cfg = self.config
        return (
            self._tagged_in_half >= max(cfg.diagnosis_requests // 2, 1)
            or time.monotonic() - self._half_started >= cfg.diagnosis_seconds / 2
        )

    def ready(self) -> bool:
        """Drained: no tagged request is still running (or it has waited long enough)."""
        if self.tagging or self.busy:
            return False
        overdue = time.monotonic() - self.started > 2 * self.config.diagnosis_seconds + 30
        return self.inflight <= 0 or overdue

    def checkpoint(self) -> None:
        """Between the halves: the middle snapshot, then tagging resumes."""
        gc.collect(1)
        self.middle = tracemalloc.take_snapshot()
        with self.lock:
            self.half = 2
            self._tagged_in_half = 0
            self._half_started = time.monotonic()
            self.tagging = True

    def finish(self) -> DiagnosisResult:
        """Collect, snapshot, stop tracing (if ours), and compare."""
        try:
            gc.collect(1)
            after = tracemalloc.take_snapshot()
            traced = tracemalloc.get_traced_memory()[0]
            result = DiagnosisResult(
                reason=self.reason,
                started_wall=self.started_wall,
                duration_seconds=0.0,
                requests=self.tagged_requests,
                frames=self.frames,
                traced_bytes=traced,
            )
            self._analyse(after, result)
            del after
            result.route_requests = dict(self.half_counts[0] + self.half_counts[1])
            from memwatch.holders import extension_modules

            result.extension_modules = extension_modules()
            self._find_holders(result)
        finally:
            if self.own_tracing:
                tracemalloc.stop()
        result.duration_seconds = time.monotonic() - self.started
        return result

    def _find_holders(self, result: DiagnosisResult) -> None:
        """Census differences first; back-reference chains from the top sites otherwise."""
        from memwatch.holders import backref_holders, describe_all, grown, take_census

        after = take_census(keep=True)
        before = self.census or after
        minimum = max(10, self.tagged_requests // 20)
        holders = describe_all(grown(before, after, minimum), after.refs, self._origin)
        after.refs.clear()  # references to the app's containers: not kept past this window
        partial = before.partial or after.partial
        if not holders and result.raw_sites:
            chained, cut = backref_holders(result.raw_sites[:3])
            holders, partial = chained, partial or cut
        result.holders = holders
        result.holder_search_partial = partial
        now = _typestats()
        growth = [(name, count - self.typestats.get(name, 0)) for name, count in now.items()]
        result.types = sorted((g for g in growth if g[1] > 0), key=lambda g: -g[1])[:10]

    def _origin(self, obj: Any) -> tuple[RouteKey | None, str | None]:
        """The request (route, method, auth) and the line that allocated ``obj`` in this
        window; None, None for an object from before it."""
        traceback = tracemalloc.get_object_traceback(obj)
        if traceback is None:
            return None, None
        site = _site(list(traceback))
        where = None
        if site is not None:
            where = self._places.get(site)
            if where is None:
                where = self._places[site] = f"{display_path(site[0])}:{site[1]}"
        return self._route_of(traceback), where

    def _label_of(self, index: int) -> RouteKey | None:
        counter = self.labels.get(index)
        if not counter:
            return None
        return counter.most_common(1)[0][0]

    def _route_of(self, traceback: tracemalloc.Traceback) -> RouteKey | None:
        index = _trampoline(traceback)
        return self._label_of(index) if index is not None else None

    def _analyse(self, after: tracemalloc.Snapshot, result: DiagnosisResult) -> None:
        filters = [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        ]
        assert self.before is not None
        start = self.before.filter_traces(filters)
        end = after.filter_traces(filters)
        middle = self.middle.filter_traces(filters) if self.middle is not None else start
        whole = {d.traceback: d for d in end.compare_to(start, "traceback")}
        second = end.compare_to(middle, "traceback")
        first_bytes: Counter[RouteKey] = Counter()
        for d in middle.compare_to(start, "traceback"):
            route = self._route_of(d.traceback)
            if route is not None:
                first_bytes[route] += d.size_diff
        second_bytes: Counter[RouteKey] = Counter()
        bucket_bytes: Counter[tuple[RouteKey, int]] = Counter()
        novel_bytes: Counter[tuple[RouteKey, bool]] = Counter()
        sites: list[SiteStat] = []
        unattributed = 0
        for diff in second:
            index = _trampoline(diff.traceback)
            route = self._label_of(index) if index is not None else None
            if route is not None:
                second_bytes[route] += diff.size_diff
                bucket = self._buckets.get(index) if index is not None else None
                if bucket is not None:
                    bucket_bytes[(route, bucket)] += diff.size_diff
            elif diff.size_diff > 0:
                unattributed += diff.size_diff
            if diff.size_diff <= 0:
                continue
            frames = list(diff.traceback)  # oldest first
            if made_by_memwatch(frames):
                continue
            site = _site(frames)
            if site is None:
                continue
            total = whole.get(diff.traceback, diff)
            if len(result.raw_sites) < MAX_SITES:
                result.raw_sites.append(site)
            sites.append(
                SiteStat(
                    file=display_path(site[0]),
                    line=site[1],
                    traceback=[
                        f"{display_path(f.filename)}:{f.lineno}"
                        for f in reversed(frames)
                        if not is_memwatch_file(f.filename)
                        and not f.filename.startswith(TRAMPOLINE_PREFIX)
                    ],
                    size_diff_bytes=max(total.size_diff, diff.size_diff),
                    count_diff=max(total.count_diff, diff.count_diff),
                    kept_bytes=diff.size_diff,
                )
            )
        result.sites = _merge_sites(sites)[:MAX_SITES]
        result.unattributed_bytes = unattributed
        # New against known credentials over the whole window: a credential-keyed cache keeps
        # an entry per new credential in either half, and the two kinds of requests share the
        # same transient allocations, so the whole window doubles the evidence.
        for diff in whole.values():
            index = _trampoline(diff.traceback)
            if index is None:
                continue
            novel = self._novel.get(index)
            label = self._label_of(index)
            if novel is not None and label is not None:
                novel_bytes[(label, novel)] += diff.size_diff
        for key in {label for label, _novel in self.novel_counts}:
            result.credential_splits[key] = CredentialSplit(
                new_requests=self.novel_counts[(key, True)],
                new_bytes=novel_bytes[(key, True)],
                known_requests=self.novel_counts[(key, False)],
                known_bytes=novel_bytes[(key, False)],
            )
        if result.credential_splits:
            result.credentials = combined(result.credential_splits.values())
        first_n, second_n = self.half_counts
        routes = []
        for key in set(first_bytes) | set(second_bytes):
            n1, n2 = first_n.get(key, 0), second_n.get(key, 0)
            steady = second_bytes.get(key, 0) / n2 if n2 else 0.0
            early = first_bytes.get(key, 0) / n1 if n1 else 0.0
            routes.append(
                RouteRetention(
                    key=key,
                    requests=n2,
                    retained_bytes=second_bytes.get(key, 0),
                    retained_bytes_per_request=steady,
                    first_half_bytes_per_request=early,
                    replicate_rates=(
                        rates := _replicate_rates(key, bucket_bytes, self.bucket_counts)
                    ),
                    t=_replicate_t(list(rates)),
                )
            )
        result.routes = sorted(routes, key=lambda r: -r.retained_bytes_per_request)


def _replicate_rates(
    key: RouteKey,
    bucket_bytes: Counter[tuple[RouteKey, int]],
    bucket_counts: Counter[tuple[RouteKey, int]],
) -> tuple[float, ...]:
    return tuple(
        bucket_bytes[(key, b)] / bucket_counts[(key, b)]
        for b in range(BUCKETS)
        if bucket_counts[(key, b)] >= 2
    )


def _replicate_t(rates: list[float]) -> float | None:
    """Mean over standard error of a route's replicate rates (None with fewer than three)."""
    k = len(rates)
    if k < 3:
        return None
    mean = sum(rates) / k
    var = sum((r - mean) ** 2 for r in rates) / (k - 1)
    if var <= 0.0:
        return math.inf if mean > 0 else 0.0
    return mean / math.sqrt(var / k)


def combined(splits: Iterable[CredentialSplit]) -> CredentialSplit:
    """The sum of several routes' splits."""
    parts = list(splits)
    return CredentialSplit(
        new_requests=sum(p.new_requests for p in parts),
        new_bytes=sum(p.new_bytes for p in parts),
        known_requests=sum(p.known_requests for p in parts),
        known_bytes=sum(p.known_bytes for p in parts),
    )


def _trampoline(traceback: tracemalloc.Traceback) -> int | None:
    """The index of the request trampoline in an allocation's traceback, if any."""
    for frame in traceback:
        if frame.filename.startswith(TRAMPOLINE_PREFIX):
            return int(frame.filename[len(TRAMPOLINE_PREFIX) : -1])
    return None


def _typestats(budget_seconds: float = 1.0) -> dict[str, int]:
    """Counts of gc-tracked objects by type name (objgraph's typestats, bounded in time)."""
    counts: Counter[str] = Counter()
    deadline = time.thread_time() + budget_seconds
    for index, obj in enumerate(gc.get_objects()):
        if index % 8192 == 0 and time.thread_time() > deadline:
            break
        counts[type(obj).__name__] += 1
    return dict(counts)


def _site(frames: list[tracemalloc.Frame]) -> tuple[str, int] | None:
    """The allocation site to report: the most recent frame in application code, else the most
    recent frame outside memwatch."""
    candidates = [
        f
        for f in reversed(frames)
        if not is_memwatch_file(f.filename) and not f.filename.startswith(TRAMPOLINE_PREFIX)
    ]
    for frame in candidates:
        if not is_library_file(frame.filename):
            return frame.filename, frame.lineno
    if candidates:
        return candidates[0].filename, candidates[0].lineno
    return None


def _merge_sites(sites: list[SiteStat]) -> list[SiteStat]:
    """Tracebacks that differ only above the site are one site for the reader."""
    merged: dict[tuple[str, int], SiteStat] = {}
    for s in sites:
        key = (s.file, s.line)
        prior = merged.get(key)
        if prior is None:
            merged[key] = s
        else:
            bigger = prior if prior.size_diff_bytes >= s.size_diff_bytes else s
            merged[key] = SiteStat(
                file=s.file,
                line=s.line,
                traceback=bigger.traceback,
                size_diff_bytes=prior.size_diff_bytes + s.size_diff_bytes,
                count_diff=prior.count_diff + s.count_diff,
                kept_bytes=prior.kept_bytes + s.kept_bytes,
            )
    return sorted(merged.values(), key=lambda s: (-s.kept_bytes, -s.size_diff_bytes))


class Diagnosis:
    """Starts, drives and finishes windows; remembers the last result; caps the duty cycle."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._gate: Gate | None = None
        self.window = None
        self.last: DiagnosisResult | None = None
        self.windows = 0
        self.on_demand_windows = 0  # windows opened with force=True (on demand)
        self.busy_seconds = 0.0
        self._not_before = 0.0
        self._lock = threading.RLock()
        self.on_result: Callable[[DiagnosisResult], object] | None = None
        self.on_error: Callable[[BaseException], object] | None = None

    @property
    def window(self) -> Window | None:
        """The running window, or None."""
        return self._window

    @window.setter
    def window(self, window: Window | None) -> None:
        self._window = window
        if self._gate is not None:
            self._gate.window_open = window is not None

    def attach(self, gate: Gate) -> None:
        """The monitor's request gate, told whether a window runs (the compiled paths read
        that instead of this object at every request)."""
        self._gate = gate
        gate.window_open = self._window is not None

    def can_start(self) -> bool:
        return self.window is None and time.monotonic() >= self._not_before

    def on_demand_wait(self) -> float:
        """Seconds an on-demand window must still wait for the duty-cycle pause after the last
        window (0.0: it may open now). The first on-demand window of this instance never waits;
        nor does a request while a window runs (it is answered "already running")."""
        if self.on_demand_windows == 0 or self.window is not None:
            return 0.0
        return max(self._not_before - time.monotonic(), 0.0)

    def start(self, reason: str, requests: int, *, force: bool = False) -> bool:
        if self.config.diagnosis == "off" and not force:
            return False
        with self._lock:
            if self.window is not None or (not force and time.monotonic() < self._not_before):
                return False
            window = self.window = Window(self.config, reason, requests)
            if force:
                self.on_demand_windows += 1
        if force:
            # Asked for (memwatch.diagnose(), POST /memwatch/diagnose): prepared before
            # returning, so that the next request is already traced.
            self._prepare(window)
            return self.window is window
        # Triggered from a request's sampling path: prepared on the diagnosis thread.
        threading.Thread(
            target=self._prepare, args=(window,), name="memwatch-diagnosis", daemon=True
        ).start()
        return True

    def _prepare(self, window: Window) -> None:
        try:
            window.prepare()
        except Exception as exc:
            self._failed(window, exc)

    def abandon(self) -> None:
        """Drops a window that failed, stopping tracing if memwatch started it."""
        window, self.window = self.window, None
        if window is not None and window.own_tracing and tracemalloc.is_tracing():
            tracemalloc.stop()
        self._not_before = time.monotonic() + self.config.diagnosis_seconds / (
            self.config.diagnosis_duty_cycle
        )

    def step(self, requests: int) -> None:
        """Advances the running window. The snapshots and the analysis run on a thread of
        their own, so that no request waits for them; ``on_result`` gets the result."""
        window = self.window
        if window is None:
            return
        if window.tagging and window.should_drain():
            window.tagging = False
        with self._lock:
            if self.window is not window or window.busy or not window.ready():
                return
            window.busy = True
        target = self._checkpoint if window.half == 1 else self._finish
        threading.Thread(
            target=target, args=(window,), name="memwatch-diagnosis", daemon=True
        ).start()

    def _checkpoint(self, window: Window) -> None:
        try:
            window.checkpoint()
        except Exception as exc:
            self._failed(window, exc)
        finally:
            window.busy = False

    def _finish(self, window: Window) -> None:
        try:
            result = window.finish()
        except Exception as exc:
            self._failed(window, exc)
            return
        with self._lock:
            self.window = None
            self.windows += 1
            self.busy_seconds += result.duration_seconds
            pause = result.duration_seconds / self.config.diagnosis_duty_cycle
            self._not_before = time.monotonic() + max(pause - result.duration_seconds, 0.0)
            self.last = result
        if self.on_result is not None:
            self.on_result(result)

    def _failed(self, window: Window, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        with self._lock:
            if self.window is window:
                self.abandon()
