"""The Grafana dashboard: the committed JSON is what grafana/generate.py builds, the layout and
variables are sound, every panel query applies the pickers and parses in Prometheus's own
parser (promtool), the provisioning files point at it, and docs/grafana.md covers every panel.

That every query also *returns data* from a real multi-worker service is proven in
tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.prometheus_tools import (
    ALL,
    DASHBOARD,
    LABEL_VALUES,
    REPO_ROOT,
    PanelQuery,
    load_dashboard,
    on_ci,
    panel_queries,
    panels,
    require,
    substitute,
    variable_queries,
)

GENERATOR = REPO_ROOT / "grafana" / "generate.py"
PROVISIONING = REPO_ROOT / "grafana" / "provisioning"
DOCS = REPO_ROOT / "docs" / "grafana.md"

# Metric -> the variables its selectors must carry (beyond job and instance).
ROUTE_METRICS = {
    "memwatch_requests_total",
    "memwatch_route_retained_bytes_per_request",
    "memwatch_route_leak_suspected",
}
AUTH_METRICS = {"memwatch_distinct_credentials"}
SELECTOR = re.compile(r"\b(memwatch_[a-z_]+)(\{[^}]*\})?")


def load_generator() -> ModuleType:
    """grafana/generate.py as a module. It needs grafana-foundation-sdk (the ``test`` extra):
    missing, the test skips, or fails on CI, where `make venv` installs it."""
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        message = "grafana-foundation-sdk is not installed (pip install -e '.[test]')"
        if on_ci():
            pytest.fail(message + ": on CI this is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    spec = importlib.util.spec_from_file_location("memwatch_grafana_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_is_what_the_generator_builds() -> None:
    rendered = load_generator().render()
    committed = DASHBOARD.read_text(encoding="utf-8")
    assert rendered == committed, (
        "grafana/dashboards/memwatch.json is stale: run `.venv/bin/python grafana/generate.py` "
        "and commit the result (never edit the JSON by hand)"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    generator = load_generator()
    stale = tmp_path / "memwatch.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert generator.main(["--check", "--output", str(stale)]) == 1
    assert generator.main(["--output", str(stale)]) == 0
    assert generator.main(["--check", "--output", str(stale)]) == 0


def test_layout_ids_unique_and_grid_without_overlap() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "memwatch"
    every = list(dashboard["panels"])
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in every:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0 and pos["w"] > 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_reads_the_datasource_variable_and_says_what_it_shows() -> None:
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert len(str(panel.get("description", ""))) > 40, f"{panel['title']}: no description"
        targets = panel["targets"]
        assert targets, f"{panel['title']}: no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_the_panels_the_issue_asks_for() -> None:
    exprs = " ".join(q.expr for q in panel_queries())
    for metric in (
        "memwatch_leak_suspected",  # leak verdict per instance and worker
        "memwatch_process_resident_memory_bytes",  # RSS per worker
        "memwatch_python_heap_blocks",  # Python heap per worker
        "memwatch_growth_bytes_per_second",  # growth rates per signal
        "memwatch_growth_bytes_per_request",
        "memwatch_route_retained_bytes_per_request",  # retained bytes by route and auth
        "memwatch_route_leak_suspected",
        "memwatch_requests_total",  # requests by route, auth and outcome
        "memwatch_distinct_credentials",
        "memwatch_tracemalloc_active",  # diagnosis windows
        "memwatch_traced_memory_bytes",
        "memwatch_internal_errors_total",
        "memwatch_leak_alerts_total",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    assert "topk(" in exprs
    assert "by (route, method, auth, outcome)" in exprs
    worker_panels = [
        q for q in panel_queries() if "memwatch_leak_suspected" in q.expr and "pid" in q.expr
    ]
    assert worker_panels, "no leak verdict per worker (pid)"


def test_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "route", "auth"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "route", "auth"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        match = LABEL_VALUES.match(variable["query"])
        assert match is not None and match["label"] == name, variable["query"]
    # Each picker narrows the next: instances of the chosen jobs, routes of those instances.
    queries = variable_queries()
    assert "$job" in queries["instance"]
    assert "$instance" in queries["route"] and "$instance" in queries["auth"]


@pytest.mark.parametrize("query", panel_queries(), ids=lambda q: q.name)
def test_every_query_applies_the_pickers(query: PanelQuery) -> None:
    expr = query.expr
    selectors = SELECTOR.findall(expr)
    assert selectors, expr
    for metric, matchers in selectors:
        assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (metric, expr)
        if metric in ROUTE_METRICS:
            assert 'route=~"$route"' in matchers and 'auth=~"$auth"' in matchers, (metric, expr)
        if metric in AUTH_METRICS:
            assert 'auth=~"$auth"' in matchers, (metric, expr)


CONCRETE = {
    "job": "memwatch",
    "instance": "10.0.0.1:8000",
    "route": "/reports/<int:rid>|/orders/{order_id:int}",  # every regex metacharacter in sight
    "auth": "bearer",
}


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """Prometheus's own parser (promtool check rules) accepts every panel query, with the
    variables on "All" and on values that need Grafana's regex escaping."""
    promtool = require("promtool")
    lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
    for query in panel_queries():
        for label, expr in (
            ("all", substitute(query.expr, ALL)),
            ("concrete", substitute(query.expr, CONCRETE, escape=True)),
        ):
            lines.append(f"      - record: dashboard:panel_{query.panel_id}_{query.ref_id}:{label}")
            # A YAML single-quoted scalar: only the quote itself needs doubling.
            lines.append("        expr: '" + expr.replace("'", "''") + "'")
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {2 * len(panel_queries())} rules found" in result.stdout


def test_provisioning_files_point_at_the_dashboard() -> None:
    datasource = (PROVISIONING / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    assert re.search(r"^apiVersion: 1$", datasource, re.M)
    assert re.search(r"^\s+type: prometheus$", datasource, re.M)
    assert re.search(r"^\s+url: \S+", datasource, re.M)
    provider = (PROVISIONING / "dashboards" / "memwatch.yaml").read_text(encoding="utf-8")
    assert re.search(r"^apiVersion: 1$", provider, re.M)
    assert re.search(r"^\s+type: file$", provider, re.M)
    path = re.search(r"^\s+path: (\S+)$", provider, re.M)
    assert path is not None
    # The provider reads <mount>/dashboards, where <mount> is the repository's grafana/
    # directory as docs/grafana.md mounts it; the dashboard JSON lives there.
    mount, sub = path[1].rsplit("/", 1)
    assert sub == DASHBOARD.parent.name == "dashboards"
    docs = DOCS.read_text(encoding="utf-8")
    assert f"grafana:{mount}" in docs, f"docs/grafana.md does not mount grafana/ at {mount}"
    assert f"GF_PATHS_PROVISIONING={mount}/provisioning" in docs


def test_docs_describe_every_panel_and_the_choice_of_sdk() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} (.+)$", docs, re.M))
    missing = [p["title"] for p in panels() if p["title"] not in headings]
    assert not missing, f"docs/grafana.md has no section for: {missing}"
    assert "grafana-foundation-sdk" in docs
