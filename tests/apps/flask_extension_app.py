"""The Flask app of :mod:`tests.apps.flask_app` with memwatch as a Flask extension, options in
``app.config["MEMWATCH"]``: ``gunicorn 'tests.apps.flask_extension_app:create()'``."""

from __future__ import annotations

from flask import Flask

from memwatch.flask import Memwatch
from tests.apps import flask_app


def create() -> Flask:
    app = flask_app.create_app(propagate=False)
    app.config["MEMWATCH"] = {"max_routes": 100}
    Memwatch(app)
    return app
