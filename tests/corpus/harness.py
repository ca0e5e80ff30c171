"""Run one corpus case end to end and judge memwatch's verdict.

:func:`run_case` starts the case's server, sends its traffic, polls ``/memwatch/report.json``
every 500 requests, and returns a :class:`CaseResult`: when the leak was first suspected, when
the leaking (route, method, auth) was first marked, which routes were marked, ``scales_with``,
the alert counter from ``/metrics``, and every poll (the series the detector saw, for tuning).

A leaking case stops :data:`SETTLE_REQUESTS` after the leaking route is first marked (to see
that the verdict holds), or at ``case.max_requests``; a clean case always runs to the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.corpus.catalog import Case, RouteKey
from tests.corpus.servers import serve
from tests.corpus.traffic import Poll, Traffic, fetch, metric_value, run_load

POLL_EVERY = 500
SETTLE_REQUESTS = 1_000
# How long past detection a leaking case waits for its first diagnosis window to finish.
MAX_WINDOW_WAIT = 6_000
# The top sites of a window that must include the leaking line.
TOP_SITES = 3

# case -> (what the leak's advice must name as the holder, the change it must name)
ADVICE: dict[str, tuple[str, str]] = {
    "django_token_cache": (
        "tests.corpus.django_token_cache._CLAIMS_BY_TOKEN",
        "lru_cache(maxsize=",
    ),
    "flask_basic_audit": ("tests.corpus.flask_basic_audit.LOGIN_METRICS", "deque(maxlen="),
    "wsgi_failed_logins": ("tests.corpus.wsgi_failed_logins.FAILED_LOGINS", "deque(maxlen="),
    "starlette_export_buffers": (
        "tests.corpus.starlette_export_buffers._RECENT_EXPORTS",
        "deque(maxlen=",
    ),
    "flask_threaded_registry": (
        "tests.corpus.flask_threaded_registry.Registry.items",
        "deque(maxlen=",
    ),
    "django_rare_route": ("tests.corpus.django_rare_route._RENDERED", "deque(maxlen="),
    "starlette_background_tasks": (
        "tests.corpus.starlette_background_tasks._BACKGROUND",
        "add_done_callback(_BACKGROUND.discard)",
    ),
    "fastapi_logger_handlers": ("logger 'eval.payments'", "once at startup"),
}
# A clean app passes only if memwatch actually judged it (status "ok", past its warm-up and with
# enough samples for a trend test) for at least this many requests: a detector still warming up
# at the end of the run raises no alarm, but proves nothing either.
MIN_JUDGED_REQUESTS = 5_000


@dataclass
class CaseResult:
    case: str
    framework: str
    server: str
    leaking_route: RouteKey | None
    leak_bytes_per_request: float | None
    requests: int
    seconds: float
    first_verdict: int | None = None  # requests at the first poll past "warming_up"
    first_flagged: int | None = None  # requests at the first poll with leak.suspected
    detected: int | None = None  # requests at the first poll that marked the leaking route
    routes_marked: list[RouteKey] = field(default_factory=list)
    scales_with: str | None = None  # at the last poll while suspected
    scales_with_at_detection: str | None = None
    cleared_at: int | None = None  # a suspected verdict that went away while the leak went on
    alerts_total: float | None = None
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    polls: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    # The last report's diagnosis evidence (sites, roots, types), for tuning and for the advice.
    evidence: dict[str, Any] = field(default_factory=dict)
    unexpected_statuses: dict[str, int] = field(default_factory=dict)
    server_log_tail: str = ""

    @property
    def extra_routes(self) -> list[RouteKey]:
        return [k for k in self.routes_marked if k != self.leaking_route]

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        why = "; ".join(self.reasons + self.warnings)
        return f"{verdict} {self.case}: {why}" if why else f"{verdict} {self.case}"


def run_case(
    case: Case,
    *,
    seed: int = 1,
    max_requests: int | None = None,
    stop_when_detected: bool = True,
    progress: Callable[[str], None] | None = print,
    log_dir: Path | None = None,
) -> CaseResult:
    """Runs ``case`` under its server and judges the verdict (see the module docstring)."""
    limit = max_requests or case.max_requests
    leak_key = case.leak.route if case.leak else None
    detected: list[int] = []

    def stop(poll: Poll) -> bool:
        if leak_key is None or not stop_when_detected:
            return False
        if not detected and poll.suspected and leak_key in poll.suspected_routes:
            detected.append(poll.requests)
        # Settled, and a diagnosis window has finished (its sites and holders are judged).
        return (
            bool(detected)
            and poll.requests >= detected[0] + SETTLE_REQUESTS
            and (poll.windows > 0 or poll.requests >= detected[0] + MAX_WINDOW_WAIT)
        )

    started = time.monotonic()
    with serve(case, log_dir=log_dir) as server:
        traffic = Traffic(case, seed=seed)
        stats = run_load(
            server.port,
            traffic,
            clients=case.clients,
            max_requests=limit,
            poll_every=POLL_EVERY,
            stop=stop,
            progress=progress,
            label=case.name,
        )
        status, body = fetch(server.port, "/metrics")
        alerts = (
            metric_value(body.decode(), "memwatch_leak_alerts_total") if status == 200 else None
        )
        report_status, report_body = fetch(server.port, "/memwatch/report.json")
        history: list[dict[str, Any]] = []
        evidence: dict[str, Any] = {}
        if report_status == 200:
            import json

            report = json.loads(report_body)
            history = report.get("history") or []
            evidence = {k: report.get(k) for k in ("leak", "sites", "roots", "types", "diagnosis")}
        log_tail = server.log_tail()

    result = CaseResult(
        case=case.name,
        framework=case.framework,
        server=case.server,
        leaking_route=leak_key,
        leak_bytes_per_request=case.leak.bytes_per_request if case.leak else None,
        requests=stats.requests,
        seconds=round(time.monotonic() - started, 1),
        alerts_total=alerts,
        polls=[p.brief() for p in stats.polls],
        history=history,
        evidence=evidence,
        unexpected_statuses=dict(stats.unexpected),
        server_log_tail=log_tail,
    )
    judge(case, result, stats.polls)
    if stats.errors:
        result.passed = False
        result.reasons.append(f"{len(stats.errors)} transport errors, first: {stats.errors[0]}")
    if stats.unexpected:
        result.passed = False
        worst = ", ".join(f"{k} x{n}" for k, n in stats.unexpected.most_common(3))
        result.reasons.append(f"the app answered unexpectedly: {worst}")
    return result


def judge(case: Case, result: CaseResult, polls: list[Poll]) -> None:
    """Fills in the verdict fields of ``result`` from the polls."""
    leak_key = case.leak.route if case.leak else None
    judged = [p for p in polls if p.status not in ("warming_up", "unknown")]
    result.first_verdict = judged[0].requests if judged else None
    flagged = [p for p in polls if p.suspected]
    result.first_flagged = flagged[0].requests if flagged else None
    correct = [p for p in flagged if leak_key is not None and leak_key in p.suspected_routes]
    if correct:
        result.detected = correct[0].requests
        result.routes_marked = correct[0].suspected_routes
        result.scales_with_at_detection = correct[0].scales_with
    elif flagged:
        result.routes_marked = flagged[-1].suspected_routes
    if flagged:
        result.scales_with = flagged[-1].scales_with
        after = [p for p in polls if p.requests > flagged[0].requests]
        cleared = [p for p in after if not p.suspected]
        result.cleared_at = cleared[0].requests if cleared else None

    if case.leak is None:
        if flagged:
            marked = ", ".join(f"{m} {r} {a}" for r, m, a in result.routes_marked) or "no route"
            result.reasons.append(
                f"false alarm at {result.first_flagged} requests "
                f"({flagged[0].signal}, {flagged[0].growth_bytes_per_request} B/request; {marked})"
            )
        if result.alerts_total:
            result.reasons.append(f"memwatch_leak_alerts_total = {result.alerts_total:g}")
        if result.first_verdict is None:
            result.reasons.append(
                f"never judged: the detector was still warming up after {result.requests} requests"
            )
        elif result.requests - result.first_verdict < MIN_JUDGED_REQUESTS:
            result.reasons.append(
                f"judged for {result.requests - result.first_verdict} requests only (from "
                f"{result.first_verdict}; at least {MIN_JUDGED_REQUESTS} needed)"
            )
        result.passed = not result.reasons
        return

    if not flagged:
        last = polls[-1] if polls else None
        result.reasons.append(
            f"not flagged within {result.requests} requests"
            + (f" (last status {last.status})" if last else "")
        )
    elif result.detected is None:
        marked = ", ".join(f"{m} {r} {a}" for r, m, a in result.routes_marked) or "none"
        result.reasons.append(
            f"flagged at {result.first_flagged} but the leaking route was never marked "
            f"(marked: {marked})"
        )
    expected = case.leak.scales_with
    if flagged and expected is not None and result.scales_with != expected:
        result.reasons.append(f"scales_with {result.scales_with!r}, expected {expected!r}")
    if result.cleared_at is not None:
        result.reasons.append(f"verdict cleared at {result.cleared_at} requests while leaking")
    if result.extra_routes:
        extra = ", ".join(f"{m} {r} {a}" for r, m, a in result.extra_routes)
        result.warnings.append(f"clean routes also marked: {extra}")
    if flagged:
        judge_diagnosis(case, result)
    result.passed = not result.reasons


def judge_diagnosis(case: Case, result: CaseResult) -> None:
    """The leaking line among the window's top sites, and the holder among its roots."""
    assert case.leak is not None
    sites = result.evidence.get("sites") or []
    roots = result.evidence.get("roots") or []
    if not (result.evidence.get("diagnosis") or {}).get("windows"):
        result.reasons.append("no diagnosis window finished")
        return
    if case.leak.site is not None:
        top = [(s["file"], s["line"]) for s in sites[:TOP_SITES]]
        if case.leak.site not in top:
            shown = ", ".join(f"{f}:{n}" for f, n in top) or "none"
            where = f"{case.leak.site[0]}:{case.leak.site[1]}"
            result.reasons.append(
                f"leaking line {where} not in the top {TOP_SITES} sites ({shown})"
            )
    if case.leak.holder is not None and case.leak.holder not in [r["path"] for r in roots]:
        shown = ", ".join(r["path"] for r in roots[:5]) or "none"
        result.reasons.append(f"holder {case.leak.holder} not named (roots: {shown})")
    # The advice (docs/advice.md) names the holder and the change, and offers worker recycling
    # as a stopgap only.
    expected = ADVICE.get(case.name)
    leak = result.evidence.get("leak") or {}
    advice = leak.get("advice") or ""
    if expected is not None:
        holder, change = expected
        if holder not in advice or change not in advice:
            result.reasons.append(f"advice does not name {holder} and {change}: {advice!r}")
        detail = leak.get("advice_detail") or {}
        if "max-requests" in advice or "max-requests" not in (detail.get("stopgap") or ""):
            result.reasons.append("worker recycling is not (only) the stopgap of the advice")
