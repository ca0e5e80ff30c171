"""A WSGI application without a framework (no route templates: memwatch normalises paths).

- ``/status/<code>``: answers with that status.
- ``/boom``: raises :class:`AppError`.
- ``/stream/<n>``: a generator body of ``n`` chunks.
- ``/closing/<n>``: a body object that counts its ``close()`` calls (:data:`CLOSE_CALLS`).
- ``/late-start``: a generator that calls ``start_response`` on first iteration.
- ``/echo``: the Authorization and Cookie headers echoed back (what the app saw).
- anything else: ``200 ok`` with the path in the body.
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Iterator

import memwatch

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


class AppError(RuntimeError):
    """Raised by ``/boom``."""


class ClosingBody:
    """A response body that records how often the server (through memwatch) closes it."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.close_calls = 0

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self.chunks):
            yield b"part-%d;" % i

    def close(self) -> None:
        self.close_calls += 1


# The bodies handed out by /closing/<n>, newest last, for tests to inspect (cleared by tests).
BODIES: list[ClosingBody] = []


def _chunks(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield b"chunk-%06d\n" % i


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ.get("PATH_INFO") or "/"
    parts = path.strip("/").split("/")
    if parts[0] == "status" and len(parts) == 2:
        code = int(parts[1])
        start_response(f"{code} Status", [("Content-Type", "text/plain")])
        return [b"status %d" % code]
    if path == "/boom":
        raise AppError("boom from the bare WSGI app")
    if parts[0] == "stream" and len(parts) == 2:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _chunks(int(parts[1]))
    if parts[0] == "closing" and len(parts) == 2:
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = ClosingBody(int(parts[1]))
        BODIES.append(body)
        return body
    if path == "/late-start":

        def late() -> Iterator[bytes]:
            start_response("201 Created", [("Content-Type", "text/plain")])
            yield b"late"

        return late()
    if path == "/echo":
        body = repr(
            (environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_COOKIE"))
        ).encode("utf-8", "surrogateescape")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(app)
