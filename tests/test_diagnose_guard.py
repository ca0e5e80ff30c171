"""On-demand diagnosis windows keep to the duty cycle: memwatch.diagnose(), Memwatch.diagnose(),
POST /memwatch/diagnose and ``memwatch diagnose`` refuse a window while the pause after a
previous one is still running, unless forced; the first on-demand window always opens."""

from __future__ import annotations

import calendar
import json
import math
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_client import CollectorRegistry

from memwatch import WSGIMiddleware, cli
from memwatch.config import Config
from memwatch.core import Memwatch, open_window
from memwatch.diagnosis import Diagnosis
from memwatch.endpoints import EndpointRequest, EndpointResponse, _forced
from tests.apps import bare_wsgi
from tests.apps.support import make_environ, run_wsgi


def wrapped(**options: Any) -> WSGIMiddleware:
    options.setdefault("log_startup", False)
    options.setdefault("diagnosis", "off")  # on-demand windows only
    options.setdefault("diagnosis_requests", 8)
    instance = Memwatch(Config(**options), registry=CollectorRegistry())
    return WSGIMiddleware(bare_wsgi.app, memwatch=instance)


def finish_window(app: WSGIMiddleware, timeout: float = 90.0) -> None:
    """Requests until the running window has finished (bounded)."""
    deadline = time.monotonic() + timeout
    n = 0
    while app.monitor.diagnosis.window is not None and time.monotonic() < deadline:
        assert run_wsgi(app, make_environ(f"/items/{n}")).status == 200
        n += 1
        time.sleep(0.002)
    assert app.monitor.diagnosis.window is None, "the diagnosis window did not finish in time"


def post_diagnose(app: WSGIMiddleware, query: str = "") -> EndpointResponse:
    """POST /memwatch/diagnose as the endpoints see it (the query string included)."""
    request = EndpointRequest("POST", "/memwatch/diagnose", "127.0.0.1", None, None, query)
    return app.memwatch.endpoints.respond(request)


def header(response: EndpointResponse, name: str) -> str | None:
    values = [v for k, v in response.headers if k.lower() == name.lower()]
    return values[0] if values else None


@pytest.fixture
def not_tracing() -> Iterator[None]:
    assert not tracemalloc.is_tracing()
    yield
    if tracemalloc.is_tracing():  # a window that a failed assertion left open
        tracemalloc.stop()


# --- Diagnosis.on_demand_wait ------------------------------------------------------------------


def test_the_first_on_demand_window_never_waits_even_inside_a_pause() -> None:
    # GIVEN a diagnosis whose duty-cycle pause runs (after an abandoned window)
    diagnosis = Diagnosis(Config(log_startup=False, diagnosis_seconds=60.0))
    diagnosis.abandon()
    assert not diagnosis.can_start()  # automatic windows wait
    # THEN an on-demand window does not: it is the first
    assert diagnosis.on_demand_wait() == 0.0


@pytest.mark.parametrize(
    ("query", "forced"),
    [
        ("", False),
        ("force=1", True),
        ("force=true", True),
        ("FORCE=1", False),
        ("force=YES", True),
        ("a=b&force=on", True),
        ("force=0", False),
        ("force=", False),
        ("forced=1", False),
        ("x=force", False),
    ],
)
def test_force_in_the_query_string(query: str, forced: bool) -> None:
    assert _forced(query) is forced


# --- Memwatch.diagnose and open_window (real windows) -----------------------------------------


@pytest.mark.slow  # two real windows: snapshots and the holder search take seconds
@pytest.mark.usefixtures("not_tracing")
def test_a_second_on_demand_window_waits_for_the_pause_unless_forced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = wrapped()
    mw = app.memwatch
    # GIVEN a first on-demand window, finished
    assert mw.diagnose("first")
    finish_window(app)
    length = app.monitor.diagnosis.last.duration_seconds  # type: ignore[union-attr]
    # WHEN another is asked for at once
    with caplog.at_level("INFO", logger="memwatch"):
        opened, wait = open_window(app.monitor, "again")
    # THEN it is refused for the rest of the pause (window / duty cycle - window)
    assert not opened
    assert 0 < wait <= length / 0.05 - length + 1
    assert not mw.diagnose("again")
    assert 0 < mw.diagnosis_wait() <= wait
    assert not tracemalloc.is_tracing()
    assert app.monitor.diagnosis.windows == 1
    assert "refused" in caplog.text and "force=True" in caplog.text
    # AND force=True opens it anyway
    assert mw.diagnose("forced", force=True)
    assert app.monitor.diagnosis.window is not None
    finish_window(app)
    assert app.monitor.diagnosis.windows == 2


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_once_the_pause_is_over_an_on_demand_window_opens() -> None:
    # GIVEN a duty cycle of 100 %: no pause after a window
    app = wrapped(diagnosis_duty_cycle=1.0)
    assert app.memwatch.diagnose("first")
    finish_window(app)
    # THEN the next on-demand window opens without force
    assert app.memwatch.diagnosis_wait() == 0.0
    assert app.memwatch.diagnose("second")
    finish_window(app)


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_a_request_while_a_window_runs_is_answered_already_running() -> None:
    app = wrapped()
    first = post_diagnose(app)
    assert first.status == 202 and json.loads(first.body) == {"started": True, "active": True}
    second = post_diagnose(app)
    assert second.status == 202 and json.loads(second.body) == {"started": False, "active": True}
    finish_window(app)


# --- POST /memwatch/diagnose -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_the_endpoint_answers_429_with_retry_after_during_the_pause() -> None:
    app = wrapped()
    # GIVEN a first window opened over HTTP (through the real WSGI middleware), finished
    reply = run_wsgi(app, make_environ("/memwatch/diagnose", method="POST"))
    assert reply.status == 202 and json.loads(reply.body)["started"] is True
    finish_window(app)
    # WHEN a second POST comes during the pause
    reply = run_wsgi(app, make_environ("/memwatch/diagnose", method="POST"))
    # THEN 429, Retry-After in whole seconds, and a short JSON body saying when
    assert reply.status == 429
    headers = {k.lower(): v for k, v in reply.headers}
    retry_after = int(headers["retry-after"])
    body = json.loads(reply.body)
    assert body["started"] is False and body["active"] is False
    assert body["retry_after_seconds"] == retry_after >= 1
    assert math.isclose(
        calendar.timegm(time.strptime(body["not_before"], "%Y-%m-%dT%H:%M:%SZ")),
        time.time() + retry_after,
        abs_tol=5,
    )
    assert "force=1" in body["refused"]
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert int(headers["content-length"]) == len(reply.body)
    assert not tracemalloc.is_tracing() and app.monitor.diagnosis.window is None
    # AND ?force=1 opens the window anyway
    forced = post_diagnose(app, "force=1")
    assert forced.status == 202 and json.loads(forced.body)["started"] is True
    finish_window(app)
    # AND the refusal keeps the report's access rules: a remote client still gets 404
    remote = run_wsgi(
        app, make_environ("/memwatch/diagnose", method="POST", remote_addr="203.0.113.7")
    )
    assert remote.status == 404


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_force_through_the_wsgi_middleware() -> None:
    app = wrapped()
    assert app.memwatch.diagnose("first")
    finish_window(app)
    try:
        reply = run_wsgi(app, make_environ("/memwatch/diagnose", method="POST", query="force=1"))
        assert reply.status == 202
    finally:
        finish_window(app)


# --- memwatch diagnose URL ---------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served() -> Iterator[tuple[WSGIMiddleware, str]]:
    """The wrapped app behind a real HTTP server (wsgiref) on a free loopback port."""
    app = wrapped()
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        if app.monitor.diagnosis.window is not None:
            finish_window(app)


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_the_cli_says_clearly_when_the_service_refuses(
    served: tuple[WSGIMiddleware, str], capsys: pytest.CaptureFixture[str]
) -> None:
    app, url = served
    # GIVEN a service whose first on-demand window has run
    assert app.memwatch.diagnose("first")
    finish_window(app)
    # WHEN `memwatch diagnose URL` asks for another during the pause
    code = cli.main(["diagnose", url, "--timeout", "5"])
    # THEN it says why, for how long, and how to force it, and fails
    err = capsys.readouterr().err
    assert code == 1
    assert "refused a new diagnosis window" in err and "duty-cycle pause" in err
    assert "--force" in err
    assert app.monitor.diagnosis.window is None


@pytest.mark.slow
@pytest.mark.usefixtures("not_tracing")
def test_the_cli_force_flag_opens_a_window_during_the_pause(
    served: tuple[WSGIMiddleware, str], capsys: pytest.CaptureFixture[str]
) -> None:
    app, url = served
    assert app.memwatch.diagnose("first")
    finish_window(app)
    stop = threading.Event()

    def traffic() -> None:  # the window needs requests to finish
        n = 0
        while not stop.is_set():
            run_wsgi(app, make_environ(f"/items/{n}"))
            n += 1
            time.sleep(0.002)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        code = cli.main(["diagnose", url, "--force", "--timeout", "60"])
    finally:
        stop.set()
        worker.join(5)
    assert code == 0, capsys.readouterr().err
    assert app.monitor.diagnosis.windows == 2
