"""The dashboard and the rules on real data: a real Prometheus scrapes a real leaking service.

GIVEN a 2-worker gunicorn (gthread) service wrapped by memwatch in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` in a tmp dir, memwatch's ``child_exit`` hook in a gunicorn config
file written to tmp), leaking about 500 bytes per request on one route (tests/apps/
leaky_multiworker.py), and Debian's ``prometheus`` scraping it every second with
prometheus/rules/*.yml loaded and evaluated every second,
WHEN load is driven until memwatch suspects the leak,
THEN the leak alert becomes pending or firing, every recording rule evaluates without error
and has data, the variables' label queries list the service, and every dashboard panel query
(extracted from the generated JSON; the variables on "All" and on concrete, regex-escaped
values) evaluates without error and returns data.

memwatch runs with its default settings (the ``MEMWATCH_*`` variables are removed from the
server's environment): with two workers the default 2,000-request warm-up and detector window
are passed in well under a minute of this load, so there is no reason to tune them here.
gthread workers rather than sync: a diagnosis window finishing in a sync worker blocks that
worker (scrapes included) for many seconds on a busy machine; the test proves the rules and
the dashboard, not how a sync worker copes with that.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.conftest import Server, Servers
from tests.prometheus_tools import (
    ALL,
    LABEL_VALUES,
    RULE_FILES,
    PanelQuery,
    panel_queries,
    require,
    substitute,
    variable_queries,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB = "memwatch-leaky"
LEAK_ROUTE, LEAK_AUTH = "/orders/{id}", "bearer"
CLIENT_THREADS = 8
# Bounds on the whole run (the module's servers are always stopped at the end).
ALERT_DEADLINE = 150.0  # seconds of load until the leak alert must be pending or firing
QUERY_DEADLINE = 30.0  # seconds for all the queries to return data once the alert is there

GUNICORN_CONF = """\
# Written by tests/integration/test_prometheus.py.
from memwatch.gunicorn import child_exit  # noqa: F401  (gunicorn looks the hook up by name)

workers = 2
worker_class = "gthread"
threads = 4
graceful_timeout = 5
# No control socket: its default path is shared by every gunicorn of the user.
control_socket_disable = True
"""

PROMETHEUS_CONF = """\
# Written by tests/integration/test_prometheus.py.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: {rule_files}
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


class Load:
    """Client threads sending the leaky service's traffic mix until stopped: 60 % leaking
    Bearer requests (a new token each), 20 % Basic, 10 % rejected, 10 % anonymous."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(CLIENT_THREADS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _request(self, i: int) -> None:
        kind = i % 10
        if kind < 6:
            path, headers = f"/orders/{i}", {"Authorization": f"Bearer tok-{i:08d}"}
        elif kind < 8:
            user = base64.b64encode(f"user{i % 20}:secret".encode()).decode()
            path, headers = f"/items/{i}", {"Authorization": "Basic " + user}
        elif kind < 9:
            path, headers = "/private", {}
        else:
            path, headers = "/health", {}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers=headers)
            connection.getresponse().read()
        finally:
            connection.close()

    def _run(self, n: int) -> None:
        i = n
        while not self._stop.is_set():
            try:
                self._request(i)
                with self._lock:
                    self.sent += 1
            except OSError:
                with self._lock:
                    self.failures += 1
                time.sleep(0.05)
            i += CLIENT_THREADS


@dataclass
class Stack:
    service: Server
    prometheus: Server
    load: Load
    alert: dict[str, Any] = field(default_factory=dict)
    seconds_to_alert: float = 0.0

    def api(self, path: str, **params: str) -> Any:
        """GET a Prometheus HTTP API path; returns ``data`` (fails on an API error)."""
        query = urllib.parse.urlencode(params)
        status, body = self.prometheus.request("GET", f"{path}?{query}" if query else path)
        payload = json.loads(body)
        assert status == 200 and payload.get("status") == "success", (path, params, payload)
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def logs(self) -> str:
        return (
            f"--- gunicorn (sent {self.load.sent}, failed {self.load.failures}) ---\n"
            + self.service.logs()[-3000:]
            + "\n--- prometheus ---\n"
            + self.prometheus.logs()[-3000:]
        )


def leak_alert(stack: Stack) -> dict[str, Any] | None:
    for alert in stack.api("/api/v1/alerts")["alerts"]:
        if alert["labels"].get("alertname") == "MemwatchLeakSuspected":
            return dict(alert)
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = require("prometheus")
    promtool = require("promtool")
    tmp = tmp_path_factory.mktemp("prometheus-stack")
    multiproc = tmp / "multiproc"
    multiproc.mkdir()
    gunicorn_conf = tmp / "gunicorn.conf.py"
    gunicorn_conf.write_text(GUNICORN_CONF, encoding="utf-8")

    servers = Servers(tmp)
    load: Load | None = None
    try:
        # GIVEN the leaky service under gunicorn, and Prometheus scraping it with the rules
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))  # Server copies os.environ
            service = servers.start(
                "gunicorn-leaky",
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--config",
                    str(gunicorn_conf),
                    "--bind",
                    "127.0.0.1:{port}",
                    "tests.apps.leaky_multiworker:wrapped()",
                ],
            )

        config = tmp / "prometheus.yml"
        config.write_text(
            PROMETHEUS_CONF.format(
                rule_files=json.dumps([str(p) for p in RULE_FILES]), job=JOB, port=service.port
            ),
            encoding="utf-8",
        )
        checked = subprocess.run(
            [promtool, "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        prometheus = servers.start(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                "--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
        )
        prometheus.wait_ready("/-/ready")

        # WHEN load runs until the leak alert is pending or firing (bounded)
        load = Load(service.port)
        stack = Stack(service, prometheus, load)
        started = time.monotonic()
        load.start()
        while time.monotonic() - started < ALERT_DEADLINE:
            for server in (service, prometheus):
                if server.process.poll() is not None:
                    pytest.fail(f"{server.name} exited early:\n{stack.logs()}")
            alert = leak_alert(stack)
            if alert is not None and alert["state"] in ("pending", "firing"):
                stack.alert = alert
                stack.seconds_to_alert = time.monotonic() - started
                break
            time.sleep(1.0)
        else:
            pytest.fail(
                f"MemwatchLeakSuspected not pending or firing after {ALERT_DEADLINE:.0f} s of "
                f"load; memwatch_leak_suspected: {stack.query('memwatch_leak_suspected')}\n"
                + stack.logs()
            )
        yield stack
    finally:
        if load is not None:
            load.stop()
        servers.stop_all()


def eventually_has_data(stack: Stack, expr: str, deadline: float) -> list[dict[str, Any]]:
    """The query's result once it is non-empty. Every evaluation must succeed (no API error);
    it may be empty for a moment, while a scrape is missed under load (staleness)."""
    while True:
        result = stack.query(expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_the_leak_alert_is_pending_or_firing(stack: Stack) -> None:
    # THEN (the fixture waited for it, bounded)
    alert = stack.alert
    assert alert["state"] in ("pending", "firing"), f"after {stack.seconds_to_alert:.0f} s"
    assert alert["labels"]["job"] == JOB
    assert alert["labels"]["instance"] == f"127.0.0.1:{stack.service.port}"
    assert alert["labels"]["severity"] == "warning"
    assert "pid" not in alert["labels"], "the alert is per instance, not per worker"
    assert float(alert["value"]) >= 1  # workers suspected
    assert alert["annotations"]["runbook_url"].endswith("docs/alerting.md#memwatchleaksuspected")
    assert f"127.0.0.1:{stack.service.port}" in alert["annotations"]["summary"]


def test_the_route_leak_alert_names_the_leaking_route(stack: Stack) -> None:
    deadline = time.monotonic() + QUERY_DEADLINE
    while True:
        alerts = [
            a
            for a in stack.api("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "MemwatchRouteLeakSuspected"
            and a["state"] in ("pending", "firing")
        ]
        if alerts or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert alerts, f"MemwatchRouteLeakSuspected never pending\n{stack.logs()}"
    assert {(a["labels"]["route"], a["labels"]["auth"]) for a in alerts} == {
        (LEAK_ROUTE, LEAK_AUTH)
    }
    # Its value is the route's retained bytes per request (the leak keeps about 500).
    assert all(float(a["value"]) > 16 for a in alerts), alerts


def test_the_rss_alert_measures_each_worker(stack: Stack) -> None:
    # The threshold depends on this machine's speed; the expression must see every worker.
    growth = eventually_has_data(
        stack,
        f'deriv(memwatch_process_resident_memory_bytes{{job="{JOB}"}}[15m]) * 60',
        time.monotonic() + QUERY_DEADLINE,
    )
    assert len({r["metric"].get("pid") for r in growth}) == 2, growth


def test_rules_loaded_and_evaluated_without_error(stack: Stack) -> None:
    groups = stack.api("/api/v1/rules")["groups"]
    assert sorted(g["file"] for g in groups) == sorted(str(p) for p in RULE_FILES)
    deadline = time.monotonic() + QUERY_DEADLINE
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
            assert not rule.get("lastError"), rule
            if rule["type"] == "alerting":
                assert rule["duration"] > 0, f"{rule['name']} has no for:"
                assert rule["labels"].get("severity") in ("warning", "critical"), rule["name"]
                for key in ("summary", "description", "runbook_url"):
                    assert rule["annotations"].get(key), f"{rule['name']} has no {key}"
            else:
                result = eventually_has_data(stack, rule["name"], deadline)
                assert result, f"recording rule {rule['name']} has no data\n{stack.logs()}"


def test_fleet_view_counts_the_leaking_instance(stack: Stack) -> None:
    deadline = time.monotonic() + QUERY_DEADLINE
    leaking = eventually_has_data(
        stack, f'job:memwatch_leaking_instances:sum{{job="{JOB}"}} >= 1', deadline
    )
    assert leaking, stack.logs()
    rates = eventually_has_data(
        stack,
        f'job_route_auth:memwatch_requests:rate5m{{job="{JOB}", route="{LEAK_ROUTE}", '
        f'auth="{LEAK_AUTH}"}} > 0',
        deadline,
    )
    assert rates, stack.logs()


def test_variable_queries_list_the_service(stack: Stack) -> None:
    concrete = {"job": JOB, "instance": f"127.0.0.1:{stack.service.port}"}
    expected = {**concrete, "route": LEAK_ROUTE, "auth": LEAK_AUTH}
    for name, query in variable_queries().items():
        match = LABEL_VALUES.match(query)
        assert match is not None, query
        # What Grafana sends for label_values(selector, label): the series' label values.
        selector = match["selector"].replace("$job", JOB).replace("$instance", concrete["instance"])
        values = stack.api(f"/api/v1/label/{match['label']}/values", **{"match[]": selector})
        assert expected[name] in values, (name, selector, values)


QUERIES = panel_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_every_dashboard_query_returns_data(stack: Stack, query: PanelQuery) -> None:
    concrete = {
        "job": JOB,
        "instance": f"127.0.0.1:{stack.service.port}",
        "route": LEAK_ROUTE,
        "auth": LEAK_AUTH,
    }
    deadline = time.monotonic() + QUERY_DEADLINE
    for label, expr in (
        ("All", substitute(query.expr, ALL)),
        ("concrete values", substitute(query.expr, concrete, escape=True)),
    ):
        result = eventually_has_data(stack, expr, deadline)
        assert result, f"{query.name} ({label}) returned no data: {expr}\n{stack.logs()}"


def test_memwatch_exposition_passes_promtool_lint_and_has_no_internal_errors(
    stack: Stack,
) -> None:
    promtool = require("promtool")
    status, body = stack.service.request("GET", "/metrics")
    assert status == 200
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    # Both workers publish their gauges (a pid label each); counters are summed.
    text = body.decode()
    pids = {
        line.split('pid="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("memwatch_leak_suspected{")
    }
    assert len(pids) == 2, text
    errors = stack.query(f'memwatch_internal_errors_total{{job="{JOB}"}}')
    assert errors and all(float(r["value"][1]) == 0 for r in errors), errors
