"""Bare WSGI and ASGI apps for the concurrency tests (tests/integration/test_concurrency.py).

Besides plain routes, each has a *rendezvous* route that answers only once ``n`` requests of the
same round are inside the app at the same time, which proves that the server really ran them
concurrently through memwatch (a rendezvous that times out answers 503, so a test fails on its
status rather than hang):

- ``GET /meet/<round>/<n>``: waits for ``n`` requests of ``<round>`` (threads or tasks).
- ``GET /work/<i>``: builds and drops a little garbage, answers 200.
- ``GET /status/<code>``: answers with that status.

Factories (each wraps a fresh app): :func:`wsgi`, :func:`asgi`, and ``*_diagnosing`` variants
that keep diagnosis windows running back to back (tracemalloc on, requests called through
per-route trampolines) while the load runs.
"""

from __future__ import annotations

import asyncio
import threading
import typing as t
from collections.abc import Iterable
from typing import Any

import memwatch

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

RENDEZVOUS_TIMEOUT = 20.0

# Windows back to back, each over a few hundred requests, for the whole run.
DIAGNOSING = {
    "diagnosis": "always",
    "warmup_requests": 200,
    "diagnosis_duty_cycle": 1.0,
    "diagnosis_requests": 300,
    "diagnosis_seconds": 5.0,
}

_barriers: dict[str, threading.Barrier] = {}
_barriers_lock = threading.Lock()


def _work(i: int) -> bytes:
    garbage = [{"i": i, "s": str(i) * 8} for _ in range(20)]
    return b"work %d" % len(garbage)


def _parts(path: str) -> list[str]:
    return path.strip("/").split("/")


def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    parts = _parts(environ.get("PATH_INFO") or "/")
    status, body = "200 OK", b"ok"
    if parts[0] == "meet" and len(parts) == 3:
        with _barriers_lock:
            barrier = _barriers.setdefault(parts[1], threading.Barrier(int(parts[2])))
        try:
            barrier.wait(timeout=RENDEZVOUS_TIMEOUT)
            body = b"met"
        except threading.BrokenBarrierError:
            status, body = "503 Service Unavailable", b"rendezvous timed out"
    elif parts[0] == "work" and len(parts) == 2:
        body = _work(int(parts[1]))
    elif parts[0] == "status" and len(parts) == 2:
        status = f"{int(parts[1])} Status"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _Rendezvous:
    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.event = asyncio.Event()

    async def meet(self) -> bool:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.event.set()
        try:
            await asyncio.wait_for(self.event.wait(), RENDEZVOUS_TIMEOUT)
        except asyncio.TimeoutError:
            return False
        return True


_rendezvous: dict[str, _Rendezvous] = {}


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    parts = _parts(scope["path"])
    status, body = 200, b"ok"
    if parts[0] == "meet" and len(parts) == 3:
        rendezvous = _rendezvous.setdefault(parts[1], _Rendezvous(int(parts[2])))
        if await rendezvous.meet():
            body = b"met"
        else:
            status, body = 503, b"rendezvous timed out"
    elif parts[0] == "work" and len(parts) == 2:
        await asyncio.sleep(0)
        body = _work(int(parts[1]))
    elif parts[0] == "status" and len(parts) == 2:
        status = int(parts[1])
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wsgi() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(wsgi_app)


def wsgi_diagnosing() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(wsgi_app, **DIAGNOSING)


def asgi() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(asgi_app)


def asgi_diagnosing() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(asgi_app, **DIAGNOSING)

