"""Acceptance of the remediation advice (docs/advice.md) on the detection corpus.

For every leaking app of :mod:`tests.corpus`, under its real server and with its seeded traffic:

- the report's ``leak.advice`` (once the leak is suspected and a diagnosis window has run) names
  the app's holder and the change that fixes it;
- its fixed twin (``tests/corpus/fixed/<case>.py``: the same app with that change applied, as a
  user would apply it) runs the same traffic for 20,000 requests and is never flagged, and
  memwatch judged it (status ``ok``) for at least the last 5,000 of them.

Marked ``integration`` and ``corpus`` like the detection acceptance (long runs; ``make corpus``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.corpus.catalog import LEAKING, Case, fixed_twin
from tests.corpus.harness import MIN_JUDGED_REQUESTS, run_case
from tests.corpus.servers import serve
from tests.corpus.traffic import Poll, Traffic, fetch_report, run_load

pytestmark = [pytest.mark.integration, pytest.mark.corpus]

# case -> (what the advice must name as the holder, the change it must name)
EXPECTED: dict[str, tuple[str, str]] = {
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


def test_every_leaking_case_has_a_fixed_twin_and_an_expectation() -> None:
    names = {case.name for case in LEAKING}
    assert names == set(EXPECTED)
    for name in names:
        twin = Path(__file__).resolve().parents[1] / "corpus" / "fixed" / f"{name}.py"
        source = twin.read_text()
        assert f"tests.corpus.{name} import" not in source and f"from tests.corpus.{name}" not in (
            source
        ), "a twin is a copy with the fix applied, not an import of the leaking app"


def _advised(report: dict[str, Any]) -> bool:
    leak = report.get("leak") or {}
    detail = leak.get("advice_detail") or {}
    return bool(leak.get("suspected") and detail.get("holder"))


@pytest.mark.parametrize("case", LEAKING, ids=lambda c: c.name)
def test_leaking_app_gets_advice_naming_its_holder_and_the_change(
    case: Case, tmp_path: Path
) -> None:
    # GIVEN a leaking app under its real server, WHEN its traffic runs until the report carries
    # advice about a holder (the leak suspected and a diagnosis window done) or 20,000 requests
    last: dict[str, Any] = {}

    with serve(case, log_dir=tmp_path) as server:

        def stop(poll: Poll) -> bool:
            if not poll.suspected:
                return False
            last.update(fetch_report(server.port))
            return _advised(last)

        stats = run_load(
            server.port,
            Traffic(case, seed=1),
            clients=case.clients,
            max_requests=case.max_requests,
            stop=stop,
            progress=None,
            label=case.name,
        )
        last.update(fetch_report(server.port))
        log = server.log_tail(60)
    leak = last.get("leak") or {}
    context = json.dumps(
        {"requests": stats.requests, "leak": leak, "roots": last.get("roots")}, indent=1
    )
    # THEN the leak is suspected and the top advice names the holder and the change
    assert leak.get("suspected"), f"not flagged in {stats.requests} requests\n{context}"
    holder, change = EXPECTED[case.name]
    advice = leak.get("advice") or ""
    assert holder in advice and change in advice, context
    detail = leak["advice_detail"]
    assert holder in (detail["holder"] or "") and detail["evidence"], context
    # AND containment is offered as a stopgap, never as the fix
    assert "max-requests" not in advice and "max-requests" in detail["stopgap"], context
    # AND the one-time leak warning in the server's log carried advice
    assert "memory leak suspected" in log and "advice:" in log, log


@pytest.mark.parametrize("case", LEAKING, ids=lambda c: c.name)
def test_fixed_twin_runs_the_same_traffic_without_a_leak(case: Case, tmp_path: Path) -> None:
    # GIVEN the leaking app with the advised change applied, under the same server and traffic
    twin = fixed_twin(case)
    result = run_case(twin, max_requests=max(case.max_requests, 20_000), log_dir=tmp_path)
    summary = f"{result.summary()}\npolls: {result.polls[-3:]}\n{result.server_log_tail}"
    # THEN memwatch judged it for a good part of the run and never suspected a leak
    assert result.requests >= 20_000, summary
    assert not result.unexpected_statuses, summary
    assert result.first_verdict is not None, summary
    assert result.requests - result.first_verdict >= MIN_JUDGED_REQUESTS, summary
    assert result.first_flagged is None, summary
    assert result.alerts_total == 0, summary
