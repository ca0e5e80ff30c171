"""FIXED twin of tests.corpus.starlette_background_tasks: finished tasks leave the set.

The fix is the ``add_done_callback`` below.

The original's docstring:

LEAK under asyncio: a Starlette order service that keeps fire-and-forget tasks in a set.

``POST /orders/{order_id:int}`` (bearer) starts a background task to "send the receipt" and adds
it to ``_BACKGROUND`` so that it is not garbage-collected mid-flight (the asyncio docs' advice),
but forgets the ``task.add_done_callback(_BACKGROUND.discard)`` half: every finished task (its
coroutine, its result, its context) stays in the set. ``GET`` on the same route keeps nothing.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import memwatch
from tests.corpus import common

_BACKGROUND: set[asyncio.Task[dict[str, object]]] = set()


async def _send_receipt(order_id: int, customer: str) -> dict[str, object]:
    await asyncio.sleep(0)
    return {"order": order_id, "customer": customer, "channel": "email", "status": "sent"}


def _customer(request: Request) -> str | None:
    token = common.bearer_of(request.headers.get("authorization"))
    claims = common.decode_token(token) if token else None
    return None if claims is None else str(claims["sub"])


async def order(request: Request) -> Response:
    customer = _customer(request)
    if customer is None:
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    order_id = request.path_params["order_id"]
    if request.method == "POST":
        await request.body()
        task = asyncio.create_task(_send_receipt(order_id, customer))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        return JSONResponse({"order": order_id, "state": "placed"}, status_code=201)
    return JSONResponse({"order": order_id, "state": "shipped", "customer": customer})


async def products(request: Request) -> Response:
    return JSONResponse({"products": [{"sku": f"SKU-{i}", "price": i * 4} for i in range(10)]})


async def cart(request: Request) -> Response:
    if not common.session_valid(common.session_from_cookie(request.headers.get("cookie"))):
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    return JSONResponse({"items": 1, "total": 9})


async def ping(request: Request) -> Response:
    return JSONResponse({"pong": True})


starlette_app = Starlette(
    routes=[
        Route("/orders/{order_id:int}", order, methods=["GET", "POST"]),
        Route("/products", products),
        Route("/cart", cart),
        Route("/ping", ping),
    ]
)
app = memwatch.wrap(starlette_app)
