"""End to end: real servers (gunicorn sync and gthread workers, uvicorn) serving wrapped apps
from tests/apps on 127.0.0.1. Every request sent is counted exactly once in /metrics (one worker,
so the numbers are exact), the report is reachable from loopback only, and no credential sent
shows up in memwatch's output or the server's log."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.apps.support import (
    assert_no_canary,
    basic,
    canary_requests,
    metric_samples,
    requests_total,
)
from tests.integration.conftest import Server, Servers, gunicorn, uvicorn

pytestmark = pytest.mark.integration

REQUESTS = 500

# (path with {i}, expected route label, expected status)
RouteSpec = tuple[str, str, int]

FLASK_ROUTES: list[RouteSpec] = [
    ("/reports/{i}", "/reports/<int:rid>", 200),
    ("/api/v2/items/item{i}", "/api/v2/items/<name>", 200),
    ("/status/401", "/status/<int:code>", 401),
    ("/nope/{i}", "__unmatched__", 404),
    ("/boom", "/boom", 500),
]
DJANGO_ROUTES: list[RouteSpec] = [
    ("/api/data/", "api/data/", 200),
    ("/api/items/{i}/", "api/items/<int:pk>/", 200),
    ("/status/403/", "status/<int:code>/", 403),
    ("/nope/{i}/", "__unmatched__", 404),
    ("/boom/", "boom/", 500),
]
STARLETTE_ROUTES: list[RouteSpec] = [
    ("/orders/{i}", "/orders/{order_id:int}", 200),
    ("/v1/things/t{i}", "/v1/things/{tid}", 200),
    ("/plain/users/{i}", "/plain/users/{id}", 200),
    ("/status/404", "/status/{code:int}", 404),
    ("/boom", "/boom", 500),
]
FASTAPI_ROUTES: list[RouteSpec] = [
    ("/users/{i}", "/users/{user_id}", 200),
    ("/api/items/x{i}", "/api/items/{item_id}", 200),
    ("/sub/things/{i}", "/sub/things/{tid}", 200),
    ("/status/401", "/status/{code}", 401),
    ("/nope", "__unmatched__", 404),
]

# i -> (headers, query string, expected auth label); every credential distinct per request
AUTHS: list[Callable[[int], tuple[dict[str, str], str, str]]] = [
    lambda i: ({"Authorization": f"Bearer tok-{i:06d}"}, "", "bearer"),
    lambda i: ({"Authorization": basic(f"user{i}", "secret")}, "", "basic"),
    lambda i: ({"X-API-Key": f"key-{i:06d}"}, "", "apikey"),
    lambda i: ({"Cookie": f"theme=dark; sessionid=s{i:06d}"}, "", "session"),
    lambda i: ({}, f"access_token=qt-{i:06d}", "bearer"),
    lambda i: ({}, "", "anonymous"),
]

OUTCOME = {200: "ok", 401: "rejected", 403: "rejected", 404: "client_error", 500: "server_error"}


@dataclass(frozen=True)
class Case:
    argv: list[str]
    routes: list[RouteSpec]
    concurrency: int


CASES = {
    "gunicorn sync, Flask": Case(
        gunicorn("tests.apps.flask_app:wrapped()", "--worker-class", "sync"), FLASK_ROUTES, 1
    ),
    "gunicorn gthread, Django WSGI": Case(
        gunicorn(
            "tests.apps.django_app:wrapped_wsgi()", "--worker-class", "gthread", "--threads", "4"
        ),
        DJANGO_ROUTES,
        8,
    ),
    "gunicorn gthread, Flask": Case(
        gunicorn("tests.apps.flask_app:wrapped()", "--worker-class", "gthread", "--threads", "4"),
        FLASK_ROUTES,
        8,
    ),
    "uvicorn, Starlette": Case(uvicorn("tests.apps.starlette_app:wrapped"), STARLETTE_ROUTES, 8),
    "uvicorn, FastAPI": Case(uvicorn("tests.apps.fastapi_app:wrapped"), FASTAPI_ROUTES, 8),
    "uvicorn, Django ASGI": Case(uvicorn("tests.apps.django_app:wrapped_asgi"), DJANGO_ROUTES, 8),
}


def plan(routes: list[RouteSpec]) -> list[tuple[str, dict[str, str], str, int]]:
    """REQUESTS requests over every route and auth scheme: (url, headers, route, status) and
    the auth label folded into the route tuple by the caller."""
    requests = []
    for i in range(REQUESTS):
        path, route, status = routes[i % len(routes)]
        headers, query, auth = AUTHS[(i // len(routes)) % len(AUTHS)](i)
        url = path.format(i=i) + ("?" + query if query else "")
        requests.append((url, headers, f"{route}\x00{auth}", status))
    return requests


def metrics_when_settled(server: Server, expected_total: int, timeout: float = 10.0) -> str:
    """/metrics once the server has recorded every request: a WSGI request is recorded when the
    server closes its body, an ASGI one when the app returns, both possibly a moment after the
    client has its response. Bounded: returns the last reading after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = server.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        if requests_total(text) >= expected_total or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_every_request_counted_exactly_once(servers: Servers, name: str) -> None:
    # GIVEN a real server with one worker serving a wrapped app
    case = CASES[name]
    server = servers.start(name.replace(" ", "").replace(",", "-"), case.argv)

    # WHEN 500 requests over several routes and every auth scheme are sent
    requests = plan(case.routes)

    def send(request: tuple[str, dict[str, str], str, int]) -> tuple[str, int, int]:
        url, headers, key, expected_status = request
        status, _ = server.request("GET", url, headers)
        return key, status, expected_status

    with ThreadPoolExecutor(max_workers=case.concurrency) as pool:
        results = list(pool.map(send, requests))
    wrong = [(key, got, want) for key, got, want in results if got != want]
    assert not wrong, f"unexpected statuses: {wrong[:5]}\n{server.logs()[-4000:]}"

    # THEN /metrics counts each request once, under the right route, auth and outcome
    expected: Counter[tuple[str, str, str, str]] = Counter()
    for _, _, key, status in requests:
        route, auth = key.split("\x00")
        expected[(route, "GET", auth, OUTCOME[status])] += 1
    text = metrics_when_settled(server, REQUESTS)
    assert requests_total(text) == REQUESTS, server.logs()[-4000:]
    counted = {
        (d["route"], d["method"], d["auth"], d["outcome"]): v
        for d, v in metric_samples(text, "memwatch_requests_total")
    }
    assert counted == {key: float(n) for key, n in expected.items()}
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]
    # Each bearer request carried a new token: the sketch's estimate is close to their number.
    distinct = dict(
        (d["auth"], v) for d, v in metric_samples(text, "memwatch_distinct_credentials")
    )
    bearer = sum(n for (_, _, auth, _), n in expected.items() if auth == "bearer")
    assert abs(distinct["bearer"] - bearer) <= 0.1 * bearer

    # AND the report is served to loopback clients only
    status, body = server.request("GET", "/memwatch/report.json")
    assert status == 200
    report = json.loads(body)
    assert report["process"]["requests"] == REQUESTS
    assert {r["route"] for r in report["routes"]} == {route for route, _, _, _ in expected}
    status, _ = server.request(
        "GET", "/memwatch/report.json", {"X-Forwarded-For": "203.0.113.9"}
    )
    assert status == 404
    status, body = server.request("GET", "/memwatch/")
    assert status == 200 and b"<html" in body.lower()


@pytest.mark.parametrize("name", ["gunicorn gthread, Flask", "uvicorn, Starlette"])
def test_no_credential_in_output_or_server_log(servers: Servers, name: str) -> None:
    case = CASES[name]
    server = servers.start(name.replace(" ", "").replace(",", "-") + "-canary", case.argv)
    sent = 0
    for path, query, headers in canary_requests():
        for target in ("/status/401", "/boom", "/no/such/page") if path == "/" else (path,):
            server.request("GET", target + ("?" + query if query else ""), headers)
            sent += 1
    outputs = {
        "/metrics": metrics_when_settled(server, sent),
        "/memwatch/report.json": server.request("GET", "/memwatch/report.json")[1].decode(),
        "/memwatch/": server.request("GET", "/memwatch/")[1].decode(),
    }
    assert requests_total(outputs["/metrics"]) == sent
    for where, text in outputs.items():
        assert_no_canary(text, where)
    server.stop()
    log = server.logs()
    assert "AppError" in log  # the log holds the app's own error reports: it is the real one
    assert_no_canary(log, f"{name} log")
