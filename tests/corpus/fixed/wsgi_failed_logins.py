"""FIXED twin of tests.corpus.wsgi_failed_logins: failed attempts in a deque(maxlen=...).

The fix is ``FAILED_LOGINS`` below.

The original's docstring:

LEAK on a rejection path: a bare WSGI login service that keeps every failed attempt.

``POST /login`` (basic) answers 401 to a wrong password and appends a record of the attempt (a
dict of seven fields, one of them a dict of request headers: about 700 bytes) to
``FAILED_LOGINS`` "for the security team", which nothing ever trims. Successful logins keep
nothing. The failed attempts come mostly from a few stale
service credentials retried over and over, so the growth follows rejected requests, not distinct
credentials.

No framework: memwatch labels routes with normalised paths (``/accounts/{id}``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import memwatch
from tests.corpus import common

FAILED_LOGINS: deque[dict[str, Any]] = deque(maxlen=100)


def _json(
    start_response: Any, status: str, body: Any, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))] + (extra or []),
    )
    return [data]


def _read_body(environ: dict[str, Any]) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return environ["wsgi.input"].read(length) if length else b""


def login(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    _read_body(environ)
    parsed = common.parse_basic(environ.get("HTTP_AUTHORIZATION"))
    if parsed is None or not common.basic_valid(*parsed):
        FAILED_LOGINS.append(
            {
                "user": parsed[0] if parsed else None,
                "at": time.time(),
                "ip": environ.get("REMOTE_ADDR"),
                "agent": environ.get("HTTP_USER_AGENT"),
                "reason": "bad password" if parsed else "malformed credentials",
                "request_id": environ.get("HTTP_X_REQUEST_ID"),
                "headers": {
                    "accept": environ.get("HTTP_ACCEPT"),
                    "content-type": environ.get("CONTENT_TYPE"),
                    "content-length": environ.get("CONTENT_LENGTH"),
                },
            }
        )
        return _json(
            start_response,
            "401 Unauthorized",
            {"error": "invalid credentials"},
            [("WWW-Authenticate", 'Basic realm="login"')],
        )
    return _json(start_response, "200 OK", {"user": parsed[0], "session": "ok"})


def account(environ: dict[str, Any], start_response: Any, account_id: int, sub: str) -> list[bytes]:
    token = common.bearer_of(environ.get("HTTP_AUTHORIZATION"))
    claims = common.decode_token(token) if token else None
    if claims is None:
        return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
    if sub == "statements":
        rows = [{"month": m, "balance": (account_id * m) % 1000} for m in range(1, 7)]
        return _json(start_response, "200 OK", {"account": account_id, "statements": rows})
    return _json(start_response, "200 OK", {"account": account_id, "owner": claims["sub"]})


def refresh(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    _read_body(environ)
    if not common.session_valid(common.session_from_cookie(environ.get("HTTP_COOKIE"))):
        return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
    return _json(start_response, "200 OK", {"refreshed": True})


def status(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    return _json(start_response, "200 OK", {"status": "up"})


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    method = environ.get("REQUEST_METHOD") or "GET"
    if path == "/login" and method == "POST":
        return login(environ, start_response)
    if path == "/session/refresh" and method == "POST":
        return refresh(environ, start_response)
    if path == "/status":
        return status(environ, start_response)
    parts = path.strip("/").split("/")
    if parts[0] == "accounts" and len(parts) in (2, 3) and parts[1].isdigit():
        sub = parts[2] if len(parts) == 3 else ""
        if sub in ("", "statements"):
            return account(environ, start_response, int(parts[1]), sub)
    return _json(start_response, "404 Not Found", {"error": "not found"})


app = memwatch.wrap(application)
