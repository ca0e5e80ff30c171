"""FIXED twin of tests.corpus.starlette_export_buffers: recent exports in a deque(maxlen=...).

The fix is ``_RECENT_EXPORTS`` below.

The original's docstring:

LEAK of large buffers: a Starlette export service that keeps every rendered export.

``GET /exports/{export_id:int}`` (apikey) renders a 64 KiB CSV export as ``bytes`` and appends it
to ``_RECENT_EXPORTS`` ("so that a retry can be served from memory"), which nothing trims. A
64 KiB object bypasses pymalloc: the Python heap-block count barely moves (one list slot per
request), while RSS (and glibc's heap) grow by 64 KiB per request on that route.
"""

from __future__ import annotations

from collections import deque

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import memwatch
from tests.corpus import common

EXPORT_BYTES = 64 * 1024
_RECENT_EXPORTS: deque[bytes] = deque(maxlen=16)


def _render_export(export_id: int) -> bytes:
    line = f"{export_id},widget,{export_id % 97},EUR,2026-11-23\n".encode()
    rows = line * (EXPORT_BYTES // len(line) + 1)
    return rows[:EXPORT_BYTES]


def _unauthorized() -> Response:
    return JSONResponse({"error": "unauthorized"}, status_code=401)


async def export(request: Request) -> Response:
    if not common.api_key_valid(request.headers.get("x-api-key")):
        return _unauthorized()
    export_id = request.path_params["export_id"]
    data = _render_export(export_id)
    _RECENT_EXPORTS.append(data)
    return Response(data[:512], media_type="text/csv")  # a preview; the full file is "mailed"


async def export_status(request: Request) -> Response:
    if not common.api_key_valid(request.headers.get("x-api-key")):
        return _unauthorized()
    return JSONResponse({"id": request.path_params["export_id"], "state": "done"})


async def invoices(request: Request) -> Response:
    token = common.bearer_of(request.headers.get("authorization"))
    if token is None or common.decode_token(token) is None:
        return _unauthorized()
    return JSONResponse({"invoices": [{"id": i, "amount": i * 11 % 500} for i in range(10)]})


async def settings_page(request: Request) -> Response:
    if not common.session_valid(common.session_from_cookie(request.headers.get("cookie"))):
        return _unauthorized()
    return JSONResponse({"theme": "dark", "locale": "en"})


async def ping(request: Request) -> Response:
    return JSONResponse({"pong": True})


starlette_app = Starlette(
    routes=[
        Route("/exports/{export_id:int}", export),
        Route("/exports/{export_id:int}/status", export_status),
        Route("/invoices", invoices),
        Route("/settings", settings_page),
        Route("/ping", ping),
    ]
)
app = memwatch.wrap(starlette_app)
