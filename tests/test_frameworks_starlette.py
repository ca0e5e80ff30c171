"""memwatch on real Starlette and FastAPI apps: route templates (typed parameters, mounted
sub-apps, a mounted plain ASGI app, include_router prefixes), every auth scheme and outcome,
exceptions, streaming at message level, lifespan and websocket pass-through, credentials and
malformed headers."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware

import memwatch
from memwatch import ASGIMiddleware
from tests.apps import fastapi_app, starlette_app
from tests.apps.support import (
    AUTH_CASES,
    MALFORMED_HEADERS,
    STATUS_OUTCOMES,
    asgi_request,
    asgi_requests,
    assert_no_canary,
    canary_requests,
    communicate,
    count_by,
    counts,
    expected_matrix,
    make_scope,
    metric_samples,
    requests_total,
)


def watch(app: Any, **options: Any) -> ASGIMiddleware:
    options.setdefault("log_startup", False)
    mw = memwatch.wrap(app, registry=CollectorRegistry(), **options)
    assert isinstance(mw, ASGIMiddleware)
    return mw


def send_all(app: Any, requests: list[tuple[str, str, dict[str, str] | None]]) -> list[int]:
    replies = asyncio.run(asgi_requests(app, requests, raise_app_exceptions=False))
    return [r.status for r in replies]


# Framework -> (app factory, status route template, raising route template, module)
FRAMEWORKS = {
    "starlette": (starlette_app.create_app, "/status/{code:int}", "/boom", starlette_app),
    "fastapi": (fastapi_app.create_app, "/status/{code}", "/boom", fastapi_app),
}


@pytest.fixture(params=sorted(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --- route templates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "route", "status"),
    [
        pytest.param("GET", "/", "/", 200, id="index"),
        pytest.param("GET", "/orders/42", "/orders/{order_id:int}", 200, id="typed parameter"),
        pytest.param("GET", "/v1/things/abc", "/v1/things/{tid}", 200, id="mounted Starlette app"),
        pytest.param("GET", "/plain/users/42", "/plain/users/{id}", 200, id="mounted plain ASGI app"),
        pytest.param("GET", "/plain", "/plain", 307, id="mount root redirects"),
        pytest.param("POST", "/orders/42", "/orders/{order_id:int}", 405, id="method not allowed"),
        pytest.param("GET", "/orders/abc", "__unmatched__", 404, id="converter refuses"),
        pytest.param("GET", "/v1/nothing", "__unmatched__", 404, id="nothing in the mounted app"),
        pytest.param("GET", "/no/such/page", "__unmatched__", 404, id="no route"),
    ],
)
def test_starlette_route_templates(method: str, path: str, route: str, status: int) -> None:
    mw = watch(starlette_app.create_app())
    reply = asgi_request(mw, path, method=method)
    assert reply.status == status
    outcome = "ok" if status < 400 else "client_error"
    assert counts(mw) == {(route, method, "anonymous", outcome): 1}


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        pytest.param("/users/7", "/users/{user_id}", 200, id="path parameter"),
        pytest.param("/users/seven", "/users/{user_id}", 422, id="validation error"),
        pytest.param("/api/items/x1", "/api/items/{item_id}", 200, id="include_router prefix"),
        pytest.param(
            "/api/items/x1/tags/red", "/api/items/{item_id}/tags/{tag}", 200, id="two parameters"
        ),
        pytest.param(
            "/v2/outer/inner/leaf/5",
            "/v2/outer/inner/leaf/{leaf_id}",
            200,
            id="nested routers with prefixes",
        ),
        pytest.param("/sub/things/3", "/sub/things/{tid}", 200, id="mounted FastAPI app"),
        pytest.param("/sub/r/deep/z", "/sub/r/deep/{did}", 200, id="router inside mounted app"),
        pytest.param("/openapi.json", "/openapi.json", 200, id="FastAPI's own route"),
        pytest.param("/sub/nothing", "__unmatched__", 404, id="nothing in the mounted app"),
        pytest.param("/no/such/page", "__unmatched__", 404, id="no route"),
    ],
)
def test_fastapi_route_templates(path: str, route: str, status: int) -> None:
    mw = watch(fastapi_app.create_app())
    assert asgi_request(mw, path).status == status
    outcome = "ok" if status < 400 else "client_error"
    assert counts(mw) == {(route, "GET", "anonymous", outcome): 1}


def test_server_root_path_is_not_part_of_the_template(framework: str) -> None:
    # GIVEN a server that serves the app below a prefix (uvicorn --root-path /svc)
    factory = FRAMEWORKS[framework][0]
    mw = watch(factory())
    path, route = (
        ("/svc/v1/things/3", "/v1/things/{tid}")
        if framework == "starlette"
        else ("/svc/sub/things/3", "/sub/things/{tid}")
    )
    scope = make_scope(path)
    scope["root_path"] = "/svc"
    messages = asyncio.run(communicate(mw, scope))
    assert messages[0]["status"] == 200
    assert counts(mw) == {(route, "GET", "anonymous", "ok"): 1}


def test_add_middleware_inside_a_starlette_app() -> None:
    # The other documented way: memwatch as a Starlette middleware sharing one Memwatch.
    shared = memwatch.Memwatch(memwatch.Config(log_startup=False), registry=CollectorRegistry())
    base = starlette_app.create_app()
    app = Starlette(
        routes=base.routes,
        middleware=[Middleware(memwatch.ASGIMiddleware, memwatch=shared)],
    )
    statuses = send_all(
        app, [("GET", "/orders/1", None), ("GET", "/v1/things/x", None), ("GET", "/nope", None)]
    )
    assert statuses == [200, 200, 404]
    assert dict(shared.monitor.snapshot().counts) == {
        ("/orders/{order_id:int}", "GET", "anonymous", "ok"): 1,
        ("/v1/things/{tid}", "GET", "anonymous", "ok"): 1,
        ("__unmatched__", "GET", "anonymous", "client_error"): 1,
    }


# --- auth schemes and outcomes ----------------------------------------------------------------


@pytest.mark.parametrize(("headers", "query", "auth"), AUTH_CASES)
def test_every_auth_scheme_and_outcome(
    framework: str, headers: dict[str, str], query: str, auth: str
) -> None:
    factory, status_route, boom_route, module = FRAMEWORKS[framework]
    mw = watch(factory())
    suffix = "?" + query if query else ""
    statuses = send_all(mw, [("GET", f"/status/{c}{suffix}", headers) for c in STATUS_OUTCOMES])
    assert statuses == list(STATUS_OUTCOMES)
    with pytest.raises(module.AppError):
        asyncio.run(asgi_requests(mw, [("GET", "/boom" + suffix, headers)]))
    assert counts(mw) == expected_matrix(status_route, boom_route, auth)


@pytest.mark.parametrize("deny", ["401", "403"])
def test_rejections(framework: str, deny: str) -> None:
    mw = watch(FRAMEWORKS[framework][0]())
    reply = asgi_request(mw, "/secure", headers={"X-Deny": deny, "X-API-Key": "k-123456"})
    assert reply.status == int(deny)
    assert counts(mw) == {("/secure", "GET", "apikey", "rejected"): 1}


def test_exception_propagates_with_the_endpoint_frame(framework: str) -> None:
    _, _, _, module = FRAMEWORKS[framework]
    mw = watch(FRAMEWORKS[framework][0]())
    with pytest.raises(module.AppError) as excinfo:
        asgi_request(mw, "/boom")
    frames = traceback.extract_tb(excinfo.value.__traceback__)
    assert any(f.name == "boom" and f.filename == module.__file__ for f in frames)
    assert counts(mw) == {("/boom", "GET", "anonymous", "server_error"): 1}


def test_exception_response_is_still_the_apps(framework: str) -> None:
    # Starlette's ServerErrorMiddleware answers 500 and then re-raises: the server (here httpx,
    # told not to raise) sends the app's 500, and memwatch counted a server error.
    mw = watch(FRAMEWORKS[framework][0]())
    reply = asgi_request(mw, "/boom", raise_app_exceptions=False)
    assert reply.status == 500
    assert reply.body == b"Internal Server Error"
    assert count_by(mw, "outcome") == {"server_error": 1}


# --- streaming --------------------------------------------------------------------------------


def test_streaming_response_messages_forwarded_unchanged() -> None:
    scope = make_scope("/stream/300")
    wrapped = asyncio.run(communicate(watch(starlette_app.create_app()), dict(scope)))
    bare = asyncio.run(communicate(starlette_app.create_app(), dict(scope)))
    assert wrapped == bare
    bodies = [m for m in wrapped if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == b"".join(b"chunk-%06d\n" % i for i in range(300))
    assert all(m["more_body"] for m in bodies[:-1])
    assert bodies[-1].get("more_body", False) is False


def test_streaming_response_counted_once_with_its_template() -> None:
    mw = watch(starlette_app.create_app())
    assert asgi_request(mw, "/stream/50").body.count(b"\n") == 50
    assert counts(mw) == {("/stream/{chunks:int}", "GET", "anonymous", "ok"): 1}


# --- lifespan and websocket -------------------------------------------------------------------


def test_lifespan_websocket_and_http_in_one_app_lifetime() -> None:
    # GIVEN a Starlette app with a lifespan and a websocket route, behind memwatch
    from asgiref.testing import ApplicationCommunicator

    state: dict[str, bool] = {}
    mw = watch(starlette_app.create_app(state=state))
    lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    websocket_scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", b"Bearer ws-123456")],
        "client": ("127.0.0.1", 50001),
        "server": ("127.0.0.1", 8000),
        "subprotocols": [],
        "state": {},
    }

    async def scenario() -> list[dict[str, Any]]:
        lifespan = ApplicationCommunicator(mw, lifespan_scope)
        await lifespan.send_input({"type": "lifespan.startup"})
        seen = [await lifespan.receive_output()]
        assert state == {"startup": True}
        # WHEN a websocket session runs, then an HTTP request
        websocket = ApplicationCommunicator(mw, websocket_scope)
        await websocket.send_input({"type": "websocket.connect"})
        seen.append(await websocket.receive_output())
        await websocket.send_input({"type": "websocket.receive", "text": "hello"})
        seen.append(await websocket.receive_output())
        await websocket.send_input({"type": "websocket.receive", "text": "bye"})
        seen.append(await websocket.receive_output())
        await websocket.wait()
        http = await communicate(mw, {**make_scope("/orders/5"), "state": {}})
        seen.append({"status": http[0]["status"]})
        await lifespan.send_input({"type": "lifespan.shutdown"})
        seen.append(await lifespan.receive_output())
        await lifespan.wait()
        return seen

    # THEN every message is Starlette's own, and only the HTTP request is counted
    assert asyncio.run(scenario()) == [
        {"type": "lifespan.startup.complete"},
        {"type": "websocket.accept", "subprotocol": None, "headers": []},
        {"type": "websocket.send", "text": "echo:hello"},
        {"type": "websocket.close", "code": 1000, "reason": ""},
        {"status": 200},
        {"type": "lifespan.shutdown.complete"},
    ]
    assert state == {"startup": True, "shutdown": True}
    assert counts(mw) == {("/orders/{order_id:int}", "GET", "anonymous", "ok"): 1}


def test_lifespan_messages_pass_through() -> None:
    from asgiref.testing import ApplicationCommunicator

    state: dict[str, bool] = {}
    mw = watch(starlette_app.create_app(state=state))

    async def scenario() -> list[dict[str, Any]]:
        communicator = ApplicationCommunicator(
            mw, {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        )
        await communicator.send_input({"type": "lifespan.startup"})
        started = await communicator.receive_output()
        await communicator.send_input({"type": "lifespan.shutdown"})
        stopped = await communicator.receive_output()
        await communicator.wait()
        return [started, stopped]

    assert asyncio.run(scenario()) == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
    ]
    assert state == {"startup": True, "shutdown": True}
    assert counts(mw) == {}


# --- endpoints, credentials, malformed headers ------------------------------------------------


def test_metrics_and_report_through_the_app(framework: str) -> None:
    mw = watch(FRAMEWORKS[framework][0]())
    send_all(mw, [("GET", "/secure", {"Authorization": "Bearer t"})] * 3)
    metrics = asgi_request(mw, "/metrics", client=("10.0.0.8", 1))
    assert metrics.status == 200
    text = metrics.body.decode()
    assert requests_total(text) == 3
    assert metric_samples(text, "memwatch_requests_total") == [
        ({"route": "/secure", "method": "GET", "auth": "bearer", "outcome": "ok"}, 3.0)
    ]
    assert asgi_request(mw, "/memwatch/report.json").status == 200
    assert asgi_request(mw, "/memwatch/report.json", client=("10.0.0.8", 1)).status == 404


def test_no_credential_in_any_output(framework: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mw = memwatch.wrap(FRAMEWORKS[framework][0](), registry=CollectorRegistry())
    requests = []
    for path, query, headers in canary_requests():
        suffix = "?" + query if query else ""
        targets = ("/secure", "/status/500", "/unknown" + path) if path == "/" else (path,)
        requests += [("GET", target + suffix, headers) for target in targets]
    send_all(mw, requests)
    assert set(count_by(mw, "auth")) >= {"bearer", "basic", "digest", "apikey", "session", "other"}
    for where in ("/metrics", "/memwatch/report.json", "/memwatch/"):
        reply = asgi_request(mw, where)
        assert reply.status == 200
        assert_no_canary(reply.body.decode(), where)
    assert any(r.name == "memwatch" for r in caplog.records)
    for record in caplog.records:
        if record.name.startswith("httpx"):
            continue  # the test's own HTTP client logs the URLs it requests
        assert_no_canary(record.getMessage() + (record.exc_text or ""), f"log {record.name}")


@pytest.mark.parametrize(("authorization", "cookie"), MALFORMED_HEADERS)
def test_malformed_headers_change_nothing(authorization: str | None, cookie: str | None) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = cookie
    requests = [
        ("GET", "/echo-headers?token=&api_key", headers),
        ("GET", "/secure", headers),
        ("GET", "/orders/3", headers),
    ]
    mw = watch(starlette_app.create_app())
    wrapped = asyncio.run(asgi_requests(mw, requests))
    bare = asyncio.run(asgi_requests(starlette_app.create_app(), requests))
    assert wrapped == bare
    assert mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(mw).values()) == 3
