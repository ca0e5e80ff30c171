"""A Flask app with the routes memwatch's tests need: templates, a blueprint, auth outcomes,
an exception, a streamed body and a path that carries a secret."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Flask, Response, abort, request, stream_with_context

import memwatch


class AppError(RuntimeError):
    """Raised by ``/boom``: tests check that this very object reaches the server."""


# One entry per close() of a /closing response (Werkzeug runs call_on_close callbacks there).
CLOSE_CALLS: list[str] = []


def create_app(*, propagate: bool = True) -> Flask:
    """The Flask app. ``propagate`` sets ``PROPAGATE_EXCEPTIONS`` (True: ``/boom`` raises to the
    server, as in Flask's testing mode; False: Flask answers 500 itself)."""
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = propagate

    @app.get("/")
    def index() -> str:
        return "index"

    @app.get("/reports/<int:rid>")
    def report(rid: int) -> dict[str, int]:
        return {"rid": rid}

    @app.route("/status/<int:code>", methods=["GET", "POST"])
    def status(code: int) -> Response:
        return Response(f"status {code}", status=code)

    @app.get("/secure")
    def secure() -> str:
        # A protected resource: 401 without credentials, 403 for the "forbidden" one.
        if request.headers.get("X-Deny") == "403":
            abort(403)
        if request.headers.get("X-Deny") == "401":
            abort(401)
        return "granted"

    @app.get("/boom")
    def boom() -> str:
        raise AppError("boom from the Flask view")

    @app.get("/stream/<int:chunks>")
    def stream(chunks: int) -> Response:
        def generate() -> Iterator[bytes]:
            for i in range(chunks):
                yield b"chunk-%06d\n" % i

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.get("/closing/<int:chunks>")
    def closing(chunks: int) -> Response:
        response = Response((b"part-%d;" % i for i in range(chunks)), mimetype="text/plain")
        path = request.path
        response.call_on_close(lambda: CLOSE_CALLS.append(path))
        return response

    @app.get("/reset/<token>")
    def reset(token: str) -> str:
        return "reset requested"

    @app.get("/echo-headers")
    def echo_headers() -> dict[str, str | None]:
        return {
            "authorization": request.headers.get("Authorization"),
            "cookie": request.headers.get("Cookie"),
        }

    api = Blueprint("api", __name__, url_prefix="/api/v2")

    @api.get("/items/<name>")
    def item(name: str) -> dict[str, str]:
        return {"name": name}

    @api.get("/items/<int:iid>/parts/<path:rest>")
    def part(iid: int, rest: str) -> dict[str, str]:
        return {"rest": rest}

    app.register_blueprint(api)
    return app


def wrapped() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    """The Flask app wrapped by memwatch, for ``gunicorn 'tests.apps.flask_app:wrapped()'``."""
    return memwatch.wrap(create_app(propagate=False))
