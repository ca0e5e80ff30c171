"""The applications the benchmark harnesses serve under real servers, bare and wrapped.

Factories for gunicorn (``bench_apps:flask_wrapped()``) and uvicorn (``--factory
bench_apps:starlette_wrapped``); the harnesses put ``benchmarks/`` on ``PYTHONPATH``. Wrapped
apps take memwatch's options from ``MEMWATCH_*`` variables, as ``memwatch.wrap`` does.

- ``flask_*`` and ``starlette_*``: the JSON endpoint of the in-process harness
  (``/items/<int:item_id>``, ``/items/{item_id:int}``).
- ``cardinality_*``: a bare WSGI app that answers any path with the status asked for in the query
  string (``?s=401``), so that a client can fill every (route, auth, outcome) label set.
- ``/debug/memory`` on every app, answered by a thin layer outside memwatch (bare and wrapped
  alike, so that memwatch still sees the framework's app as it is): the process's resident set
  size and Python heap blocks after a full collection.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import common
import inprocess

import memwatch


def memory_report() -> dict[str, Any]:
    gc.collect()
    with open("/proc/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"pid": os.getpid(), "rss_bytes": rss, "heap_blocks": sys.getallocatedblocks()}


def _with_debug_wsgi(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def debug(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/debug/memory":
            body = json.dumps(memory_report()).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        return app(environ, start_response)

    return debug


def _with_debug_asgi(app: Callable[..., Any]) -> Callable[..., Any]:
    async def debug(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/debug/memory":
            body = json.dumps(memory_report()).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return debug


def flask_bare() -> Any:
    return _with_debug_wsgi(inprocess.make_flask_app().wsgi_app)


def flask_wrapped() -> Any:
    return _with_debug_wsgi(memwatch.wrap(inprocess.make_flask_app().wsgi_app))


def starlette_bare() -> Any:
    return _with_debug_asgi(inprocess.make_starlette_app())


def starlette_wrapped() -> Any:
    return _with_debug_asgi(memwatch.wrap(inprocess.make_starlette_app()))


def cardinality_bare() -> Any:
    return _with_debug_wsgi(common.cardinality_app)


def cardinality_wrapped() -> Any:
    return _with_debug_wsgi(memwatch.wrap(common.cardinality_app))
