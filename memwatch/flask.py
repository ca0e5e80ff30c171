"""Flask extension: ``memwatch.wrap()`` in the shape Flask users expect.

Usage::

    from memwatch.flask import Memwatch

    app = Flask(__name__)
    app.config["MEMWATCH"] = {"max_routes": 500}   # optional; Config fields, lower case
    Memwatch(app)

    # or, with an application factory
    memwatch_ext = Memwatch(on_leak=page_someone)

    def create_app():
        app = Flask(__name__)
        memwatch_ext.init_app(app)
        return app

``init_app`` wraps ``app.wsgi_app`` with :class:`memwatch.WSGIMiddleware` (``app`` stays a
Flask object) and registers the extension as ``app.extensions["memwatch"]``. Options: the
``MEMWATCH_*`` environment variables, then ``app.config["MEMWATCH"]``, then the keyword arguments
given to the extension (the later win).
"""

from __future__ import annotations

import typing as t

from memwatch.wsgi import WSGIMiddleware

if t.TYPE_CHECKING:
    from flask import Flask


class Memwatch:
    """memwatch for a Flask application.

    :param app: The application; or call :meth:`init_app` later.
    :param options: Any :class:`memwatch.Config` field, and ``registry=``, ``signals=``,
        ``on_leak=``, ``on_clear=`` as for :class:`memwatch.WSGIMiddleware`.
    """

    def __init__(self, app: Flask | None = None, **options: t.Any) -> None:
        self.options = options
        self.middleware: WSGIMiddleware | None = None  # the latest app's
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "memwatch" in app.extensions or isinstance(app.wsgi_app, WSGIMiddleware):
            raise RuntimeError(f"memwatch is already watching the Flask app {app.name!r}")
        options = {**(app.config.get("MEMWATCH") or {}), **self.options}
        middleware = WSGIMiddleware(app.wsgi_app, **options)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions["memwatch"] = self
        self.middleware = middleware
