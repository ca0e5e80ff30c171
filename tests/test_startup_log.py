"""The start-up log line: one INFO line per wrapped app saying what is exposed where, and to whom.

An operator reading a service's log must learn from it which paths memwatch answers, whether
``/metrics`` is open, who may read the report and trigger a diagnosis, and whose
``X-Forwarded-For`` is believed, without ever seeing a token.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import memwatch
from tests.apps import bare_asgi, bare_wsgi
from tests.apps.support import make_environ, run_wsgi

METRICS_TOKEN = "startup-metrics-token-5d1e"
REPORT_TOKEN = "startup-report-token-77aa"


def startup_lines(caplog: pytest.LogCaptureFixture, app: Any = bare_wsgi.app, **options: Any) -> list[str]:
    caplog.set_level(logging.DEBUG, logger="memwatch")
    caplog.clear()
    memwatch.wrap(app, registry=CollectorRegistry(), **options)
    return [r.getMessage() for r in caplog.records if r.name == "memwatch"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(
            {},
            [
                "memwatch watching app (WSGI)",
                "metrics at /metrics open to any client",
                "report at /memwatch/ (HTML), /memwatch/report.json and POST /memwatch/diagnose",
                "for loopback clients only",
                "X-Forwarded-For believed from no proxy",
            ],
            id="defaults",
        ),
        pytest.param(
            {"metrics_token": METRICS_TOKEN, "token": REPORT_TOKEN},
            [
                "metrics at /metrics with its bearer token",
                "for loopback clients or its bearer token",
            ],
            id="tokens",
        ),
        pytest.param({"metrics_path": ""}, ["metrics off"], id="metrics disabled"),
        pytest.param(
            {"metrics_path": "/internal/prom", "report_path": "/_mw/"},
            [
                "metrics at /internal/prom open to any client",
                "report at /_mw/ (HTML), /_mw/report.json and POST /_mw/diagnose",
            ],
            id="custom paths",
        ),
        pytest.param(
            {"trusted_proxies": ("127.0.0.1", "10.0.0.0/8")},
            ["X-Forwarded-For believed from 127.0.0.1, 10.0.0.0/8"],
            id="trusted proxies",
        ),
    ],
)
def test_one_line_says_what_is_exposed_where(
    caplog: pytest.LogCaptureFixture, options: dict[str, Any], expected: list[str]
) -> None:
    # WHEN an app is wrapped
    lines = startup_lines(caplog, **options)
    # THEN exactly one line is logged, at INFO, before any request, naming every exposure
    assert len(lines) == 1, lines
    assert caplog.records[-1].levelno == logging.INFO
    for part in expected:
        assert part in lines[0], (part, lines[0])
    # AND no token ever appears in it
    assert METRICS_TOKEN not in caplog.text and REPORT_TOKEN not in caplog.text


def test_asgi_apps_log_their_protocol(caplog: pytest.LogCaptureFixture) -> None:
    (line,) = startup_lines(caplog, bare_asgi.app)
    assert line.startswith("memwatch watching app (ASGI): metrics at /metrics")


def test_the_line_can_be_turned_off_and_requests_log_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert startup_lines(caplog, log_startup=False) == []
    caplog.clear()
    app = memwatch.wrap(bare_wsgi.app, registry=CollectorRegistry())
    caplog.clear()
    for i in range(50):
        run_wsgi(app, make_environ(f"/users/{i}"))
    run_wsgi(app, make_environ("/metrics"))
    assert [r for r in caplog.records if r.name == "memwatch"] == []


def test_disabled_memwatch_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    assert startup_lines(caplog, enabled=False) == []
