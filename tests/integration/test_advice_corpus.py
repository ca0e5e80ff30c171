"""Acceptance of the remediation advice (docs/advice.md) on the detection corpus.

For every leaking app of :mod:`tests.corpus`, under its real server and with its seeded traffic:

- the report's ``leak.advice`` (once the leak is suspected and a diagnosis window has run) names
  the app's holder and the change that fixes it: judged in the same run as the detection, by
  :func:`tests.corpus.harness.judge_diagnosis` (``tests/integration/test_detection_corpus.py``);
- its fixed twin (``tests/corpus/fixed/<case>.py``: the same app with that change applied, as a
  user would apply it) runs the same traffic for 20,000 requests and is never flagged, and
  memwatch judged it (status ``ok``) for at least the last 5,000 of them.

Marked ``integration`` and ``corpus`` like the detection acceptance (long runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.corpus.catalog import LEAKING, Case, fixed_twin
from tests.corpus.harness import ADVICE, MIN_JUDGED_REQUESTS, run_case

pytestmark = [pytest.mark.integration, pytest.mark.corpus]

def test_every_leaking_case_has_a_fixed_twin_and_an_expectation() -> None:
    names = {case.name for case in LEAKING}
    assert names == set(ADVICE)
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
