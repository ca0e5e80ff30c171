"""memwatch.wrap and detect_protocol: WSGI or ASGI, told apart on real framework objects."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import ASGIMiddleware, ConfigError, WSGIMiddleware, detect_protocol, wrap
from tests.apps import bare_asgi, bare_wsgi, django_app, fastapi_app, flask_app, starlette_app
from tests.apps.support import asgi_request, counts, wsgi_request


def wsgi_function(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [])
    return [b"f"]


async def asgi_function(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"f"})


def wsgi_with_optional_argument(
    environ: dict[str, Any], start_response: Any, extra: object = None
) -> Iterable[bytes]:
    return wsgi_function(environ, start_response)


class WSGIObject:
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return wsgi_function(environ, start_response)


class ASGIObject:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asgi_function(scope, receive, send)


class SyncASGIObject:
    """ASGI 3 written as a plain function returning the coroutine (three parameters)."""

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return asgi_function(scope, receive, send)


def _flask_wsgi_app() -> Any:
    return flask_app.create_app().wsgi_app


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        pytest.param(flask_app.create_app, "wsgi", id="Flask app"),
        pytest.param(_flask_wsgi_app, "wsgi", id="Flask app.wsgi_app (bound method)"),
        pytest.param(django_app.wsgi_handler, "wsgi", id="Django get_wsgi_application()"),
        pytest.param(django_app.asgi_handler, "asgi", id="Django get_asgi_application()"),
        pytest.param(starlette_app.create_app, "asgi", id="Starlette app"),
        pytest.param(fastapi_app.create_app, "asgi", id="FastAPI app"),
        pytest.param(lambda: bare_wsgi.app, "wsgi", id="plain WSGI function"),
        pytest.param(lambda: bare_asgi.app, "asgi", id="plain ASGI coroutine function"),
        pytest.param(
            lambda: wsgi_with_optional_argument, "wsgi", id="WSGI function, optional 3rd arg"
        ),
        pytest.param(WSGIObject, "wsgi", id="WSGI callable object"),
        pytest.param(ASGIObject, "asgi", id="ASGI callable object (async __call__)"),
        pytest.param(SyncASGIObject, "asgi", id="ASGI callable object (sync, 3 parameters)"),
        pytest.param(
            lambda: functools.partial(asgi_function), "asgi", id="functools.partial of ASGI"
        ),
    ],
)
def test_detect_protocol_on_real_apps(factory: Any, expected: str) -> None:
    app = factory()
    assert detect_protocol(app) == expected
    wrapped = wrap(app, registry=CollectorRegistry(), log_startup=False)
    assert isinstance(wrapped, ASGIMiddleware if expected == "asgi" else WSGIMiddleware)
    assert wrapped.app is app


def test_wrapped_flask_wsgi_app_still_serves_and_counts() -> None:
    # GIVEN the documented Flask idiom: app.wsgi_app = memwatch.wrap(app.wsgi_app)
    app = flask_app.create_app()
    app.wsgi_app = wrap(app.wsgi_app, registry=CollectorRegistry(), log_startup=False)  # type: ignore[method-assign]
    # WHEN the Flask app itself is served
    reply = wsgi_request(app, "/reports/7")
    # THEN the response is the app's and memwatch counted the route template
    assert reply.status == 200
    assert counts(app.wsgi_app) == {("/reports/<int:rid>", "GET", "anonymous", "ok"): 1}


def test_detected_wrappers_serve_requests() -> None:
    wsgi = wrap(WSGIObject(), registry=CollectorRegistry(), log_startup=False)
    asgi = wrap(ASGIObject(), registry=CollectorRegistry(), log_startup=False)
    assert wsgi_request(wsgi, "/x").body == b"f"
    assert asgi_request(asgi, "/x").body == b"f"
    assert counts(wsgi) == {("/x", "GET", "anonymous", "ok"): 1}
    assert counts(asgi) == {("/x", "GET", "anonymous", "ok"): 1}


def ambiguous_varargs(*args: Any) -> Any:
    return None


def one_parameter(scope: Any) -> Any:
    return None


def four_parameters(a: Any, b: Any, c: Any, d: Any) -> Any:
    return None


class ASGI2App:
    """An ASGI 2 (double-callable) application: a class instantiated with the scope."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        return None


@pytest.mark.parametrize(
    "app",
    [
        pytest.param(ambiguous_varargs, id="*args only"),
        pytest.param(one_parameter, id="one parameter"),
        pytest.param(four_parameters, id="four parameters"),
        pytest.param(ASGI2App, id="a class (ASGI 2 double callable)"),
        pytest.param(42, id="not callable"),
    ],
)
def test_ambiguous_callables_raise_a_clear_config_error(app: Any) -> None:
    with pytest.raises(ConfigError, match=r"protocol=|WSGI or ASGI"):
        wrap(app, registry=CollectorRegistry(), log_startup=False)


@pytest.mark.parametrize(
    ("protocol", "cls"), [("wsgi", WSGIMiddleware), ("asgi", ASGIMiddleware)]
)
def test_protocol_option_forces_the_middleware(protocol: str, cls: type) -> None:
    # An ambiguous callable is accepted once the protocol is stated.
    wrapped = wrap(ambiguous_varargs, protocol=protocol, registry=CollectorRegistry())
    assert type(wrapped) is cls


def test_protocol_from_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_PROTOCOL", "asgi")
    wrapped = wrap(ambiguous_varargs, registry=CollectorRegistry(), log_startup=False)
    assert isinstance(wrapped, ASGIMiddleware)


def test_forced_protocol_beats_detection() -> None:
    # A WSGI-looking callable forced to ASGI gets the ASGI middleware: the option is obeyed.
    wrapped = wrap(bare_wsgi.app, protocol="asgi", registry=CollectorRegistry())
    assert isinstance(wrapped, ASGIMiddleware)


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown memwatch option 'max_route'"):
        wrap(bare_wsgi.app, max_route=5)


def test_wrap_takes_a_config_object() -> None:
    config = memwatch.Config(max_routes=3, log_startup=False)
    wrapped = wrap(bare_wsgi.app, config=config, registry=CollectorRegistry())
    assert wrapped.config is config
    assert wrapped.monitor.routes.max_routes == 3


def test_wrap_registers_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    wrapped = wrap(bare_wsgi.app, registry=registry, log_startup=False)
    wsgi_request(wrapped, "/status/200")
    assert (
        registry.get_sample_value(
            "memwatch_requests_total",
            {"route": "/status/{id}", "method": "GET", "auth": "anonymous", "outcome": "ok"},
        )
        == 1.0
    )


def test_public_names() -> None:
    for name in ("wrap", "WSGIMiddleware", "ASGIMiddleware", "Config", "ConfigError"):
        assert name in memwatch.__all__
        assert hasattr(memwatch, name)


def _marked_two_parameter_function() -> Any:
    from asgiref.sync import markcoroutinefunction

    def handler(scope: Any, receive: Any) -> Any:  # pragma: no cover - never called
        return None

    return markcoroutinefunction(handler)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: wsgi_function,
        lambda: asgi_function,
        WSGIObject,
        ASGIObject,
        SyncASGIObject,
        lambda: functools.partial(asgi_function),
        _marked_two_parameter_function,
        lambda: django_app.asgi_handler(),
        lambda: starlette_app.create_app(),
    ],
)
def test_coroutine_test_agrees_with_asgiref(factory: Any) -> None:
    # detect_protocol no longer imports asgiref (and asyncio) for its one test: it must give
    # asgiref's answer on the callable and on its __call__, markers included
    from asgiref.sync import iscoroutinefunction

    app = factory()
    for candidate in (app, getattr(app, "__call__", None)):  # noqa: B004
        assert memwatch._iscoroutinefunction(candidate) == iscoroutinefunction(candidate)


def test_a_marked_coroutine_function_is_asgi() -> None:
    assert detect_protocol(_marked_two_parameter_function()) == "asgi"


_LAZY_PROBE = """
import json, sys
import memwatch

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

def call(wrapped, path, method="GET"):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "REMOTE_ADDR": "127.0.0.1", "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.input": None, "wsgi.url_scheme": "http"}
    status = []
    body = b"".join(wrapped(environ, lambda s, h, e=None: status.append(s)))
    return status[0], body

wrapped = memwatch.wrap(app, log_startup=False)
for _ in range(50):
    call(wrapped, "/hello")
call(wrapped, "/metrics")
loaded = {"start": sorted(m for m in sys.modules if m.split(".")[0] in
                          ("memwatch", "asyncio", "asgiref"))}
status, _ = call(wrapped, "/memwatch/report.json")
loaded["report_status"] = status
loaded["after_report"] = sorted(m for m in sys.modules if m.startswith("memwatch"))
print(json.dumps(loaded))
"""


def test_report_renderers_and_holder_search_are_imported_on_first_use() -> None:
    # GIVEN a fresh interpreter that wraps a WSGI app, serves requests and one scrape
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _LAZY_PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    # THEN the report model, its renderers, the holder search, asyncio and asgiref are not
    # loaded (memwatch's own memory: docs/performance.md)
    for name in ("memwatch.report", "memwatch.html", "memwatch.holders", "asyncio", "asgiref"):
        assert name not in loaded["start"]
    # AND the first report request imports what it needs and answers
    assert loaded["report_status"].startswith("200")
    assert {"memwatch.report", "memwatch.advice"} <= set(loaded["after_report"])
