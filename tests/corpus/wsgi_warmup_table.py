"""CLEAN: a bare WSGI catalogue service whose lookup table fills during warm-up, then stays flat.

``GET /products/{id}`` loads product cards page by page (ten products a page) into ``_CARDS`` on a
miss. The catalogue has 1,000 products, so the table fills within the first ~1,500 requests (it
holds 1,000 cards, about 1 MB) and never grows again. Served by gunicorn gthread (4 threads).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import memwatch
from tests.corpus import common

CATALOGUE_SIZE = 1000
PAGE = 10
_CARDS: dict[int, dict[str, Any]] = {}
_LOCK = threading.Lock()


def _load_page(first: int) -> None:
    cards = {
        pid: {
            "id": pid,
            "name": f"Product {pid} - stainless steel widget, size {pid % 7}",
            "description": f"A widget for every purpose. Batch {pid * 31 % 1000:03d}." * 4,
            "price_cents": 199 + pid * 7 % 5000,
            "tags": [f"tag-{pid % 11}", f"tag-{pid % 13}", "widget"],
        }
        for pid in range(first, min(first + PAGE, CATALOGUE_SIZE + 1))
    }
    with _LOCK:
        _CARDS.update(cards)


def _card(pid: int) -> dict[str, Any] | None:
    if not 1 <= pid <= CATALOGUE_SIZE:
        return None
    card = _CARDS.get(pid)
    if card is None:
        _load_page(pid - (pid - 1) % PAGE)
        card = _CARDS[pid]
    return card


def _json(start_response: Any, status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO") or "/"
    method = environ.get("REQUEST_METHOD") or "GET"
    parts = path.strip("/").split("/")
    if parts[0] == "products" and len(parts) == 2 and parts[1].isdigit():
        card = _card(int(parts[1]))
        if card is None:
            return _json(start_response, "404 Not Found", {"error": "no such product"})
        return _json(start_response, "200 OK", card)
    if path == "/cart":
        if not common.session_valid(common.session_from_cookie(environ.get("HTTP_COOKIE"))):
            return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
        return _json(start_response, "200 OK", {"items": 4})
    if path == "/orders" and method == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        token = common.bearer_of(environ.get("HTTP_AUTHORIZATION"))
        if token is None or common.decode_token(token) is None:
            return _json(start_response, "401 Unauthorized", {"error": "unauthorized"})
        return _json(start_response, "201 Created", {"order": "placed"})
    if path == "/health":
        return _json(start_response, "200 OK", {"ok": True})
    return _json(start_response, "404 Not Found", {"error": "not found"})


app = memwatch.wrap(application)
