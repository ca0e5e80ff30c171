"""The Flask reporting API shared by two corpus cases that differ only in how Basic auth is done.

:mod:`tests.corpus.flask_basic_audit` (leaks: every decoded credential is appended to a global
list) and :mod:`tests.corpus.flask_basic_lru` (clean: a bounded ``functools.lru_cache``) build the
same app with :func:`create_app`, so that the same traffic runs against both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Flask, Response, jsonify, request

from tests.corpus import common

# (user, password, route) -> the user's profile, or None when the credential is wrong.
Authenticate = Callable[[str, str], "dict[str, Any] | None"]


def create_app(authenticate: Authenticate, *, audited: set[str]) -> Flask:
    """The app. ``authenticate`` checks a Basic credential; ``audited`` names the endpoints
    whose logins are also recorded "for metrics" (through :data:`ON_AUDITED_LOGIN`)."""
    app = Flask("corpus_reports")

    def basic_auth(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            parsed = common.parse_basic(request.headers.get("Authorization"))
            profile = authenticate(*parsed) if parsed else None
            if profile is None:
                return Response("unauthorized", 401, {"WWW-Authenticate": 'Basic realm="reports"'})
            if view.__name__ in audited and ON_AUDITED_LOGIN is not None:
                ON_AUDITED_LOGIN(parsed[0], parsed[1])  # type: ignore[index]
            return view(profile, *args, **kwargs)

        return guarded

    @app.get("/reports/<int:rid>")
    @basic_auth
    def report(profile: dict[str, Any], rid: int) -> Response:
        return jsonify(
            {
                "id": rid,
                "owner": profile["user"],
                "rows": [[rid, i, rid * i % 97] for i in range(6)],
            }
        )

    @app.get("/reports")
    @basic_auth
    def reports(profile: dict[str, Any]) -> Response:
        return jsonify({"owner": profile["user"], "reports": list(range(10))})

    @app.get("/api/items/<int:item_id>")
    def item(item_id: int) -> Response:
        token = common.bearer_of(request.headers.get("Authorization"))
        if token is None or common.decode_token(token) is None:
            return Response("unauthorized", 401)
        return jsonify({"id": item_id, "name": f"item {item_id}", "stock": item_id % 13})

    @app.post("/api/items")
    def create_item() -> Response:
        if not common.api_key_valid(request.headers.get("X-Api-Key")):
            return Response("unauthorized", 401)
        payload = request.get_json(silent=True) or {}
        return jsonify({"created": True, "name": str(payload.get("name", ""))[:40]}), 201

    @app.get("/dashboard")
    def dashboard() -> Response:
        if not common.session_valid(common.session_from_cookie(request.headers.get("Cookie"))):
            return Response("unauthorized", 401)
        return jsonify({"widgets": ["sales", "traffic", "alerts"]})

    @app.get("/health")
    def health() -> str:
        return "ok"

    return app


# Set by the leaking case; None for the clean one.
ON_AUDITED_LOGIN: Callable[[str, str], None] | None = None
