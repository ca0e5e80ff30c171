"""A Starlette app: typed path parameters, a mounted Starlette sub-app, a mounted plain ASGI
app, every outcome, a streamed body, a websocket echo and lifespan flags."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

import memwatch


class AppError(RuntimeError):
    """Raised by ``/boom``."""


async def plain_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app, mounted under ``/plain``."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})


async def index(request: Request) -> Response:
    return PlainTextResponse("index")


async def order(request: Request) -> Response:
    return JSONResponse({"order_id": request.path_params["order_id"]})


async def thing(request: Request) -> Response:
    return JSONResponse({"tid": request.path_params["tid"]})


async def status(request: Request) -> Response:
    code = request.path_params["code"]
    return PlainTextResponse(f"status {code}", status_code=code)


async def secure(request: Request) -> Response:
    deny = request.headers.get("x-deny")
    if deny in ("401", "403"):
        return PlainTextResponse("denied", status_code=int(deny))
    return PlainTextResponse("granted")


async def boom(request: Request) -> Response:
    raise AppError("boom from the Starlette endpoint")


async def stream(request: Request) -> Response:
    chunks = request.path_params["chunks"]

    async def generate() -> AsyncIterator[bytes]:
        for i in range(chunks):
            yield b"chunk-%06d\n" % i

    return StreamingResponse(generate(), media_type="text/plain")


async def reset(request: Request) -> Response:
    return PlainTextResponse("reset requested")


async def echo_headers(request: Request) -> Response:
    # The raw bytes the app saw, hex-encoded, so any byte survives the round trip.
    seen = {
        name.decode("latin-1"): value.hex()
        for name, value in request.scope["headers"]
        if name in (b"authorization", b"cookie")
    }
    return JSONResponse(seen)


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close(code=1000)
            return
        await websocket.send_text("echo:" + text)


def create_app(*, state: dict[str, bool] | None = None) -> Starlette:
    """The app; ``state`` (if given) records lifespan ``startup`` and ``shutdown``."""
    flags = state if state is not None else {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        flags["startup"] = True
        yield
        flags["shutdown"] = True

    sub = Starlette(routes=[Route("/things/{tid}", thing)])
    return Starlette(
        routes=[
            Route("/", index),
            Route("/orders/{order_id:int}", order),
            Route("/status/{code:int}", status, methods=["GET", "POST"]),
            Route("/secure", secure),
            Route("/boom", boom),
            Route("/stream/{chunks:int}", stream),
            Route("/reset/{token}", reset),
            Route("/echo-headers", echo_headers),
            WebSocketRoute("/ws", echo),
            Mount("/v1", app=sub),
            Mount("/plain", app=plain_asgi),
        ],
        lifespan=lifespan,
    )


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    """For ``uvicorn --factory tests.apps.starlette_app:wrapped``."""
    return memwatch.wrap(create_app())
