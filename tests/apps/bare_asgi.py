"""An ASGI application without a framework (memwatch normalises its paths).

Same paths as :mod:`tests.apps.bare_wsgi`; ``/stream/<n>`` sends ``n`` body messages with
``more_body=True`` and a final empty one.
"""

from __future__ import annotations

from typing import Any

import memwatch


class AppError(RuntimeError):
    """Raised by ``/boom``."""


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    path: str = scope["path"]
    parts = path.strip("/").split("/")
    headers = [(b"content-type", b"text/plain")]
    if parts[0] == "status" and len(parts) == 2:
        code = int(parts[1])
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": b"status %d" % code})
        return
    if path == "/boom":
        raise AppError("boom from the bare ASGI app")
    if parts[0] == "stream" and len(parts) == 2:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(int(parts[1])):
            await send(
                {"type": "http.response.body", "body": b"chunk-%06d\n" % i, "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path == "/echo":
        seen = {name: value for name, value in scope["headers"]}
        body = repr((seen.get(b"authorization"), seen.get(b"cookie"))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(app)
