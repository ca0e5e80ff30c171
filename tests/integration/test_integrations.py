"""End to end: memwatch's framework integrations and its launcher, each under a real server on
127.0.0.1 with one worker, so that the numbers are exact:

- Django with ``"memwatch.django.MemwatchMiddleware"`` in ``settings.MIDDLEWARE``, under gunicorn
  (WSGI) and uvicorn (ASGI);
- Flask with the ``memwatch.flask.Memwatch`` extension, under gunicorn;
- FastAPI with ``app.add_middleware(memwatch.ASGIMiddleware)``, under uvicorn;
- ``memwatch run -- ...`` around apps that do not mention memwatch: the ``gunicorn`` and
  ``uvicorn`` commands and ``python -m gunicorn`` / ``python -m uvicorn``.

Every request sent is counted once in ``/metrics`` under its route template, auth scheme and
outcome; the launcher wraps the application exactly once (one start-up line per worker).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apps.support import basic, metric_samples, requests_total
from tests.integration.conftest import Server, Servers, gunicorn, uvicorn

pytestmark = pytest.mark.integration

REQUESTS = 240
BIN = Path(sys.executable).parent
MEMWATCH_RUN = [sys.executable, "-m", "memwatch", "run", "--"]
WATCHING = "memwatch run: watching"
# gunicorn 27's control socket has one default path per user: not shared between test servers.
NO_CONTROL_SOCKET = "--no-control-socket"

# (path with {i}, expected route label, expected status)
RouteSpec = tuple[str, str, int]

DJANGO: list[RouteSpec] = [
    ("/api/data/", "api/data/", 200),
    ("/api/items/{i}/", "api/items/<int:pk>/", 200),
    ("/api/v1/deep/s{i}/", "api/v1/deep/<slug:slug>/", 200),
    ("/status/403/", "status/<int:code>/", 403),
    ("/nope/{i}/", "__unmatched__", 404),
    ("/boom/", "boom/", 500),
]
FLASK: list[RouteSpec] = [
    ("/reports/{i}", "/reports/<int:rid>", 200),
    ("/api/v2/items/item{i}", "/api/v2/items/<name>", 200),
    ("/status/401", "/status/<int:code>", 401),
    ("/nope/{i}", "__unmatched__", 404),
    ("/boom", "/boom", 500),
]
FASTAPI: list[RouteSpec] = [
    ("/users/{i}", "/users/{user_id}", 200),
    ("/api/items/x{i}", "/api/items/{item_id}", 200),
    ("/sub/things/{i}", "/sub/things/{tid}", 200),
    ("/status/401", "/status/{code}", 401),
    ("/nope", "__unmatched__", 404),
    ("/boom", "/boom", 500),
]
BARE_ASGI: list[RouteSpec] = [  # no framework: normalised paths
    ("/items/{i}", "/items/{id}", 200),
    ("/status/403", "/status/{id}", 403),
    ("/boom", "/boom", 500),
]

# i -> (headers, expected auth label); a new credential per request
AUTHS = [
    lambda i: ({"Authorization": f"Bearer tok-{i:06d}"}, "bearer"),
    lambda i: ({"Authorization": basic(f"user{i}", "secret")}, "basic"),
    lambda i: ({"X-API-Key": f"key-{i:06d}"}, "apikey"),
    lambda i: ({"Cookie": f"theme=dark; sessionid=s{i:06d}"}, "session"),
    lambda i: ({}, "anonymous"),
]

OUTCOME = {200: "ok", 401: "rejected", 403: "rejected", 404: "client_error", 500: "server_error"}


def served_by_gunicorn(app: str, *options: str, run: list[str] | None = None) -> list[str]:
    """gunicorn with one worker; ``run`` replaces ``python -m gunicorn`` (the launcher's forms)."""
    argv = gunicorn(app, NO_CONTROL_SOCKET, *options)
    return argv if run is None else [*run, *argv[3:]]


def served_by_uvicorn(app: str, *options: str, run: list[str] | None = None) -> list[str]:
    """uvicorn with one worker; ``run`` replaces ``python -m uvicorn`` (the launcher's forms)."""
    argv = uvicorn(app, *options)
    if "--factory" not in options:
        argv.remove("--factory")
    return argv if run is None else [*run, *argv[3:]]


@dataclass(frozen=True)
class Case:
    argv: list[str]
    routes: list[RouteSpec]
    launcher: bool = False


CASES = {
    "Django settings middleware, gunicorn gthread": Case(
        served_by_gunicorn(
            "tests.apps.django_middleware_app:wsgi()", "--worker-class", "gthread", "--threads", "4"
        ),
        DJANGO,
    ),
    "Django settings middleware, uvicorn (ASGI)": Case(
        served_by_uvicorn("tests.apps.django_middleware_app:asgi", "--factory"), DJANGO
    ),
    "Flask extension, gunicorn sync": Case(
        served_by_gunicorn("tests.apps.flask_extension_app:create()", "--worker-class", "sync"),
        FLASK,
    ),
    "FastAPI add_middleware, uvicorn": Case(
        served_by_uvicorn("tests.apps.fastapi_middleware_app:create", "--factory"), FASTAPI
    ),
    "memwatch run -- gunicorn, Flask": Case(
        served_by_gunicorn(
            "tests.apps.flask_app:create_app(propagate=False)",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            run=[*MEMWATCH_RUN, str(BIN / "gunicorn")],
        ),
        FLASK,
        launcher=True,
    ),
    "memwatch run -- python -m gunicorn, Django": Case(
        served_by_gunicorn(
            "tests.apps.django_app:wsgi_handler()", run=[*MEMWATCH_RUN, sys.executable, "-m", "gunicorn"]
        ),
        DJANGO,
        launcher=True,
    ),
    "memwatch run -- uvicorn --factory, FastAPI": Case(
        served_by_uvicorn(
            "tests.apps.fastapi_app:create_app", "--factory", run=[*MEMWATCH_RUN, str(BIN / "uvicorn")]
        ),
        FASTAPI,
        launcher=True,
    ),
    "memwatch run -- python -m uvicorn, bare ASGI": Case(
        served_by_uvicorn(
            "tests.apps.bare_asgi:app", run=[*MEMWATCH_RUN, sys.executable, "-m", "uvicorn"]
        ),
        BARE_ASGI,
        launcher=True,
    ),
}


def metrics_when_settled(server: Server, expected_total: int, timeout: float = 10.0) -> str:
    """/metrics once every request is recorded (a request may be recorded a moment after its
    response reached the client); bounded: the last reading after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = server.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        if requests_total(text) >= expected_total or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_every_request_counted_under_its_route_and_auth(servers: Servers, name: str) -> None:
    # GIVEN a real server with one worker, memwatch added by the integration under test
    case = CASES[name]
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    server = servers.start(slug, case.argv)

    # WHEN requests over every route and auth scheme are sent, four at a time
    plan = []
    for i in range(REQUESTS):
        path, route, status = case.routes[i % len(case.routes)]
        headers, auth = AUTHS[(i // len(case.routes)) % len(AUTHS)](i)
        plan.append((path.format(i=i), headers, (route, "GET", auth, OUTCOME[status]), status))

    def send(request: tuple[str, dict[str, str], tuple[str, str, str, str], int]) -> int:
        return server.request("GET", request[0], request[1])[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(send, plan))
    assert statuses == [status for *_, status in plan], server.logs()[-4000:]

    # THEN /metrics counts each request once, under its template, auth scheme and outcome
    text = metrics_when_settled(server, REQUESTS)
    counted = {
        (d["route"], d["method"], d["auth"], d["outcome"]): v
        for d, v in metric_samples(text, "memwatch_requests_total")
    }
    expected = Counter(key for _, _, key, _ in plan)
    assert counted == {key: float(n) for key, n in expected.items()}, server.logs()[-4000:]
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]

    # AND the report is there for loopback clients only
    status, _ = server.request("GET", "/memwatch/report.json")
    assert status == 200
    status, _ = server.request("GET", "/memwatch/report.json", {"X-Forwarded-For": "203.0.113.9"})
    assert status == 404

    # AND the launcher wrapped the application exactly once (the other integrations: never)
    assert server.logs().count(WATCHING) == (1 if case.launcher else 0), server.logs()[-4000:]
