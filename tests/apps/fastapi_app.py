"""A FastAPI app: path parameters, ``include_router(prefix=...)`` and a mounted FastAPI sub-app."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response

import memwatch


class AppError(RuntimeError):
    """Raised by ``/boom``."""


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    @app.get("/secure")
    async def secure(request: Request) -> dict[str, str]:
        deny = request.headers.get("x-deny")
        if deny in ("401", "403"):
            raise HTTPException(status_code=int(deny))
        return {"access": "granted"}

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return PlainTextResponse(f"status {code}", status_code=code)

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise AppError("boom from the FastAPI endpoint")

    router = APIRouter()

    @router.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"item_id": item_id}

    @router.get("/items/{item_id}/tags/{tag}")
    async def tag(item_id: str, tag: str) -> dict[str, str]:
        return {"tag": tag}

    app.include_router(router, prefix="/api")

    # Nested routers, each with its own prefix: /v2 + /outer + /inner + /leaf/{leaf_id}.
    outer = APIRouter(prefix="/outer")
    inner = APIRouter()

    @inner.get("/leaf/{leaf_id}")
    async def leaf(leaf_id: int) -> dict[str, int]:
        return {"leaf_id": leaf_id}

    outer.include_router(inner, prefix="/inner")
    app.include_router(outer, prefix="/v2")

    sub = FastAPI()

    @sub.get("/things/{tid}")
    async def thing(tid: int) -> dict[str, int]:
        return {"tid": tid}

    sub_router = APIRouter()

    @sub_router.get("/deep/{did}")
    async def deep(did: str) -> dict[str, str]:
        return {"did": did}

    sub.include_router(sub_router, prefix="/r")

    app.mount("/sub", sub)
    return app


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(create_app())
