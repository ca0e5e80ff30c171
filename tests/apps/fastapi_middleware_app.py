"""The FastAPI app of :mod:`tests.apps.fastapi_app` with memwatch added the Starlette way,
``app.add_middleware(memwatch.ASGIMiddleware, ...)``: ``uvicorn --factory
tests.apps.fastapi_middleware_app:create``."""

from __future__ import annotations

from fastapi import FastAPI

import memwatch
from tests.apps import fastapi_app


def create() -> FastAPI:
    app = fastapi_app.create_app()
    app.add_middleware(memwatch.ASGIMiddleware, max_routes=100)
    return app
