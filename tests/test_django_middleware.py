"""``"memwatch.django.MemwatchMiddleware"`` in ``settings.MIDDLEWARE``, on a real Django project
(tests/apps/django_app.py) through both of Django's handlers: the labels are the ones
``memwatch.wrap()`` gives the same requests, the endpoints follow the same access rules, settings
merge over the environment, and the middleware runs natively async under ASGI."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpResponse
from django.test import override_settings
from prometheus_client import CollectorRegistry

import memwatch
import memwatch.django
from memwatch.core import Memwatch
from tests.apps import django_app
from tests.apps.support import (
    AUTH_CASES,
    ENDPOINT_CASES,
    Reply,
    asgi_requests,
    assert_no_canary,
    canary_requests,
    expected_content_type,
    metric_samples,
    requests_total,
    wsgi_request,
)

MIDDLEWARE = "memwatch.django.MemwatchMiddleware"

# (path, expected route label) over the project's routes: nested include(), converters, the root
# pattern, every outcome (status/<code>/ answers with the code), an exception, a non-match.
ROUTES = [
    ("/", "/"),
    ("/api/data/", "api/data/"),
    ("/api/items/7/", "api/items/<int:pk>/"),
    ("/api/v1/deep/some-slug/", "api/v1/deep/<slug:slug>/"),
    ("/status/200/", "status/<int:code>/"),
    ("/status/401/", "status/<int:code>/"),
    ("/status/403/", "status/<int:code>/"),
    ("/status/404/", "status/<int:code>/"),
    ("/boom/", "boom/"),
    ("/nope/42/", "__unmatched__"),
    ("/api/nothing/", "__unmatched__"),
]


def project(**extra: Any) -> Any:
    """The test project's settings, with memwatch's middleware first unless ``MIDDLEWARE`` says."""
    settings: dict[str, Any] = {
        "ROOT_URLCONF": django_app.__name__,
        "ALLOWED_HOSTS": ["*"],
        "DEBUG": False,
        "MIDDLEWARE": [MIDDLEWARE],
        "MEMWATCH": {"log_startup": False},
    }
    settings.update(extra)
    return override_settings(**settings)


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    memwatch.django.reset()
    with project():
        yield
    memwatch.django.reset()


def shared() -> Memwatch:
    instance = memwatch.django.instance()
    assert instance is not None
    return instance


def counts_of(instance: Memwatch) -> dict[tuple[str, str, str, str], int]:
    return dict(instance.monitor.snapshot().counts)


def send(
    app: Any,
    protocol: str,
    requests: list[tuple[str, dict[str, str] | None, str]],
    peer: str = "127.0.0.1",
) -> list[Reply]:
    """(path, headers, query) requests through a WSGI or ASGI app, as a server would send them."""
    if protocol == "wsgi":
        return [
            wsgi_request(app, path, headers=headers, query=query, remote_addr=peer)
            for path, headers, query in requests
        ]
    return asyncio.run(
        asgi_requests(
            app,
            [("GET", path + ("?" + query if query else ""), headers) for path, headers, query in requests],
            client=(peer, 41000),
        )
    )


def handler(protocol: str) -> WSGIHandler | ASGIHandler:
    """A Django handler; it loads settings.MIDDLEWARE when it is built."""
    return django_app.wsgi_handler() if protocol == "wsgi" else django_app.asgi_handler()


PROTOCOLS = [pytest.param("wsgi", id="WSGI handler"), pytest.param("asgi", id="ASGI handler")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_labels_identical_to_wrap(protocol: str) -> None:
    # GIVEN the same project served twice: memwatch.wrap() around a handler without the
    # middleware, and a handler with the middleware in settings
    with project(MIDDLEWARE=[]):
        wrapped = memwatch.wrap(handler(protocol), registry=CollectorRegistry(), log_startup=False)
    with_middleware = handler(protocol)

    # WHEN every route is requested with every auth scheme
    requests = [
        (path, headers, query)
        for path, _ in ROUTES
        for case in AUTH_CASES
        for headers, query in [case.values[:2]]
    ]
    via_wrap = send(wrapped, protocol, requests)
    via_middleware = send(with_middleware, protocol, requests)

    # THEN the responses and memwatch's counts are the same, label for label
    assert [r.status for r in via_middleware] == [r.status for r in via_wrap]
    expected = counts_of(wrapped.memwatch)
    assert counts_of(shared()) == expected
    assert {key[0] for key in expected} == {label for _, label in ROUTES}
    assert {key[2] for key in expected} == {case.values[2] for case in AUTH_CASES}
    assert {key[3] for key in expected} == {"ok", "rejected", "client_error", "server_error"}
    assert shared().monitor.errors.total == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_served_before_the_app(protocol: str) -> None:
    app = handler(protocol)
    send(app, protocol, [("/api/data/", {"Authorization": "Bearer t-1"}, ""), ("/nope/", None, "")])
    (reply,) = send(app, protocol, [("/metrics", None, "")])
    assert reply.status == 200
    text = reply.body.decode()
    assert requests_total(text) == 2
    assert {(d["route"], d["auth"], d["outcome"]) for d, _ in metric_samples(text, "memwatch_requests_total")} == {
        ("api/data/", "bearer", "ok"),
        ("__unmatched__", "anonymous", "client_error"),
    }


@pytest.mark.parametrize(("options", "path", "method", "peer", "headers", "status"), ENDPOINT_CASES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_endpoint_access_rules(
    protocol: str,
    options: dict[str, Any],
    path: str,
    method: str,
    peer: str,
    headers: dict[str, str],
    status: int,
) -> None:
    with project(MEMWATCH={"log_startup": False, **options}):
        app = handler(protocol)
        if protocol == "wsgi":
            reply = wsgi_request(app, path, method=method, headers=headers, remote_addr=peer)
        else:
            (reply,) = asyncio.run(asgi_requests(app, [(method, path, headers)], client=(peer, 41000)))
    assert reply.status == status, reply.body[:200]
    content_type = dict((k.lower(), v) for k, v in reply.headers)["content-type"]
    assert content_type.startswith(expected_content_type(path, status))
    assert shared().monitor.snapshot().requests == 0  # memwatch's own paths are not counted


def test_settings_merge_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_MAX_ROUTES", "7")
    monkeypatch.setenv("MEMWATCH_METRICS_PATH", "/from-env")
    with project(MEMWATCH={"log_startup": False, "metrics_path": "/prom"}):
        handler("wsgi")
    config = shared().config
    assert (config.max_routes, config.metrics_path) == (7, "/prom")


def test_one_instance_per_process() -> None:
    handler("wsgi")
    first = shared()
    handler("wsgi")
    handler("asgi")
    assert shared() is first


def on_leak_callback(monitor: Any, verdict: Any) -> None:
    """Named in settings by its dotted path."""


def test_callbacks_by_dotted_path() -> None:
    with project(MEMWATCH={"log_startup": False, "on_leak": f"{__name__}.on_leak_callback"}):
        handler("wsgi")
    assert shared().monitor.on_leak is on_leak_callback


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        pytest.param(["max_routes", 5], ImproperlyConfigured, id="not a dict"),
        pytest.param({"max_routez": 5}, memwatch.ConfigError, id="unknown option"),
        pytest.param({"max_routes": "lots"}, memwatch.ConfigError, id="bad value"),
    ],
)
def test_bad_settings_fail_at_start_up(setting: Any, error: type[Exception]) -> None:
    with project(MEMWATCH=setting), pytest.raises(error):
        handler("wsgi")


def test_disabled_middleware_leaves_the_chain() -> None:
    with project(MEMWATCH={"enabled": False}):
        app = handler("wsgi")
        (reply,) = send(app, "wsgi", [("/metrics", None, "")])
    assert reply.status == 404  # Django's answer: nobody serves /metrics
    assert memwatch.django.instance() is None


def test_async_capable_without_adaptation(caplog: pytest.LogCaptureFixture) -> None:
    # Django logs (at DEBUG) every middleware it has to adapt between sync and async.
    caplog.set_level(logging.DEBUG, logger="django.request")
    app = handler("asgi")
    send(app, "asgi", [("/api/data/", None, "")])
    assert not [r for r in caplog.records if "memwatch" in r.getMessage()]

    async def get_response(request: Any) -> HttpResponse:
        return HttpResponse(b"ok")

    def get_response_sync(request: Any) -> HttpResponse:
        return HttpResponse(b"ok")

    assert iscoroutinefunction(memwatch.django.MemwatchMiddleware(get_response))
    assert not iscoroutinefunction(memwatch.django.MemwatchMiddleware(get_response_sync))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_credential_in_output(protocol: str) -> None:
    app = handler(protocol)
    sent = 0
    for path, query, headers in canary_requests():
        targets = ("/status/401/", "/boom/", "/no/such/page/") if path == "/" else (path + "/",)
        send(app, protocol, [(target, headers, query) for target in targets])
        sent += len(targets)
    outputs = {
        path: send(app, protocol, [(path, None, "")])[0].body.decode()
        for path in ("/metrics", "/memwatch/report.json", "/memwatch/")
    }
    assert requests_total(outputs["/metrics"]) == sent
    for where, text in outputs.items():
        assert_no_canary(text, where)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_views_run_through_a_diagnosis_window(protocol: str) -> None:
    # GIVEN a diagnosis window open (views then run through per-route trampolines); long
    # enough that it is still tagging when the requests are done (its analysis is not tested
    # here: it is the same as for memwatch.wrap())
    options = {"log_startup": False, "diagnosis_requests": 100, "diagnosis_seconds": 600.0}
    with project(MEMWATCH=options):
        app = handler(protocol)
    instance = shared()
    assert instance.diagnose("test")
    window = instance.monitor.diagnosis.window
    assert window is not None
    try:
        # WHEN requests go through, one of them failing in the view
        paths = ["/boom/", "/api/items/1/", "/api/items/2/", "/api/items/3/"]
        replies = send(app, protocol, [(p, {"Authorization": "Bearer t-1"}, "") for p in paths])

        # THEN they are answered as without a window, counted once, and each was released to
        # the window with its final label (route template, method, auth)
        assert [r.status for r in replies] == [500, 200, 200, 200]
        assert replies[1].body == b'{"pk": 1}'
        boom = ("boom/", "GET", "bearer")
        item = ("api/items/<int:pk>/", "GET", "bearer")
        assert counts_of(instance) == {(*boom, "server_error"): 1, (*item, "ok"): 3}
        released: Counter[tuple[str, str, str]] = Counter()
        for labels in window.labels.values():
            released.update(labels)
        assert released == {boom: 1, item: 3}
        assert window.inflight == 0
        assert instance.monitor.errors.total == 0
    finally:
        instance.monitor.diagnosis.abandon()
