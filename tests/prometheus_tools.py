"""What the dashboard and rules tests share: finding Prometheus's binaries, reading the panel and
variable queries out of the generated dashboard, and substituting Grafana's variables in them
the way Grafana does before it sends a query to Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "memwatch.json"
RULES_DIR = REPO_ROOT / "prometheus" / "rules"
RULE_TESTS_DIR = REPO_ROOT / "prometheus" / "tests"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))

# Grafana's built-in interval variables, with the values a Grafana in front of a Prometheus that
# scrapes every second would use over a short time range.
BUILTINS = {"$__rate_interval": "1m", "$__range": "15m", "$__interval": "15s"}

# The dashboard's query variables ("All" is the regex .*, see grafana/generate.py).
VARIABLES = ("job", "instance", "route", "auth")
ALL: dict[str, str] = dict.fromkeys(VARIABLES, ".*")


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require(binary: str, package: str = "prometheus") -> str:
    """The path of a Debian tool the test needs. Missing: skip, or fail on CI (``CI=true``),
    where ``make system-deps`` should have installed it."""
    path = shutil.which(binary)
    if path is not None:
        return path
    message = (
        f"{binary} is not installed (Debian package '{package}'; `make system-deps` as root "
        "installs it)"
    )
    if on_ci():
        pytest.fail(message + ": on CI this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    title: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        return f"panel {self.panel_id} {self.ref_id}: {self.title}"


# The dashboard JSON, as parsed: nested dicts and lists.
Json = dict[str, Any]


def load_dashboard() -> Json:
    data: Json = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: Json | None = None) -> list[Json]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    found: list[Json] = []
    for panel in dashboard.get("panels", []):
        found.extend(panel.get("panels", []))
        if panel.get("type") != "row":
            found.append(panel)
    return found


def panel_queries(dashboard: Json | None = None) -> list[PanelQuery]:
    return [
        PanelQuery(int(panel["id"]), str(panel["title"]), str(target["refId"]), target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: Json | None = None) -> dict[str, str]:
    """name -> query of every query variable (``label_values(selector, label)``)."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    return {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")

# Grafana's prometheusSpecialRegexEscape: what it does to each value of a multi-value variable
# before putting it into a =~ matcher (the backslash doubled once more for the PromQL string).
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


def grafana_regex_escape(value: str) -> str:
    value = value.replace("\\", "\\\\\\\\")
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value)


def substitute(expr: str, values: Mapping[str, str], *, escape: bool = False) -> str:
    """``expr`` with Grafana's built-in and the dashboard's variables replaced.

    :param values: variable name -> value (``.*`` for "All").
    :param escape: escape the values as Grafana does for a selected multi-value option.
    """
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name in VARIABLES:
        value = grafana_regex_escape(values[name]) if escape else values[name]
        expr = re.sub(r"\$(?:\{" + name + r"\}|" + name + r"\b)", _literally(value), expr)
    assert not re.search(r"\$[{\w]", expr), f"unsubstituted variable in {expr!r}"
    return expr


def _literally(value: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: value
