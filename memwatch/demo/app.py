"""The demo service: a small Flask API with two real leaks and one bounded cache.

- ``GET /api/profile`` (Bearer): decodes the token's payload and caches it in a module-level dict
  keyed by the token, never evicted: one entry per distinct token (the seed pattern of a
  Django-style token cache). Growth follows distinct credentials.
- ``GET /reports/<int:rid>`` (Basic): an audit hook appends every decoded user name, with the
  time and the path, to a module-level list "for metrics". Growth follows requests.
- ``GET /search`` (API key): a ``functools.lru_cache(maxsize=128)`` keyed by the query: bounded,
  must never alert.
- ``GET /health`` (anonymous).

Run it under any WSGI server: ``gunicorn memwatch.demo.app:app``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import time
from typing import Any

from flask import Flask, Response, abort, jsonify, request

import memwatch

app = Flask("memwatch_demo")

TOKEN_CACHE: dict[str, dict[str, Any]] = {}
AUDIT_LOG: list[dict[str, Any]] = []


def _decode_token(token: str) -> dict[str, Any]:
    payload = token.split(".")[1] if token.count(".") == 2 else token
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        abort(401)
    if not isinstance(data, dict):
        abort(401)
    return data


@app.get("/api/profile")
def profile() -> Response:
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("bearer "):
        abort(401)
    token = header[7:]
    claims = TOKEN_CACHE.get(token)
    if claims is None:
        claims = TOKEN_CACHE[token] = _decode_token(token)  # leak: never evicted
    return jsonify(user=claims.get("sub"), scopes=claims.get("scopes", []))


@app.before_request
def audit_basic_auth() -> None:
    auth = request.authorization
    if auth is not None and auth.type == "basic" and request.path.startswith("/reports/"):
        # leak: an ever-growing audit trail kept in memory "for metrics"
        AUDIT_LOG.append({"user": auth.username, "path": request.path, "at": time.time()})


@app.get("/reports/<int:rid>")
def report(rid: int) -> Response:
    if request.authorization is None:
        abort(401)
    return jsonify(id=rid, rows=[rid * i for i in range(10)])


@functools.lru_cache(maxsize=128)
def _search(query: str) -> list[str]:
    return [f"{query}-{i}" for i in range(20)]


@app.get("/search")
def search() -> Response:
    if not request.headers.get("X-API-Key"):
        abort(401)
    return jsonify(results=_search(request.args.get("q", "")))


@app.get("/health")
def health() -> Response:
    return jsonify(ok=True)


app.wsgi_app = memwatch.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
