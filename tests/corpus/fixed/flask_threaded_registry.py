"""FIXED twin of tests.corpus.flask_threaded_registry: ``Registry.items`` is a deque(maxlen=...).

The fix is ``Registry.items`` below.

The original's docstring:

LEAK under threads: a Flask event API, served by gunicorn gthread (4 threads), that registers

every received event in a class attribute.

``POST /api/events`` (apikey) appends a dict describing the event (about 900 bytes with its
strings) to ``Registry.items``, a class-level list shared by all threads and never trimmed. The
three other routes keep nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, ClassVar

from flask import Flask, Response, jsonify, request

import memwatch
from tests.corpus import common


class Registry:
    """Known events, "for deduplication" (the lookup was never written)."""

    items: ClassVar[deque[dict[str, Any]]] = deque(maxlen=128)
    lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def register(cls, event: dict[str, Any]) -> None:
        with cls.lock:
            cls.items.append(event)


flask_app = Flask("corpus_events")


@flask_app.post("/api/events")
def create_event() -> Any:
    if not common.api_key_valid(request.headers.get("X-Api-Key")):
        return Response("unauthorized", 401)
    payload = request.get_json(silent=True) or {}
    Registry.register(
        {
            "kind": str(payload.get("kind", "unknown")),
            "source": str(payload.get("source", "")),
            "received_at": time.time(),
            "thread": threading.current_thread().name,
            "request_id": request.headers.get("X-Request-Id", ""),
            "agent": request.headers.get("User-Agent", ""),
            "size": request.content_length or 0,
        }
    )
    return jsonify({"accepted": True}), 202


@flask_app.get("/api/events/<int:event_id>")
def get_event(event_id: int) -> Any:
    if not common.api_key_valid(request.headers.get("X-Api-Key")):
        return Response("unauthorized", 401)
    return jsonify({"id": event_id, "kind": "click", "count": event_id % 17})


@flask_app.get("/api/users/me")
def me() -> Any:
    token = common.bearer_of(request.headers.get("Authorization"))
    claims = common.decode_token(token) if token else None
    if claims is None:
        return Response("unauthorized", 401)
    return jsonify({"user": claims["sub"], "roles": claims["roles"]})


@flask_app.get("/healthz")
def healthz() -> str:
    return "ok"


app = memwatch.wrap(flask_app)
