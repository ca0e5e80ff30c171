"""A bare WSGI service that leaks on one route, for the multi-worker Prometheus test.

Served by gunicorn with several workers (``tests.apps.leaky_multiworker:wrapped()``); every
route uses a different auth scheme, so that each dashboard panel has something to show:

- ``GET /orders/<n>`` with a Bearer token: LEAK. Each request appends an audit record (a dict
  and a string of about 250 bytes, 500 bytes or so in all) to the module-level :data:`AUDIT`
  list, which nothing ever trims.
- ``GET /items/<n>`` with Basic auth: answers without keeping anything.
- ``GET /private`` without credentials: 401 (the ``rejected`` outcome).
- ``GET /health``, anonymous: ``ok``.
"""

from __future__ import annotations

import itertools
import typing as t
from collections.abc import Iterable

import memwatch

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

# The leak: one record per /orders request, kept for the life of the worker.
AUDIT: list[dict[str, object]] = []
_SEQUENCE = itertools.count()


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ.get("PATH_INFO") or "/"
    authorization: str = environ.get("HTTP_AUTHORIZATION", "")
    if path.startswith("/orders/"):
        n = next(_SEQUENCE)
        AUDIT.append({"n": n, "path": path, "line": f"order {n} viewed at {path} " + "." * 200})
        body = b"order"
    elif path.startswith("/items/"):
        body = b"item"
    elif path == "/private" and not authorization:
        start_response("401 Unauthorized", [("Content-Type", "text/plain")])
        return [b"unauthorized"]
    else:
        body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(app)
