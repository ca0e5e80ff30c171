"""memwatch on a real Django project, through both of Django's handlers: route templates with
nested include(), every auth scheme and outcome, exceptions, streaming, credentials, malformed
headers. ``memwatch.wrap()`` alone: no setting, middleware or app of Django's is changed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import ASGIMiddleware, WSGIMiddleware
from tests.apps import django_app
from tests.apps.support import (
    AUTH_CASES,
    MALFORMED_HEADERS,
    STATUS_OUTCOMES,
    Reply,
    asgi_requests,
    assert_no_canary,
    canary_requests,
    count_by,
    counts,
    expected_matrix,
    requests_total,
    wsgi_request,
)


@pytest.fixture(autouse=True)
def django_project() -> Iterator[None]:
    # Importing tests.apps.django_app configured Django unless something else did first; the
    # project's settings are forced here so that these tests never depend on import order.
    with override_settings(
        ROOT_URLCONF=django_app.__name__, ALLOWED_HOSTS=["*"], DEBUG=False, MIDDLEWARE=[]
    ):
        yield


class Handler:
    """One of Django's handlers behind memwatch, with a uniform way to send requests."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        handler = django_app.wsgi_handler() if protocol == "wsgi" else django_app.asgi_handler()
        self.handler = handler
        self.mw = memwatch.wrap(handler, registry=CollectorRegistry(), log_startup=False)
        expected = WSGIMiddleware if protocol == "wsgi" else ASGIMiddleware
        assert isinstance(self.mw, expected)

    def send(
        self,
        requests: list[tuple[str, dict[str, str] | None]],
        *,
        query: str = "",
        peer: str = "127.0.0.1",
        app: Any = None,
    ) -> list[Reply]:
        app = app if app is not None else self.mw
        if self.protocol == "wsgi":
            return [
                wsgi_request(app, path, headers=headers, query=query, remote_addr=peer)
                for path, headers in requests
            ]
        suffix = "?" + query if query else ""
        return asyncio.run(
            asgi_requests(
                app,
                [("GET", path + suffix, headers) for path, headers in requests],
                client=(peer, 41000),
            )
        )

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
        (reply,) = self.send([(path, headers)], **kwargs)
        return reply


@pytest.fixture(params=["wsgi", "asgi"])
def django(request: pytest.FixtureRequest) -> Handler:
    return Handler(request.param)


def test_wrap_changes_no_django_setting(django: Handler) -> None:
    configured = (settings.MIDDLEWARE, settings.INSTALLED_APPS, settings.ROOT_URLCONF)
    assert configured == ([], [], django_app.__name__)
    assert django.mw.app is django.handler
    assert django.mw.framework == "django"


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        pytest.param("/api/data/", "api/data/", 200, id="include()"),
        pytest.param("/api/items/17/", "api/items/<int:pk>/", 200, id="include() with converter"),
        pytest.param(
            "/api/v1/deep/some-slug/", "api/v1/deep/<slug:slug>/", 200, id="nested include()"
        ),
        pytest.param("/", "/", 200, id="empty route at the root"),
        pytest.param("/status/404/", "status/<int:code>/", 404, id="matched route answering 404"),
        pytest.param("/api/items/abc/", "__unmatched__", 404, id="converter refuses"),
        pytest.param("/no/such/page/", "__unmatched__", 404, id="no route"),
    ],
)
def test_route_templates(django: Handler, path: str, route: str, status: int) -> None:
    assert django.get(path).status == status
    outcome = "ok" if status == 200 else "client_error"
    assert counts(django.mw) == {(route, "GET", "anonymous", outcome): 1}


@pytest.mark.parametrize(("headers", "query", "auth"), AUTH_CASES)
def test_every_auth_scheme_and_outcome(
    django: Handler, headers: dict[str, str], query: str, auth: str
) -> None:
    paths = [f"/status/{code}/" for code in STATUS_OUTCOMES] + ["/boom/"]
    replies = django.send([(path, headers) for path in paths], query=query)
    # Django turns the view's exception into its own 500 response (DEBUG=False).
    assert [r.status for r in replies] == [*STATUS_OUTCOMES, 500]
    assert counts(django.mw) == expected_matrix("status/<int:code>/", "boom/", auth)


def test_exception_is_a_server_error_and_django_logs_it(
    django: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    assert django.get("/boom/").status == 500
    assert counts(django.mw) == {("boom/", "GET", "anonymous", "server_error"): 1}
    errors = [r for r in caplog.records if r.name == "django.request"]
    assert errors and errors[0].exc_info is not None
    assert errors[0].exc_info[0] is django_app.AppError


def test_streaming_response_is_intact(django: Handler) -> None:
    reply = django.get("/stream/2000/")
    bare = django.get("/stream/2000/", app=django.handler)
    assert (reply.status, reply.body) == (bare.status, bare.body)
    assert reply.body.count(b"\n") == 2000
    assert counts(django.mw) == {("stream/<int:chunks>/", "GET", "anonymous", "ok"): 1}


def test_metrics_and_report_through_django(django: Handler) -> None:
    django.send([("/api/data/", None), ("/api/items/1/", None), ("/api/items/2/", None)])
    metrics = django.get("/metrics", peer="10.0.0.8")
    assert metrics.status == 200
    assert requests_total(metrics.body.decode()) == 3
    assert django.get("/memwatch/report.json").status == 200
    assert django.get("/memwatch/report.json", peer="10.0.0.8").status == 404
    assert count_by(django.mw, "route") == {"api/data/": 1, "api/items/<int:pk>/": 2}


def test_no_credential_in_any_output(django: Handler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for path, query, headers in canary_requests():
        target = "/status/401/" if path == "/" else path + "/"
        django.send([(target, headers), ("/boom/", headers)], query=query)
    assert "reset/<str:token>/" in count_by(django.mw, "route")
    for where in ("/metrics", "/memwatch/report.json", "/memwatch/"):
        reply = django.get(where)
        assert reply.status == 200
        assert_no_canary(reply.body.decode(), where)
    for record in caplog.records:
        if record.name.startswith("memwatch"):
            assert_no_canary(record.getMessage() + (record.exc_text or ""), "memwatch's log")


@pytest.mark.parametrize(("authorization", "cookie"), MALFORMED_HEADERS)
def test_malformed_headers_change_nothing(
    django: Handler, authorization: str | None, cookie: str | None
) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = cookie
    for path in ("/api/data/", "/status/401/"):
        wrapped = django.get(path, headers, query="token=")
        bare = django.get(path, headers, query="token=", app=django.handler)
        assert wrapped == bare
    assert django.mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(django.mw).values()) == 2
