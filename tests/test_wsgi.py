"""The WSGI middleware on a bare WSGI app (no framework): route labels, the route cap, the close()
contract, streaming, exceptions, access rules, credentials, malformed headers, own memory."""

from __future__ import annotations

import gc
import io
import json
import logging
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.util import FileWrapper

import pytest
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import WSGIMiddleware
from tests.apps import bare_wsgi
from tests.apps.support import (
    ENDPOINT_CASES,
    MALFORMED_HEADERS,
    assert_no_canary,
    canary_requests,
    count_by,
    counts,
    expected_content_type,
    make_environ,
    metric_samples,
    run_wsgi,
)


def watch(app: Any = bare_wsgi.app, **options: Any) -> WSGIMiddleware:
    options.setdefault("log_startup", False)
    wrapped = memwatch.wrap(app, registry=CollectorRegistry(), **options)
    assert isinstance(wrapped, WSGIMiddleware)
    return wrapped


def get(app: Any, path: str, **kwargs: Any) -> Any:
    return run_wsgi(app, make_environ(path, **kwargs))


# --- route labels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "label"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/users/42", "/users/{id}", id="numeric id"),
        pytest.param("/users/42/orders/7", "/users/{id}/orders/{id}", id="two ids"),
        pytest.param(
            "/orders/3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b", "/orders/{uuid}", id="uuid"
        ),
        pytest.param("/blobs/deadbeef00112233", "/blobs/{hex}", id="hex digest"),
        pytest.param("/reset/tok_9fQ2xLw8Zp", "/reset/{token}", id="token-like segment"),
        pytest.param("/health", "/health", id="plain word"),
    ],
)
def test_bare_app_paths_are_normalised(path: str, label: str) -> None:
    mw = watch()
    reply = get(mw, path)
    assert reply.status == 200
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


def test_method_label_is_bounded() -> None:
    mw = watch()
    for method in ("GET", "POST", "DELETE", "PROPFIND", "BREW"):
        get(mw, "/x", method=method)
    assert count_by(mw, "method") == {"GET": 1, "POST": 1, "DELETE": 1, "OTHER": 2}


def test_late_start_response_status_is_the_one_recorded() -> None:
    # The app calls start_response on the first iteration of its body (allowed by PEP 3333).
    mw = watch()
    reply = get(mw, "/late-start")
    assert (reply.status, reply.body) == (201, b"late")
    assert count_by(mw, "outcome") == {"ok": 1}


def word(i: int) -> str:
    """A distinct all-letter word per integer: kept as-is by path normalisation."""
    letters = []
    for _ in range(4):
        i, r = divmod(i, 26)
        letters.append(chr(ord("a") + r))
    return "w" + "".join(letters)


def test_route_cap_with_10000_distinct_paths() -> None:
    # GIVEN a bare app (no templates) and a scanner sending 10,000 distinct raw paths
    mw = watch()
    n = 10_000
    for i in range(n):
        environ = make_environ(f"/{word(i)}/{i}")
        run_wsgi(mw, environ)
    # THEN labels stay within max_routes, the rest is __other__, and no request is lost
    routes = count_by(mw, "route")
    assert len(set(routes) - {"__other__"}) == mw.config.max_routes == 200
    assert routes["__other__"] == n - 200
    assert sum(routes.values()) == n
    assert len(mw.monitor.routes) <= 200
    reply = get(mw, "/metrics", remote_addr="10.0.0.1")
    samples = metric_samples(reply.body.decode(), "memwatch_requests_total")
    assert sum(v for _, v in samples) == n
    assert len({labels["route"] for labels, _ in samples}) == 201


def test_route_cap_is_configurable() -> None:
    mw = watch(max_routes=5)
    for i in range(50):
        get(mw, f"/{word(i)}")
    routes = count_by(mw, "route")
    assert len(routes) == 6
    assert routes["__other__"] == 45


# --- the close() contract and streaming -------------------------------------------------------


def test_generator_body_streams_unchanged_and_unbuffered() -> None:
    produced: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(5000):
            produced.append(i)
            yield b"chunk-%d\n" % i

    mw = watch(app)
    started: list[str] = []
    result = mw(make_environ("/big"), lambda s, h, e=None: started.append(s))
    iterator = iter(result)
    # The first chunk arrives before the app produced the second: nothing is buffered.
    assert next(iterator) == b"chunk-0\n"
    assert produced == [0]
    rest = list(iterator)
    result.close()  # type: ignore[attr-defined]
    assert [b"chunk-0\n", *rest] == [b"chunk-%d\n" % i for i in range(5000)]
    assert started == ["200 OK"]
    assert counts(mw) == {("/big", "GET", "anonymous", "ok"): 1}


def test_bare_stream_route_matches_unwrapped_app() -> None:
    environ = make_environ("/stream/2000")
    assert run_wsgi(watch(), dict(environ)) == run_wsgi(bare_wsgi.app, dict(environ))


def test_request_is_recorded_when_the_server_closes_the_body() -> None:
    mw = watch()
    result = mw(make_environ("/closing/3"), lambda s, h, e=None: None)
    assert b"".join(result) == b"part-0;part-1;part-2;"
    assert counts(mw) == {}  # the body is sent, but the server has not closed it yet
    result.close()  # type: ignore[attr-defined]
    assert counts(mw) == {("/closing/{id}", "GET", "anonymous", "ok"): 1}


def test_app_close_called_exactly_once_when_the_server_closes_twice() -> None:
    mw = watch()
    bare_wsgi.BODIES.clear()
    result = mw(make_environ("/closing/3"), lambda s, h, e=None: None)
    list(result)
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    (body,) = bare_wsgi.BODIES
    assert body.close_calls == 1
    assert sum(counts(mw).values()) == 1


def test_close_before_the_body_is_consumed() -> None:
    # A client that disconnects: the server stops iterating and closes the body.
    mw = watch()
    bare_wsgi.BODIES.clear()
    result = mw(make_environ("/closing/100"), lambda s, h, e=None: None)
    assert next(iter(result)) == b"part-0;"
    result.close()  # type: ignore[attr-defined]
    assert bare_wsgi.BODIES[0].close_calls == 1
    assert sum(counts(mw).values()) == 1


def test_close_error_of_the_app_propagates_and_the_request_is_counted() -> None:
    failure = OSError("close failed")

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            raise failure

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    mw = watch(app)
    result = mw(make_environ("/c"), lambda s, h, e=None: None)
    list(result)
    with pytest.raises(OSError) as excinfo:
        result.close()  # type: ignore[attr-defined]
    assert excinfo.value is failure
    result.close()  # type: ignore[attr-defined]  # a second close is a no-op
    assert counts(mw) == {("/c", "GET", "anonymous", "ok"): 1}


def test_exception_in_the_middle_of_the_body_counts_as_server_error() -> None:
    # The app started a 200 response, then its body generator failed: the server sees the
    # exception while iterating and closes the body. Same outcome as on ASGI: server_error.
    failure = ConnectionAbortedError("database went away")

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        raise failure

    mw = watch(app)
    result = mw(make_environ("/report/9"), lambda s, h, e=None: None)
    chunks = []
    with pytest.raises(ConnectionAbortedError) as excinfo:
        for chunk in result:
            chunks.append(chunk)
    result.close()  # type: ignore[attr-defined]
    assert excinfo.value is failure
    assert chunks == [b"first"]
    assert counts(mw) == {("/report/{id}", "GET", "anonymous", "server_error"): 1}


class SelfIteratingBody:
    """A body that is its own iterator and has close() (like werkzeug.wsgi.ClosingIterator)."""

    def __init__(self) -> None:
        self.left = 100
        self.close_calls = 0

    def __iter__(self) -> SelfIteratingBody:
        return self

    def __next__(self) -> bytes:
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        return b"x"

    def close(self) -> None:
        self.close_calls += 1


def test_self_iterating_body_closed_once_when_abandoned_mid_stream() -> None:
    body = SelfIteratingBody()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return body

    mw = watch(app)
    result = mw(make_environ("/abandoned"), lambda s, h, e=None: None)
    iterator = iter(result)
    assert next(iterator) == b"x"
    result.close()  # type: ignore[attr-defined]  # the client went away
    del iterator, result  # the server drops its references
    gc.collect()
    assert body.close_calls == 1
    assert counts(mw) == {("/abandoned", "GET", "anonymous", "ok"): 1}


def test_file_wrapper_is_passed_through_for_sendfile() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"file-body" * 100), 64)  # type: ignore[no-any-return]

    mw = watch(app)
    environ = make_environ("/download/9")
    environ["wsgi.file_wrapper"] = FileWrapper
    result = mw(environ, lambda s, h, e=None: None)
    # The server's own FileWrapper comes back untouched, so it can still use sendfile.
    assert type(result) is FileWrapper
    assert b"".join(result) == b"file-body" * 100
    assert counts(mw) == {("/download/{id}", "GET", "anonymous", "ok"): 1}


# --- exceptions -----------------------------------------------------------------------------


def test_app_exception_propagates_unchanged_and_counts_as_server_error() -> None:
    raised: list[BaseException] = []

    def failing_view(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        error = bare_wsgi.AppError("boom")
        raised.append(error)
        raise error

    mw = watch(failing_view)
    with pytest.raises(bare_wsgi.AppError) as excinfo:
        mw(make_environ("/boom"), lambda s, h, e=None: None)
    assert excinfo.value is raised[0]
    frames = [frame.name for frame in traceback.extract_tb(excinfo.value.__traceback__)]
    assert frames[-1] == "failing_view"
    assert counts(mw) == {("/boom", "GET", "anonymous", "server_error"): 1}


def test_exception_after_start_response_counts_as_server_error() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        raise KeyError("late")

    mw = watch(app)
    with pytest.raises(KeyError, match="late"):
        mw(make_environ("/late"), lambda s, h, e=None: None)
    assert counts(mw) == {("/late", "GET", "anonymous", "server_error"): 1}


def test_exception_of_the_bare_app_module() -> None:
    mw = watch()
    with pytest.raises(bare_wsgi.AppError, match="bare WSGI"):
        get(mw, "/boom")
    assert count_by(mw, "outcome") == {"server_error": 1}


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

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"app"]

    mw = watch(app, **options)
    get(mw, "/warm-up")  # one request of the app's own, so the report has a route
    reply = get(mw, path, method=method, headers=headers, remote_addr=peer)
    assert reply.status == status
    content_type = dict(reply.headers)["Content-Type"]
    assert content_type.startswith(expected_content_type(path, status))
    assert seen == ["/warm-up"]  # memwatch's paths never reach the app
    assert sum(counts(mw).values()) == 1  # and are not counted as the app's requests
    if status == 200 and path.endswith("report.json"):
        report = json.loads(reply.body)
        assert [r["route"] for r in report["routes"]] == ["/warm-up"]


def test_head_on_metrics_has_no_body() -> None:
    mw = watch()
    reply = get(mw, "/metrics", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""


def test_metrics_counts_match_the_monitor() -> None:
    mw = watch()
    for path in ("/users/1", "/users/2", "/status/404"):
        get(mw, path, headers={"Authorization": "Bearer abcdef123456"})
    text = get(mw, "/metrics").body.decode()
    samples = {
        (d["route"], d["method"], d["auth"], d["outcome"]): v
        for d, v in metric_samples(text, "memwatch_requests_total")
    }
    assert samples == {
        ("/users/{id}", "GET", "bearer", "ok"): 2.0,
        ("/status/{id}", "GET", "bearer", "client_error"): 1.0,
    }
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]


def test_disabled_middleware_is_a_pass_through() -> None:
    mw = watch(enabled=False)
    environ = make_environ("/metrics")
    assert get(mw, "/users/1").body == b"ok"
    assert run_wsgi(mw, environ).body == b"ok"  # the app's own /metrics, not memwatch's
    assert counts(mw) == {}


# --- credentials never leave ------------------------------------------------------------------


def test_no_credential_in_any_output(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mw = watch(log_startup=True)
    for path, query, headers in canary_requests():
        for status_path in (path, "/status/401", "/status/500"):
            environ = make_environ(status_path if path == "/" else path, query=query, headers=headers)
            run_wsgi(mw, environ)
    schemes = count_by(mw, "auth")
    assert set(schemes) == {"bearer", "basic", "digest", "apikey", "session", "other"}
    outputs = {
        "/metrics": get(mw, "/metrics").body,
        "/memwatch/report.json": get(mw, "/memwatch/report.json").body,
        "/memwatch/": get(mw, "/memwatch/").body,
    }
    for where, body in outputs.items():
        assert_no_canary(body.decode(), where)
    assert any(r.name == "memwatch" for r in caplog.records)  # the start-up line was captured
    for record in caplog.records:
        assert_no_canary(record.getMessage() + (record.exc_text or ""), f"log {record.name}")
    assert_no_canary(repr(counts(mw)), "the counters")


# --- malformed headers ------------------------------------------------------------------------


@pytest.mark.parametrize(("authorization", "cookie"), MALFORMED_HEADERS)
def test_malformed_headers_change_nothing(authorization: str | None, cookie: str | None) -> None:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie is not None:
        headers["Cookie"] = cookie
    mw = watch()
    for path in ("/echo", "/status/401", "/stream/3"):
        environ = make_environ(path, headers=headers, query="token=")
        assert run_wsgi(mw, dict(environ)) == run_wsgi(bare_wsgi.app, dict(environ))
    assert mw.monitor.snapshot().internal_errors == 0
    assert sum(counts(mw).values()) == 3
    text = get(mw, "/metrics").body.decode()
    assert metric_samples(text, "memwatch_internal_errors_total") == [({}, 0.0)]


# --- memwatch's own memory --------------------------------------------------------------------


def bounded_heap_options() -> dict[str, Any]:
    """memwatch's sample history is a ring (history_size samples, one per sample_every_requests
    requests, stretched when a heap reading costs more than sample_budget_us per request): at the
    defaults it fills over about 100,000 requests. The smallest ring the detector accepts,
    sampled every few requests, is full long before the first measurement; from then on it is
    bounded by construction, and so must be everything else."""
    return {
        "history_size": memwatch.Config().window_samples,
        "sample_every_requests": 10,
        "sample_budget_us": 10.0,
        # The always-on tier is what must be bounded. A diagnosis window (tracemalloc, holder
        # search) would allocate and free its own snapshots in the middle of the measurement,
        # and memwatch's own warm-up can trigger one (see the report of this test suite).
        "diagnosis": "off",
    }


CHECKPOINTS = (10_000, 20_000, 30_000, 40_000, 50_000)


def measure_heap(serve: Callable[[int], None], middleware: Any) -> dict[int, int]:
    """Python heap blocks (after a full collection) at each checkpoint of a request loop."""
    blocks: dict[int, int] = {}
    for i in range(CHECKPOINTS[-1]):
        serve(i)
        if i + 1 in CHECKPOINTS:
            gc.collect()
            blocks[i + 1] = sys.getallocatedblocks()
            assert len(middleware.monitor.history) == middleware.config.history_size  # warmed up
    return blocks


def assert_flat(blocks: dict[int, int]) -> None:
    """Growth after the first checkpoint below 0.05 blocks per request, at every checkpoint (a
    cache that fills and is cleared would pass a two-point test at the wrong phase)."""
    base = CHECKPOINTS[0]
    budget = 0.05 * (CHECKPOINTS[-1] - base)
    assert max(blocks.values()) - blocks[base] < budget, blocks
    assert (blocks[CHECKPOINTS[-1]] - blocks[base]) / (CHECKPOINTS[-1] - base) < 0.05, blocks


def test_own_heap_is_bounded_over_50000_requests() -> None:
    # GIVEN a bare app behind memwatch
    mw = watch(**bounded_heap_options())

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    def serve(i: int) -> None:
        # WHEN every request has a distinct path and a distinct bearer token
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": f"/{word(i)}/{i}" if i % 2 else f"/users/{i}",
            "QUERY_STRING": f"page={i}",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_AUTHORIZATION": f"Bearer tok-{i:09d}-{word(i)}",
        }
        result = mw(environ, start_response)
        for _ in result:
            pass
        result.close()  # type: ignore[attr-defined]

    blocks = measure_heap(serve, mw)
    # THEN memwatch's heap stops growing after warm-up, and labels stay within the cap
    assert_flat(blocks)
    assert len(mw.monitor.routes) == mw.config.max_routes
    snapshot = mw.monitor.snapshot()
    assert snapshot.requests == 50_000
    assert len({key[0] for key in snapshot.counts}) == mw.config.max_routes + 1  # + __other__


# --- the same contract while a diagnosis window traces requests -------------------------------


@pytest.mark.slow  # the window's analysis (census, holder search) takes seconds
def test_contract_holds_during_a_diagnosis_window() -> None:
    # GIVEN a diagnosis window open (requests then run through per-route trampolines)
    was_tracing = tracemalloc.is_tracing()
    mw = watch(diagnosis_requests=4)
    assert mw.monitor.start_diagnosis("test", force=True)
    try:
        # THEN the app's exception still reaches the server unchanged, with the app's frame
        with pytest.raises(bare_wsgi.AppError, match="bare WSGI") as excinfo:
            get(mw, "/boom")
        assert traceback.extract_tb(excinfo.value.__traceback__)[-1].name == "app"
        # AND bodies stream unchanged, and the app's close() runs once
        environ = make_environ("/stream/500")
        assert run_wsgi(mw, dict(environ)) == run_wsgi(bare_wsgi.app, dict(environ))
        bare_wsgi.BODIES.clear()
        result = mw(make_environ("/closing/3"), lambda s, h, e=None: None)
        assert b"".join(result) == b"part-0;part-1;part-2;"
        result.close()  # type: ignore[attr-defined]
        result.close()  # type: ignore[attr-defined]
        assert bare_wsgi.BODIES[0].close_calls == 1
        # AND the window finishes with traffic (bounded), leaving tracing as it found it
        # (the snapshots and the analysis run on the diagnosis thread: traffic drives the
        # window's phases, the thread finishes them)
        sent = 3
        deadline = time.monotonic() + 60
        while mw.monitor.diagnosis.windows == 0 and time.monotonic() < deadline:
            get(mw, f"/users/{sent}")
            sent += 1
            time.sleep(0.01)
        assert mw.monitor.diagnosis.windows == 1
        assert mw.monitor.diagnosis.window is None
        assert tracemalloc.is_tracing() == was_tracing
        assert sum(counts(mw).values()) == sent
        assert count_by(mw, "outcome")["server_error"] == 1
    finally:
        if mw.monitor.diagnosis.window is not None:
            mw.monitor.diagnosis.abandon()
