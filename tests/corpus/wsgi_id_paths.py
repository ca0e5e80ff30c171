"""CLEAN: a bare WSGI API whose paths carry ids from a large range (``/users/48213/orders``).

Nothing is kept between requests. With no framework, memwatch labels each request by normalising
its raw path (``/users/{id}/orders``); almost every raw path is new, which exercises whatever
memwatch keeps per distinct path. The app itself holds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import memwatch
from tests.corpus import common


def _json(start_response: Any, status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    parts = path.strip("/").split("/")
    if parts[0] == "users" and len(parts) in (2, 3) and parts[1].isdigit():
        token = common.bearer_of(environ.get("HTTP_AUTHORIZATION"))
        if token is None or common.decode_token(token) is None:
            return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
        user = int(parts[1])
        if len(parts) == 3 and parts[2] == "orders":
            orders = [{"id": user * 10 + i, "total": (user + i) % 400} for i in range(4)]
            return _json(start_response, "200 OK", {"user": user, "orders": orders})
        if len(parts) == 2:
            return _json(start_response, "200 OK", {"id": user, "name": f"user {user}"})
    if parts[0] == "orders" and len(parts) == 2 and parts[1].isdigit():
        if not common.api_key_valid(environ.get("HTTP_X_API_KEY")):
            return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
        return _json(start_response, "200 OK", {"id": int(parts[1]), "state": "paid"})
    if path == "/health":
        return _json(start_response, "200 OK", {"ok": True})
    return _json(start_response, "404 Not Found", {"error": "not found"})


app = memwatch.wrap(application)
