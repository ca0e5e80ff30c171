"""The ASGI middleware on a bare ASGI app (no framework), at message level: route labels, the
route cap, streaming, exceptions, lifespan and websocket pass-through, access rules,
credentials, malformed headers and memwatch's own memory."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
import traceback
import tracemalloc
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import ASGIMiddleware
from tests.apps import bare_asgi
from tests.apps.support import (
    ENDPOINT_CASES,
    MALFORMED_HEADERS,
    asgi_reply,
    assert_no_canary,
    call_asgi,
    canary_requests,
    count_by,
    counts,
    expected_content_type,
    latin1_bytes,
    make_scope,
    metric_samples,
    run_asgi,
)


def watch(app: Any = bare_asgi.app, **options: Any) -> ASGIMiddleware:
    options.setdefault("log_startup", False)
    wrapped = memwatch.wrap(app, registry=CollectorRegistry(), **options)
    assert isinstance(wrapped, ASGIMiddleware)
    return wrapped


def get(app: Any, path: str, **kwargs: Any) -> Any:
    return asgi_reply(run_asgi(app, make_scope(path, **kwargs)))


def word(i: int) -> str:
    letters = []
    for _ in range(4):
        i, r = divmod(i, 26)
        letters.append(chr(ord("a") + r))
    return "w" + "".join(letters)


# --- route labels and outcomes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "label"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/users/42", "/users/{id}", id="numeric id"),
        pytest.param("/users/42/orders/7", "/users/{id}/orders/{id}", id="two ids"),
        pytest.param(
            "/orders/3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "/orders/{uuid}", id="uuid"
        ),
        pytest.param("/reset/tok_9fQ2xLw8Zp", "/reset/{token}", id="token-like segment"),
        pytest.param("/health", "/health", id="plain word"),
    ],
)
def test_bare_app_paths_are_normalised(path: str, label: str) -> None:
    mw = watch()
    assert get(mw, path).status == 200
    assert counts(mw) == {(label, "GET", "anonymous", "ok"): 1}


def test_outcomes_follow_the_status() -> None:
    mw = watch()
    for code in (200, 204, 302, 400, 401, 403, 404, 422, 500, 503):
        assert get(mw, f"/status/{code}").status == code
    assert count_by(mw, "outcome") == {
        "ok": 3,
        "client_error": 3,
        "rejected": 2,
        "server_error": 2,
    }


def test_route_cap_with_10000_distinct_paths() -> None:
    mw = watch()
    n = 10_000

    async def scan() -> None:
        for i in range(n):
            await call_asgi(mw, make_scope(f"/{word(i)}/{i}"))

    asyncio.run(scan())
    routes = count_by(mw, "route")
    assert len(set(routes) - {"__other__"}) == mw.config.max_routes == 200
    assert routes["__other__"] == n - 200
    assert sum(routes.values()) == n
    text = get(mw, "/metrics", client=("10.0.0.1", 1)).body.decode()
    samples = metric_samples(text, "memwatch_requests_total")
    assert sum(v for _, v in samples) == n
    assert len({labels["route"] for labels, _ in samples}) == 201


# --- streaming and the message flow -----------------------------------------------------------


def test_stream_messages_are_forwarded_unchanged() -> None:
    # GIVEN the same request to the bare app and to the wrapped app
    scope = make_scope("/stream/500")
    bare = run_asgi(bare_asgi.app, dict(scope))
    wrapped = run_asgi(watch(), dict(scope))
    # THEN every message, more_body flags included, is the app's own, in order
    assert wrapped == bare
    assert len(wrapped) == 502
    assert [m.get("more_body", False) for m in wrapped[1:]] == [True] * 500 + [False]


def test_messages_are_the_same_objects() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in (
            {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]},
            {"type": "http.response.body", "body": b"a", "more_body": True},
            {"type": "http.response.body", "body": b"b"},
        ):
            sent.append(message)
            await send(message)

    received = run_asgi(watch(app), make_scope("/same"))
    assert len(received) == 3
    assert all(a is b for a, b in zip(received, sent, strict=True))


def test_request_body_reaches_the_app() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"][::-1]})

    mw = watch(app)
    reply = asgi_reply(run_asgi(mw, make_scope("/upload", method="POST"), body=b"abc123"))
    assert reply.body == b"321cba"
    assert counts(mw) == {("/upload", "POST", "anonymous", "ok"): 1}


def test_request_is_recorded_when_the_app_returns() -> None:
    # GIVEN an app that has sent its whole response but not yet returned
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await release.wait()

    mw = watch(app)

    async def scenario() -> None:
        communicator = ApplicationCommunicator(mw, make_scope("/slow"))
        await communicator.send_input({"type": "http.request", "body": b""})
        assert (await communicator.receive_output())["status"] == 200
        assert (await communicator.receive_output())["body"] == b"done"
        assert counts(mw) == {}
        release.set()
        await communicator.wait()

    asyncio.run(scenario())
    assert counts(mw) == {("/slow", "GET", "anonymous", "ok"): 1}


def test_app_that_never_responds_counts_as_server_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    mw = watch(app)
    assert run_asgi(mw, make_scope("/silent")) == []
    assert counts(mw) == {("/silent", "GET", "anonymous", "server_error"): 1}


# --- exceptions -----------------------------------------------------------------------------


def test_app_exception_propagates_unchanged_and_counts_as_server_error() -> None:
    raised: list[BaseException] = []

    async def failing_endpoint(scope: Any, receive: Any, send: Any) -> None:
        error = bare_asgi.AppError("boom")
        raised.append(error)
        raise error

    mw = watch(failing_endpoint)
    with pytest.raises(bare_asgi.AppError) as excinfo:
        run_asgi(mw, make_scope("/boom"))
    assert excinfo.value is raised[0]
    frames = [frame.name for frame in traceback.extract_tb(excinfo.value.__traceback__)]
    assert frames[-1] == "failing_endpoint"
    assert counts(mw) == {("/boom", "GET", "anonymous", "server_error"): 1}


def test_exception_after_a_200_start_counts_as_server_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ConnectionResetError("stream broke")

    mw = watch(app)
    with pytest.raises(ConnectionResetError, match="stream broke"):
        run_asgi(mw, make_scope("/partial"))
    assert counts(mw) == {("/partial", "GET", "anonymous", "server_error"): 1}


def test_exception_through_application_communicator() -> None:
    mw = watch()

    async def scenario() -> BaseException:
        communicator = ApplicationCommunicator(mw, make_scope("/boom"))
        await communicator.send_input({"type": "http.request", "body": b""})
        with pytest.raises(bare_asgi.AppError) as excinfo:
            await communicator.wait()
        return excinfo.value

    error = asyncio.run(scenario())
    assert "bare ASGI" in str(error)
    assert count_by(mw, "outcome") == {"server_error": 1}


# --- lifespan and websocket pass straight through ---------------------------------------------


def test_lifespan_passes_through() -> None:
    mw = watch()

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
    assert counts(mw) == {}


async def websocket_echo(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})


def test_websocket_passes_through() -> None:
    mw = watch(websocket_echo)
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/metrics",  # even memwatch's own path: websockets are not memwatch's business
        "headers": [(b"authorization", b"Bearer ws-token-123")],
        "client": ("10.0.0.1", 1),
    }

    async def scenario() -> list[dict[str, Any]]:
        communicator = ApplicationCommunicator(mw, scope)
        await communicator.send_input({"type": "websocket.connect"})
        accepted = await communicator.receive_output()
        await communicator.send_input({"type": "websocket.receive", "text": "hi"})
        echoed = await communicator.receive_output()
        await communicator.send_input({"type": "websocket.disconnect", "code": 1000})
        await communicator.wait()
        return [accepted, echoed]

    assert asyncio.run(scenario()) == [
        {"type": "websocket.accept"},
        {"type": "websocket.send", "text": "echo:hi"},
    ]
    assert counts(mw) == {}


# --- memwatch's endpoints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path", "method", "peer", "headers", "status"), ENDPOINT_CASES
)
def test_endpoint_access_rules(
    options: dict[str, Any],
    path: str,
    method: str,
    peer: str,
    headers: dict[str, str],
    status: int,
) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    mw = watch(app, **options)
    get(mw, "/warm-up")
    reply = get(mw, path, method=method, headers=headers, client=(peer, 40000))
    assert reply.status == status
    content_type = dict(reply.headers)["content-type"]
    assert content_type.startswith(expected_content_type(path, status))
    assert seen == ["/warm-up"]
    assert sum(counts(mw).values()) == 1
    if status == 200 and path.endswith("report.json"):
        assert [r["route"] for r in json.loads(reply.body)["routes"]] == ["/warm-up"]


def test_endpoint_without_client_address_is_not_loopback() -> None:
    # A server that does not know the peer (client None, e.g. a Unix socket) gets no report.
    mw = watch()
    assert get(mw, "/memwatch/report.json", client=None).status == 404


def test_metrics_response_messages() -> None:
    mw = watch()
    get(mw, "/users/1")
    start, body = run_asgi(mw, make_scope("/metrics"))
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/plain")
    assert int(headers[b"content-length"]) == len(body["body"])
    assert headers[b"cache-control"] == b"no-store"
    assert body["type"] == "http.response.body"
    assert body.get("more_body", False) is False
    samples = metric_samples(body["body"].decode(), "memwatch_requests_total")
    assert samples == [
        ({"route": "/users/{id}", "method": "GET", "auth": "anonymous", "outcome": "ok"}, 1.0)
    ]


def test_openmetrics_when_asked() -> None:
    mw = watch()
    get(mw, "/users/1")
    reply = get(mw, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert dict(reply.headers)["content-type"].startswith("application/openmetrics-text")
    assert reply.body.rstrip().endswith(b"# EOF")


def test_disabled_middleware_is_a_pass_through() -> None:
    mw = watch(enabled=False)
    assert get(mw, "/metrics").body == b"ok"
    assert counts(mw) == {}


# --- credentials never leave ------------------------------------------------------------------


def test_no_credential_in_any_output(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mw = watch(log_startup=True)

    async def traffic() -> None:
        for path, query, headers in canary_requests():
            for target in (path, "/status/401", "/status/500") if path == "/" else (path,):
                await call_asgi(mw, make_scope(target, query=query.encode(), headers=headers))

    asyncio.run(traffic())
    assert set(count_by(mw, "auth")) == {"bearer", "basic", "digest", "apikey", "session", "other"}
    for where in ("/metrics", "/memwatch/report.json", "/memwatch/"):
        reply = get(mw, where)
        assert reply.status == 200
        assert_no_canary(reply.body.decode(), where)
    assert any(r.name == "memwatch" for r in caplog.records)
    for record in caplog.records:
        assert_no_canary(record.getMessage() + (record.exc_text or ""), f"log {record.name}")


# --- malformed headers ------------------------------------------------------------------------


@pytest.mark.parametrize(("authorization", "cookie"), MALFORMED_HEADERS)
def test_malformed_headers_change_nothing(authorization: str | None, cookie: str | None) -> None:
    raw: list[tuple[bytes, bytes]] = []
    for name, value in ((b"authorization", authorization), (b"cookie", cookie)):
        encoded = latin1_bytes(value)
        if encoded is not None:
            raw.append((name, encoded))
    mw = watch()
    for path in ("/echo", "/status/401", "/stream/3"):
        scope = make_scope(path, headers=raw, query=b"token=&api_key")
        assert run_asgi(mw, dict(scope)) == run_asgi(bare_asgi.app, dict(scope))
    assert mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(mw).values()) == 3
    text = get(mw, "/metrics").body.decode()
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]


def test_repeated_and_raw_binary_headers() -> None:
    # Two Authorization headers, two Cookie headers, and bytes no text codec accepts.
    raw = [
        (b"authorization", b"\xff\xfe\x00garbage"),
        (b"authorization", b"Bearer second"),
        (b"cookie", b"a=\x80\x81"),
        (b"cookie", b"sessionid=\xc3\x28"),
        (b"x-api-key", b"\xff" * 70000),
    ]
    mw = watch()
    scope = make_scope("/echo", headers=raw)
    assert run_asgi(mw, dict(scope)) == run_asgi(bare_asgi.app, dict(scope))
    assert mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(mw).values()) == 1


# --- memwatch's own memory --------------------------------------------------------------------

CHECKPOINTS = (10_000, 20_000, 30_000, 40_000, 50_000)


def test_own_heap_is_bounded_over_50000_requests() -> None:
    # GIVEN a bare ASGI app behind memwatch, with the sample ring warmed up early (see
    # tests/test_wsgi.py::bounded_heap_options)
    mw = watch(
        history_size=memwatch.Config().window_samples,
        sample_every_requests=10,
        sample_budget_us=10.0,
        diagnosis="off",
    )

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def run() -> dict[int, int]:
        blocks: dict[int, int] = {}
        for i in range(CHECKPOINTS[-1]):
            # WHEN every request has a distinct path and a distinct bearer token
            scope = {
                "type": "http",
                "method": "GET",
                "path": f"/{word(i)}/{i}" if i % 2 else f"/users/{i}",
                "query_string": b"page=%d" % i,
                "root_path": "",
                "headers": [(b"authorization", b"Bearer tok-%09d-%s" % (i, word(i).encode()))],
                "client": ("127.0.0.1", 40000),
            }
            await mw(scope, receive, send)
            if i + 1 in CHECKPOINTS:
                gc.collect()
                blocks[i + 1] = sys.getallocatedblocks()
                assert len(mw.monitor.history) == mw.config.history_size
        return blocks

    blocks = asyncio.run(run())
    # THEN memwatch's heap is flat after warm-up (every checkpoint), labels within the cap
    base = CHECKPOINTS[0]
    assert max(blocks.values()) - blocks[base] < 0.05 * (CHECKPOINTS[-1] - base), blocks
    assert (blocks[CHECKPOINTS[-1]] - blocks[base]) / (CHECKPOINTS[-1] - base) < 0.05, blocks
    snapshot = mw.monitor.snapshot()
    assert snapshot.requests == CHECKPOINTS[-1]
    assert len(mw.monitor.routes) == mw.config.max_routes
    assert len({key[0] for key in snapshot.counts}) == mw.config.max_routes + 1


# --- the same contract while a diagnosis window traces requests -------------------------------


@pytest.mark.slow  # the window's analysis (census, holder search) takes seconds
def test_contract_holds_during_a_diagnosis_window() -> None:
    # GIVEN a diagnosis window open (requests then run through per-route trampolines)
    was_tracing = tracemalloc.is_tracing()
    mw = watch(diagnosis_requests=4)
    assert mw.monitor.start_diagnosis("test", force=True)

    async def scenario() -> int:
        # THEN the app's exception still propagates unchanged, with the app's frame
        with pytest.raises(bare_asgi.AppError, match="bare ASGI") as excinfo:
            await call_asgi(mw, make_scope("/boom"))
        assert traceback.extract_tb(excinfo.value.__traceback__)[-1].name == "app"
        # AND streamed messages are forwarded unchanged
        scope = make_scope("/stream/200")
        assert await call_asgi(mw, dict(scope)) == await call_asgi(bare_asgi.app, dict(scope))
        # AND the window finishes with traffic (bounded)
        # (the snapshots and the analysis run on the diagnosis thread: traffic drives the
        # window's phases, the thread finishes them)
        sent = 2
        deadline = time.monotonic() + 60
        while mw.monitor.diagnosis.windows == 0 and time.monotonic() < deadline:
            await call_asgi(mw, make_scope(f"/users/{sent}"))
            sent += 1
            await asyncio.sleep(0.01)
        return sent

    try:
        sent = asyncio.run(scenario())
        assert mw.monitor.diagnosis.windows == 1
        assert mw.monitor.diagnosis.window is None
        assert tracemalloc.is_tracing() == was_tracing
        assert sum(counts(mw).values()) == sent
        assert count_by(mw, "outcome")["server_error"] == 1
    finally:
        if mw.monitor.diagnosis.window is not None:
            mw.monitor.diagnosis.abandon()


# --- the compiled __call__ (memwatch._speedups.AsyncCall) against the Python coroutine ---------

compiled_call = pytest.mark.skipif(
    not hasattr(ASGIMiddleware.__call__, "__wrapped__"), reason="memwatch._speedups not built"
)


class ReferenceMiddleware(ASGIMiddleware):
    """The middleware with the Python coroutine the compiled __call__ stands for."""

    __call__ = getattr(ASGIMiddleware.__call__, "__wrapped__", ASGIMiddleware.__call__)


def watch_both(app: Any, **options: Any) -> list[ASGIMiddleware]:
    options.setdefault("log_startup", False)
    return [
        kind(app, registry=CollectorRegistry(), **options)
        for kind in (ASGIMiddleware, ReferenceMiddleware)
    ]


async def _receive_request() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(message: Any) -> None:
    return None


@compiled_call
def test_compiled_call_is_a_coroutine_function_to_servers() -> None:
    import inspect

    from asgiref.compatibility import guarantee_single_callable
    from uvicorn.config import Config as UvicornConfig

    mw = watch()
    assert type(ASGIMiddleware.__dict__["__call__"]).__name__ == "AsyncCall"
    assert inspect.iscoroutinefunction(mw.__call__)
    assert inspect.iscoroutinefunction(ASGIMiddleware.__call__)
    assert asyncio.iscoroutinefunction(mw.__call__)
    assert list(inspect.signature(mw).parameters) == ["scope", "receive", "send"]
    assert ASGIMiddleware.__call__.__name__ == "__call__"
    assert ASGIMiddleware.__call__.__qualname__ == "ASGIMiddleware.__call__"
    assert guarantee_single_callable(mw) is mw  # ASGI 3 to asgiref
    config = UvicornConfig(app=mw, log_config=None)
    config.load()
    assert config.interface == "asgi3"
    assert isinstance(memwatch.wrap(mw, log_startup=False), ASGIMiddleware)
    awaitable = mw(make_scope("/a"), _receive_request, _ignore)
    assert type(awaitable).__name__ == "ASGICall"
    assert asyncio.iscoroutine(awaitable)  # collections.abc.Coroutine: asyncio.run takes it
    assert asyncio.run(awaitable) is None
    assert counts(mw) == {("/a", "GET", "anonymous", "ok"): 1}


@compiled_call
def test_compiled_call_returns_none_whatever_the_app_returns() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> str:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return "ignored"

    for mw in watch_both(app):
        assert asyncio.run(mw(make_scope("/x"), _receive_request, _ignore)) is None
        assert counts(mw) == {("/x", "GET", "anonymous", "ok"): 1}


@compiled_call
def test_nothing_happens_before_the_first_step_and_unawaited_calls_warn() -> None:
    for mw in watch_both(bare_asgi.app):
        awaitable = mw(make_scope("/never"), _receive_request, _ignore)
        with pytest.warns(RuntimeWarning, match="was never awaited"):
            del awaitable
            gc.collect()
        assert counts(mw) == {}
        assert mw.monitor.snapshot().requests == 0


@compiled_call
def test_cancellation_reaches_the_app_and_counts_the_request() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def scenario(mw: ASGIMiddleware) -> None:
        task = asyncio.ensure_future(mw(make_scope("/wait"), _receive_request, _ignore))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for mw in watch_both(app):
        seen.clear()
        asyncio.run(scenario(mw))
        assert seen == ["cancelled", "finally"]
        # Cancelled after a 200 start, without an exception of the app: the status it sent.
        assert counts(mw) == {("/wait", "GET", "anonymous", "ok"): 1}, type(mw).__name__


@compiled_call
def test_throw_and_close_follow_the_coroutine_protocol() -> None:
    class Handled(Exception):
        pass

    gate: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(0)  # a bare yield: the awaitable is stepped by hand below
        except Handled:
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"handled"})
            return
        finally:
            gate.append("finally")
        await send({"type": "http.response.start", "status": 200, "headers": []})

    for mw in watch_both(app):
        name = type(mw).__name__
        # throw() that the app handles: the call returns (StopIteration), recorded as sent.
        call = mw(make_scope("/t"), _receive_request, _ignore)
        assert (type(call).__name__ == "ASGICall") == (type(mw) is ASGIMiddleware)
        assert call.send(None) is None  # the sleep(0) yield
        with pytest.raises(StopIteration):
            call.throw(Handled())
        assert counts(mw) == {("/t", "GET", "anonymous", "ok"): 1}, name
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            call.send(None)
        # throw() that the app does not handle: it propagates, a server error.
        call = mw(make_scope("/u"), _receive_request, _ignore)
        call.send(None)
        with pytest.raises(KeyError, match="nope"):
            call.throw(KeyError("nope"))
        assert counts(mw)[("/u", "GET", "anonymous", "server_error")] == 1, name
        # close() mid-request: the app's finally runs; no response sent, a server error.
        call = mw(make_scope("/c"), _receive_request, _ignore)
        call.send(None)
        before = len(gate)
        assert call.close() is None
        assert gate[before:] == ["finally"]
        assert counts(mw)[("/c", "GET", "anonymous", "server_error")] == 1, name
        # throw(GeneratorExit) mid-request: the app's awaitable is closed, not thrown into.
        call = mw(make_scope("/g"), _receive_request, _ignore)
        call.send(None)
        before = len(gate)
        with pytest.raises(GeneratorExit):
            call.throw(GeneratorExit)
        assert gate[before:] == ["finally"]
        assert counts(mw)[("/g", "GET", "anonymous", "server_error")] == 1, name
        # throw() and close() before the first step: the app never runs, nothing is recorded.
        call = mw(make_scope("/n"), _receive_request, _ignore)
        with pytest.raises(ValueError, match="early"):
            call.throw(ValueError("early"))
        mw(make_scope("/n"), _receive_request, _ignore).close()
        assert ("/n", "GET", "anonymous", "server_error") not in counts(mw), name
        # A started call dropped without close(): closed when collected, as a coroutine is.
        call = mw(make_scope("/d"), _receive_request, _ignore)
        call.send(None)
        before = len(gate)
        del call
        gc.collect()
        assert gate[before:] == ["finally"]
        assert counts(mw)[("/d", "GET", "anonymous", "server_error")] == 1, name


@compiled_call
def test_app_call_errors_propagate_unchanged() -> None:
    error = bare_asgi.AppError("raised by the call itself")

    def raising(scope: Any, receive: Any, send: Any) -> Any:
        raise error

    def not_awaitable(scope: Any, receive: Any, send: Any) -> Any:
        return 42

    for mw in watch_both(raising):
        with pytest.raises(bare_asgi.AppError) as excinfo:
            asyncio.run(mw(make_scope("/r"), _receive_request, _ignore))
        assert excinfo.value is error
        assert counts(mw) == {("/r", "GET", "anonymous", "server_error"): 1}
    for mw in watch_both(not_awaitable):
        with pytest.raises(TypeError, match="can't be used in 'await' expression"):
            asyncio.run(mw(make_scope("/n"), _receive_request, _ignore))
        assert counts(mw) == {("/n", "GET", "anonymous", "server_error"): 1}


@compiled_call
def test_an_awaitable_that_is_not_a_coroutine() -> None:
    class Response:
        def __init__(self, send: Any) -> None:
            self.send = send

        def __await__(self) -> Any:
            yield from self.send(
                {"type": "http.response.start", "status": 404, "headers": []}
            ).__await__()
            yield from asyncio.sleep(0).__await__()
            yield from self.send({"type": "http.response.body", "body": b"gone"}).__await__()

    def app(scope: Any, receive: Any, send: Any) -> Response:
        return Response(send)

    sent: list[dict[str, Any]] = []

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)

    for mw in watch_both(app):
        sent.clear()
        asyncio.run(mw(make_scope("/missing"), _receive_request, record))
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert counts(mw) == {("/missing", "GET", "anonymous", "client_error"): 1}


@compiled_call
def test_compiled_call_falls_back_to_the_coroutine() -> None:
    # speedups off, lifespan, memwatch's own paths: the Python path, through the same call.
    mw = watch(bare_asgi.app, speedups=False)
    assert get(mw, "/users/1").status == 200
    assert counts(mw) == {("/users/{id}", "GET", "anonymous", "ok"): 1}
    mw = watch()
    assert get(mw, "/metrics").status == 200
    assert counts(mw) == {}
    mw._fast = None  # not the compiled fast path: the coroutine itself
    assert get(mw, "/users/2").status == 200
    assert counts(mw) == {("/users/{id}", "GET", "anonymous", "ok"): 1}


@compiled_call
def test_the_app_set_later_is_the_one_called() -> None:
    # `app` lives in a slot of the compiled base: reassigning it (as a wrapper installed after
    # memwatch would) is seen by the next request on the compiled path.
    from memwatch._speedups import ASGIBase

    mw = watch()
    assert isinstance(mw, ASGIBase) and mw.app is bare_asgi.app
    called: list[str] = []

    async def other(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])
        await bare_asgi.app(scope, receive, send)

    mw.app = other
    assert get(mw, "/users/3").status == 200
    assert called == ["/users/3"]
    assert counts(mw) == {("/users/{id}", "GET", "anonymous", "ok"): 1}
