"""The Prometheus rules in prometheus/rules: promtool accepts them (with its linter), their unit
tests in prometheus/tests pass, every alert carries what an on-call engineer needs, and every
runbook link lands on a section of docs/alerting.md.

promtool parses the YAML; the checks here that read the files themselves only look at the
lines of each alert (no YAML library is a dependency of the test suite).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.prometheus_tools import REPO_ROOT, RULE_FILES, RULE_TESTS_DIR, require

ALERTS = REPO_ROOT / "prometheus" / "rules" / "memwatch-alerts.yml"
ALERTING_DOCS = REPO_ROOT / "docs" / "alerting.md"
EXPECTED_ALERTS = [
    "MemwatchLeakSuspected",
    "MemwatchRouteLeakSuspected",
    "MemwatchRSSGrowingFast",
    "MemwatchInternalErrors",
]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT
    )


def test_promtool_check_rules_with_lint() -> None:
    promtool = require("promtool")
    assert RULE_FILES, "no rule files under prometheus/rules"
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_rule_unit_tests() -> None:
    promtool = require("promtool")
    tests = sorted(RULE_TESTS_DIR.glob("*.test.yml"))
    assert tests, "no promtool unit tests under prometheus/tests"
    result = run(promtool, "test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(tests)


def test_every_rule_file_has_unit_tests() -> None:
    tested = " ".join(p.read_text(encoding="utf-8") for p in RULE_TESTS_DIR.glob("*.test.yml"))
    for rules in RULE_FILES:
        assert f"../rules/{rules.name}" in tested, f"no promtool test loads {rules.name}"


def alert_blocks() -> dict[str, str]:
    """alert name -> the lines of its rule."""
    text = ALERTS.read_text(encoding="utf-8")
    parts = re.split(r"^      - alert: ", text, flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_every_alert_has_for_severity_summary_description_and_runbook() -> None:
    blocks = alert_blocks()
    assert list(blocks) == EXPECTED_ALERTS
    for name, block in blocks.items():
        assert re.search(r"^        for: \d+[smh]$", block, re.M), f"{name}: no for:"
        assert re.search(r"^          severity: (warning|critical)$", block, re.M), name
        for key in ("summary", "description", "runbook_url"):
            assert re.search(rf"^          {key}: \S", block, re.M), f"{name}: no {key}"


def test_every_alert_is_unit_tested_firing() -> None:
    tests = " ".join(p.read_text(encoding="utf-8") for p in RULE_TESTS_DIR.glob("*.test.yml"))
    for name in EXPECTED_ALERTS:
        # An expectation with labels means a test where the alert fires.
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests), name


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def test_runbook_links_land_on_a_section_of_the_alerting_docs() -> None:
    docs = ALERTING_DOCS.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", docs, re.M)}
    for name, block in alert_blocks().items():
        url = re.search(r'runbook_url: "([^"]+)"', block)
        assert url is not None, name
        page, _, fragment = url[1].partition("#")
        assert page.endswith("/docs/alerting.md"), url[1]
        assert fragment == name.lower() and fragment in anchors, (
            f"{name}: docs/alerting.md has no section #{fragment}"
        )


def test_the_alertmanager_example_is_valid_and_routes_by_severity(tmp_path: Path) -> None:
    amtool = require("amtool", "prometheus-alertmanager")
    docs = ALERTING_DOCS.read_text(encoding="utf-8")
    example = re.search(r"```yaml\n(# alertmanager\.yml\n.*?)```", docs, re.S)
    assert example is not None, "docs/alerting.md has no alertmanager.yml example"
    config = tmp_path / "alertmanager.yml"
    config.write_text(example[1], encoding="utf-8")
    checked = run(amtool, "check-config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for alert, receiver in (
        ("MemwatchRSSGrowingFast", "pager"),
        ("MemwatchLeakSuspected", "team-chat"),
        ("MemwatchRouteLeakSuspected", "team-chat"),
        ("MemwatchInternalErrors", "team-chat"),
    ):
        block = alert_blocks()[alert]
        severity = re.search(r"severity: (\w+)", block)
        assert severity is not None
        routed = run(
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={config}",
            f"--verify.receivers={receiver}",
            f"alertname={alert}",
            f"severity={severity[1]}",
        )
        assert routed.returncode == 0, (alert, routed.stdout + routed.stderr)
