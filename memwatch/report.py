"""The report: one dataclass tree built from the monitor's state, rendered as JSON or HTML.

Building (:func:`build_report`) and rendering (:func:`to_json`, :mod:`memwatch.html`) are apart,
so tests assert on data, not on text. Everything in the report is bounded (routes, sites, roots,
history points) and nothing in it comes from a credential, a header value or a cookie: routes are
templates or normalised paths, auth is a scheme name.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from memwatch.advice import UNDIAGNOSED, advise, context_of, leak_advice
from memwatch.errors import logger
from memwatch.monitor import HISTORY_POINTS, Snapshot

MAX_ROUTES_IN_REPORT = 200
MAX_HISTORY_POINTS = HISTORY_POINTS
MAX_TRACEBACK = 16
MAX_SITES_IN_REPORT = 10  # what a diagnosis window keeps anyway; held here too, whatever comes
MAX_ROOTS_IN_REPORT = 10
MAX_TYPES_IN_REPORT = 10


@dataclass
class Leak:
    suspected: bool = False
    status: str = "warming_up"  # warming_up | ok | suspected | unknown
    signal: str | None = None
    growth_bytes_per_request: float | None = None
    growth_bytes_per_second: float | None = None
    confidence: float | None = None
    since: str | None = None
    scales_with: str | None = None
    # Heap growth between two full collections (the collect check that confirmed or rejected
    # the last heap suspicion), bytes per request.
    collected_growth_bytes_per_request: float | None = None
    collected_malloc_growth_bytes_per_request: float | None = None
    advice: str | None = None
    # The advice in full (memwatch.advice.Advice.as_dict): text, shape, confidence, holder,
    # evidence, stopgap. Additive: ``advice`` stays the one-line string.
    advice_detail: dict[str, Any] | None = None


@dataclass
class RouteStat:
    route: str
    method: str
    auth: str
    requests: int
    retained_bytes_per_request: float | None = None
    suspected: bool = False
    pairs: int = 0  # per-request measurements behind the estimate
    t: float | None = None  # Welch's t of this route against the rest


@dataclass
class Site:
    file: str
    line: int
    traceback: list[str]
    size_diff_bytes: int
    count_diff: int


@dataclass
class Root:
    path: str
    type: str
    length: int | None
    growth: int | None
    advice: str | None = None
    advice_detail: dict[str, Any] | None = None


@dataclass
class TypeGrowth:
    type: str
    growth: int  # objects of this type gained during the last diagnosis window


@dataclass
class HistoryPoint:
    seconds: float  # since the first point
    requests: int
    rss_bytes: int | None
    heap_blocks: int | None


@dataclass
class ProcessInfo:
    pid: int
    python: str
    started: str
    requests: int
    rss_bytes: int | None
    heap_blocks: int | None
    internal_errors: int
    routes_overflowed: int
    distinct_credentials: dict[str, float]


@dataclass
class DiagnosisInfo:
    windows: int
    active: bool
    last_reason: str | None = None
    last_started: str | None = None
    last_duration_seconds: float | None = None
    last_requests: int | None = None
    frames: int | None = None
    unattributed_bytes: int | None = None
    holder_search_partial: bool | None = None  # the holder search ran out of its time budget
    # Bytes kept per request by requests that brought a first-seen credential and by the
    # others (the quarter of credentials memwatch samples), over the window: what
    # ``leak.scales_with`` rests on.
    new_credential_requests: int | None = None
    new_credential_bytes_per_request: float | None = None
    known_credential_requests: int | None = None
    known_credential_bytes_per_request: float | None = None


@dataclass
class Report:
    leak: Leak
    routes: list[RouteStat]
    sites: list[Site] = field(default_factory=list)
    roots: list[Root] = field(default_factory=list)
    types: list[TypeGrowth] = field(default_factory=list)
    process: ProcessInfo | None = None
    history: list[HistoryPoint] = field(default_factory=list)
    diagnosis: DiagnosisInfo | None = None
    generated_at: str = ""
    version: str = ""


def isoformat(epoch: float) -> str:
    moment = _dt.datetime.fromtimestamp(epoch, tz=_dt.timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _round(value: float | None, digits: int = 1) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def leak_of(snapshot: Snapshot) -> Leak:
    """The report's ``leak`` section from the detector's verdict."""
    v = snapshot.verdict
    status = v.status
    last = snapshot.history[-1] if snapshot.history else None
    if not v.suspected and last is not None and last.rss_bytes is None and last.heap_blocks is None:
        # The latest reading found no memory signal at all: say so rather than "ok" from older
        # readings, or "warming up" as if a verdict were coming.
        status = "unknown"
    return Leak(
        suspected=v.suspected,
        status=status,
        signal=v.signal,
        growth_bytes_per_request=_round(v.bytes_per_request),
        growth_bytes_per_second=_round(v.bytes_per_second),
        confidence=_round(v.confidence, 6),
        since=isoformat(v.since_wall) if v.since_wall is not None else None,
        scales_with=snapshot.scales_with if v.suspected else None,
        collected_growth_bytes_per_request=_round(v.collected_bytes_per_request),
        collected_malloc_growth_bytes_per_request=_round(v.collected_malloc_bytes_per_request),
    )


def build_report(snapshot: Snapshot, *, leak: Leak | None = None, now: float) -> Report:
    from memwatch import __version__

    per_route: dict[tuple[str, str, str], int] = {}
    for (route, method, auth, _outcome), count in snapshot.counts.items():
        key = (route, method, auth)
        per_route[key] = per_route.get(key, 0) + count
    estimates = {e.key: e for e in snapshot.routes}
    routes = []
    for (r, m, a), n in sorted(
        per_route.items(),
        key=lambda kv: (
            not (estimates.get(kv[0]) and estimates[kv[0]].suspected),
            -kv[1],
            kv[0],
        ),
    )[:MAX_ROUTES_IN_REPORT]:
        estimate = estimates.get((r, m, a))
        routes.append(
            RouteStat(
                route=r,
                method=m,
                auth=a,
                requests=n,
                retained_bytes_per_request=_round(
                    estimate.retained_bytes_per_request if estimate else None
                ),
                suspected=bool(estimate and estimate.suspected),
                pairs=estimate.pairs if estimate else 0,
                t=_round(estimate.t, 2) if estimate else None,
            )
        )
    history = _thin(snapshot.history)
    last = snapshot.history[-1] if snapshot.history else None
    process = ProcessInfo(
        pid=snapshot.pid,
        python=sys.version.split()[0],
        started=isoformat(snapshot.started_wall),
        requests=snapshot.requests,
        rss_bytes=last.rss_bytes if last else None,
        heap_blocks=last.heap_blocks if last else None,
        internal_errors=snapshot.internal_errors,
        routes_overflowed=snapshot.routes_overflowed,
        distinct_credentials={k: round(v, 1) for k, v in snapshot.distinct_credentials.items()},
    )
    window = snapshot.diagnosis
    diagnosis = DiagnosisInfo(windows=snapshot.diagnosis_windows, active=snapshot.diagnosis_active)
    sites: list[Site] = []
    roots: list[Root] = []
    types_grown: list[TypeGrowth] = []
    leak = leak or leak_of(snapshot)
    top, per_holder = advise(window, context_of(snapshot))
    if top is not None and leak.suspected:
        leak.advice, leak.advice_detail = top.line, top.as_dict()
    if window is not None:
        diagnosis.last_reason = window.reason
        diagnosis.last_started = isoformat(window.started_wall)
        diagnosis.last_duration_seconds = round(window.duration_seconds, 3)
        diagnosis.last_requests = window.requests
        diagnosis.frames = window.frames
        diagnosis.unattributed_bytes = window.unattributed_bytes
        diagnosis.holder_search_partial = window.holder_search_partial
        split = window.credentials
        if split is not None:
            diagnosis.new_credential_requests = split.new_requests
            diagnosis.known_credential_requests = split.known_requests
            if split.new_requests:
                diagnosis.new_credential_bytes_per_request = _round(
                    split.new_bytes / split.new_requests
                )
            if split.known_requests:
                diagnosis.known_credential_bytes_per_request = _round(
                    split.known_bytes / split.known_requests
                )
        roots = [
            Root(
                path=h.path,
                type=h.type,
                length=h.length,
                growth=h.growth,
                advice=a.line,
                advice_detail=a.as_dict(),
            )
            for h, a in zip(window.holders[:MAX_ROOTS_IN_REPORT], per_holder, strict=False)
        ]
        types_grown = [
            TypeGrowth(type=name, growth=n) for name, n in window.types[:MAX_TYPES_IN_REPORT]
        ]
        sites = [
            Site(
                file=s.file,
                line=s.line,
                traceback=s.traceback[:MAX_TRACEBACK],
                size_diff_bytes=s.size_diff_bytes,
                count_diff=s.count_diff,
            )
            for s in window.sites[:MAX_SITES_IN_REPORT]
        ]
    return Report(
        leak=leak,
        routes=routes,
        sites=sites,
        roots=roots,
        types=types_grown,
        diagnosis=diagnosis,
        process=process,
        history=history,
        generated_at=isoformat(now),
        version=__version__,
    )


def log_leak_advice(snapshot: Snapshot) -> bool:
    """Logs the advice for a suspected leak once a diagnosis window has given some (the leak
    warning itself is logged before the window that the suspicion opens). True if logged."""
    advice = leak_advice(snapshot)
    if advice is None or advice.shape == UNDIAGNOSED:
        return False
    logger.warning(
        "memwatch: advice for the suspected memory leak: %s",
        advice.log_text(),
        extra={"memwatch_event": "leak_advice", "memwatch_advice": advice.as_dict()},
    )
    return True


def _thin(samples: list[Any]) -> list[HistoryPoint]:
    if not samples:
        return []
    # Every step-th sample from the first, plus the last: a step of ceil((n - 1) / (MAX - 1))
    # keeps that within MAX points (ceil(n / MAX) gave MAX + 1 for n = 2 * MAX, for example).
    step = max(1, -(-(len(samples) - 1) // (MAX_HISTORY_POINTS - 1)))
    chosen = samples[::step]
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    start = samples[0].time
    return [
        HistoryPoint(
            seconds=round(s.time - start, 3),
            requests=s.requests,
            rss_bytes=s.rss_bytes,
            heap_blocks=s.heap_blocks,
        )
        for s in chosen
    ]


def to_dict(report: Report) -> dict[str, Any]:
    return dataclasses.asdict(report)


def to_json(report: Report) -> bytes:
    return json.dumps(to_dict(report), allow_nan=False).encode()
