"""memwatch on a real Flask app: route templates (blueprints, both ways of wrapping), every
auth scheme and outcome, exceptions, streaming and close(), credentials, malformed headers."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

import memwatch
from memwatch import WSGIMiddleware
from memwatch.recorder import compiled_available
from tests.apps import flask_app
from tests.apps.support import (
    AUTH_CASES,
    MALFORMED_HEADERS,
    STATUS_OUTCOMES,
    assert_no_canary,
    canary_requests,
    count_by,
    counts,
    expected_matrix,
    metric_samples,
    requests_total,
    wsgi_request,
)

# A wrapped Flask app as (what the server calls, the memwatch middleware).
Served = tuple[Any, WSGIMiddleware]


def wrap_whole_app(app: Flask) -> Served:
    mw = memwatch.wrap(app, registry=CollectorRegistry(), log_startup=False)
    assert isinstance(mw, WSGIMiddleware)
    return mw, mw


def wrap_wsgi_app(app: Flask) -> Served:
    mw = memwatch.wrap(app.wsgi_app, registry=CollectorRegistry(), log_startup=False)
    assert isinstance(mw, WSGIMiddleware)
    app.wsgi_app = mw  # type: ignore[method-assign]
    return app, mw


WRAPPINGS = [
    pytest.param(wrap_whole_app, id="memwatch.wrap(app)"),
    pytest.param(wrap_wsgi_app, id="app.wsgi_app = memwatch.wrap(app.wsgi_app)"),
]


@pytest.fixture(params=WRAPPINGS)
def served(request: pytest.FixtureRequest) -> Served:
    wrapping: Callable[[Flask], Served] = request.param
    return wrapping(flask_app.create_app())


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        pytest.param("/", "/", 200, id="index"),
        pytest.param("/reports/5", "/reports/<int:rid>", 200, id="int converter"),
        pytest.param("/api/v2/items/widget", "/api/v2/items/<name>", 200, id="blueprint url_prefix"),
        pytest.param(
            "/api/v2/items/3/parts/a/b/c",
            "/api/v2/items/<int:iid>/parts/<path:rest>",
            200,
            id="blueprint, path converter",
        ),
        pytest.param("/reset/Zm9vYmFy9000", "/reset/<token>", 200, id="secret in a path parameter"),
        pytest.param("/status/404", "/status/<int:code>", 404, id="matched route answering 404"),
        pytest.param("/reports/abc", "__unmatched__", 404, id="converter refuses"),
        pytest.param("/no/such/page/42", "__unmatched__", 404, id="no route"),
    ],
)
def test_route_templates(served: Served, path: str, route: str, status: int) -> None:
    target, mw = served
    assert wsgi_request(target, path).status == status
    outcome = "ok" if status == 200 else "client_error"
    assert counts(mw) == {(route, "GET", "anonymous", outcome): 1}


def test_method_not_allowed_is_not_a_route_template(served: Served) -> None:
    # Werkzeug raises MethodNotAllowed before a rule is bound: no template, a normalised path.
    target, mw = served
    assert wsgi_request(target, "/reports/5", method="DELETE").status == 405
    assert counts(mw) == {("/reports/{id}", "DELETE", "anonymous", "client_error"): 1}


def test_hook_installed_once_and_first() -> None:
    app = flask_app.create_app()

    @app.before_request
    def deny_everything() -> tuple[str, int]:
        return "denied", 401

    @app.url_value_preprocessor
    def app_own_preprocessor(endpoint: str | None, values: dict[str, object] | None) -> None:
        pass

    original_request_class = app.request_class
    memwatch.wrap(app, registry=CollectorRegistry(), log_startup=False)
    mw = memwatch.wrap(app.wsgi_app, registry=CollectorRegistry(), log_startup=False)
    assert app.before_request_funcs[None] == [deny_everything]
    if compiled_available() and memwatch.Config.from_env().speedups:
        # Compiled: the app's request class is subclassed once (its url_rule copies the
        # template), however often the app is wrapped; no per-request hook at all.
        assert app.request_class.__mro__[1] is original_request_class
        assert app.request_class.__name__ == original_request_class.__name__
        assert app.url_value_preprocessors[None] == [app_own_preprocessor]
    else:
        # Python: a URL-value preprocessor (called for every request, right before the
        # before_request functions), once and first.
        chain = app.url_value_preprocessors[None]
        assert len(chain) == 2
        assert chain[1] is app_own_preprocessor
    app.wsgi_app = mw  # type: ignore[method-assign]
    # An app-level before_request that rejects: the template is known all the same.
    assert wsgi_request(app, "/reports/1").status == 401
    assert counts(mw) == {("/reports/<int:rid>", "GET", "anonymous", "rejected"): 1}


@pytest.mark.parametrize(("headers", "query", "auth"), AUTH_CASES)
def test_every_auth_scheme_and_outcome(
    served: Served, headers: dict[str, str], query: str, auth: str
) -> None:
    target, mw = served
    for code in STATUS_OUTCOMES:
        reply = wsgi_request(target, f"/status/{code}", headers=headers, query=query)
        assert reply.status == code
    with pytest.raises(flask_app.AppError):
        wsgi_request(target, "/boom", headers=headers, query=query)
    assert counts(mw) == expected_matrix("/status/<int:code>", "/boom", auth)


@pytest.mark.parametrize(
    ("deny", "status"), [pytest.param("401", 401, id="abort(401)"), pytest.param("403", 403, id="abort(403)")]
)
def test_rejections_by_abort(served: Served, deny: str, status: int) -> None:
    target, mw = served
    reply = wsgi_request(target, "/secure", headers={"X-Deny": deny, "Authorization": "Bearer x1"})
    assert reply.status == status
    assert counts(mw) == {("/secure", "GET", "bearer", "rejected"): 1}


def test_exception_propagates_with_the_view_frame(served: Served) -> None:
    target, mw = served
    with pytest.raises(flask_app.AppError, match="Flask view") as excinfo:
        wsgi_request(target, "/boom")
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    assert (frames[-1].name, frames[-1].filename) == ("boom", flask_app.__file__)
    assert counts(mw) == {("/boom", "GET", "anonymous", "server_error"): 1}


def test_exception_handled_by_flask_is_a_server_error(caplog: pytest.LogCaptureFixture) -> None:
    target, mw = wrap_whole_app(flask_app.create_app(propagate=False))
    assert wsgi_request(target, "/boom").status == 500
    assert counts(mw) == {("/boom", "GET", "anonymous", "server_error"): 1}
    assert any("Exception on /boom" in r.getMessage() for r in caplog.records)  # Flask's own log


def test_streamed_body_is_intact_and_counted_once(served: Served) -> None:
    target, mw = served
    reply = wsgi_request(target, "/stream/3000")
    bare = wsgi_request(flask_app.create_app(), "/stream/3000")
    assert reply == bare
    assert reply.body.count(b"\n") == 3000
    assert counts(mw) == {("/stream/<int:chunks>", "GET", "anonymous", "ok"): 1}


def test_flask_response_closed_exactly_once_even_if_the_server_closes_twice(
    served: Served,
) -> None:
    target, mw = served
    flask_app.CLOSE_CALLS.clear()
    environ = Client(target).open("/closing/4").request.environ  # a fully built environ
    flask_app.CLOSE_CALLS.clear()
    result = target(environ, lambda status, headers, exc_info=None: None)
    assert b"".join(result) == b"part-0;part-1;part-2;part-3;"
    result.close()
    result.close()
    assert flask_app.CLOSE_CALLS == ["/closing/4"]
    assert counts(mw) == {("/closing/<int:chunks>", "GET", "anonymous", "ok"): 1}


def test_metrics_and_report_through_flask(served: Served) -> None:
    target, mw = served
    for path in ("/reports/1", "/reports/2", "/api/v2/items/x"):
        wsgi_request(target, path, headers={"Authorization": "Bearer abc"})
    metrics = wsgi_request(target, "/metrics", remote_addr="10.0.0.8")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert requests_total(text) == 3
    assert (
        {"route": "/reports/<int:rid>", "method": "GET", "auth": "bearer", "outcome": "ok"},
        2.0,
    ) in metric_samples(text, "memwatch_requests_total")
    assert wsgi_request(target, "/memwatch/report.json").status == 200
    assert wsgi_request(target, "/memwatch/report.json", remote_addr="10.0.0.8").status == 404
    assert sum(counts(mw).values()) == 3  # memwatch's own endpoints are not counted


def test_no_credential_in_any_output(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = flask_app.create_app()
    mw = memwatch.wrap(app, registry=CollectorRegistry())  # start-up log line on
    for path, query, headers in canary_requests():
        for target_path in ("/secure", "/status/500", "/unknown/" + path.strip("/")) if path == "/" else (path,):
            wsgi_request(mw, target_path, headers=headers, query=query)
    assert set(count_by(mw, "auth")) >= {"bearer", "basic", "digest", "apikey", "session", "other"}
    assert "/reset/<token>" in count_by(mw, "route")
    for where in ("/metrics", "/memwatch/report.json", "/memwatch/"):
        reply = wsgi_request(mw, where)
        assert reply.status == 200
        assert_no_canary(reply.body.decode(), where)
    assert any(r.name == "memwatch" for r in caplog.records)
    for record in caplog.records:
        assert_no_canary(record.getMessage() + (record.exc_text or ""), f"log {record.name}")


@pytest.mark.parametrize(("authorization", "cookie"), MALFORMED_HEADERS)
def test_malformed_headers_change_nothing(authorization: str | None, cookie: str | None) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = cookie
    target, mw = wrap_whole_app(flask_app.create_app())
    bare = flask_app.create_app()
    for path in ("/echo-headers", "/secure", "/reports/9"):
        wrapped_reply = wsgi_request(target, path, headers=headers, query="token=&api_key")
        assert wrapped_reply == wsgi_request(bare, path, headers=headers, query="token=&api_key")
    assert mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(mw).values()) == 3
