"""``memwatch run -- COMMAND``: watch a server's application without changing its code.

::

    memwatch run -- gunicorn myapp:app --workers 4
    memwatch run -- uvicorn myapp:app
    memwatch run -- python -m gunicorn myapp.wsgi:application

In the spirit of ``ddtrace-run`` and ``opentelemetry-instrument``: ``memwatch run`` puts
``memwatch/bootstrap`` first on ``PYTHONPATH`` and replaces itself with the command (``exec``:
the command keeps the process, its signals and its exit status). The bootstrap's
``sitecustomize`` makes gunicorn and uvicorn pass the application they load through
:func:`watch`, once per loaded application:

- gunicorn: ``BaseApplication.wsgi()``, which every worker (or the arbiter, with
  ``preload_app``) calls to load the app, sync, threaded, async and ASGI workers alike;
- uvicorn: ``Config.load_app()``, in each worker process; an app factory (``--factory``) is
  wrapped so that the app it returns is watched.

Options come from the ``MEMWATCH_*`` environment variables. An application that memwatch
already watches (``memwatch.wrap()``, the Flask extension, ``add_middleware``, the Django
middleware in ``settings.MIDDLEWARE``) is left as it is.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

BOOTSTRAP_DIR = Path(__file__).resolve().with_name("bootstrap")
_PATCHED = "__memwatch_patched__"
_DJANGO_MIDDLEWARE = "memwatch.django.MemwatchMiddleware"

Protocol = Literal["auto", "wsgi", "asgi"]

# id(app) -> (app, its middleware): a server may load the same app object more than once
# (uvicorn's main() loads it to check the import string, then Config.load() loads it again);
# it gets one middleware, hence one monitor, per process.
_watched: dict[int, tuple[Any, Any]] = {}
_watched_lock = threading.Lock()


def command_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the bootstrap directory first on ``PYTHONPATH`` (once)."""
    env = dict(environ)
    bootstrap = str(BOOTSTRAP_DIR)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap]
    env["PYTHONPATH"] = os.pathsep.join([bootstrap, *rest])
    return env


def run(command: Sequence[str]) -> int:
    """Replaces this process with ``command`` under the bootstrap; returns only on failure."""
    argv = list(command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "memwatch run: no command given; usage: memwatch run -- gunicorn myapp:app",
            file=sys.stderr,
        )
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, command_environment(os.environ))
    except OSError as exc:
        print(f"memwatch run: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126


# --- what the bootstrap calls once the server is imported ------------------------------------


def already_watched(app: Any) -> bool:
    """True when memwatch already watches ``app`` by one of its other integrations."""
    from memwatch.asgi import ASGIMiddleware
    from memwatch.wsgi import WSGIMiddleware

    if isinstance(app, (WSGIMiddleware, ASGIMiddleware)):
        return True
    try:
        extensions = getattr(app, "extensions", None)  # Flask: the extension, or wsgi_app wrapped
        if isinstance(extensions, dict) and "memwatch" in extensions:
            return True
        if isinstance(getattr(app, "wsgi_app", None), WSGIMiddleware):
            return True
        for middleware in getattr(app, "user_middleware", None) or ():  # Starlette, FastAPI
            if getattr(middleware, "cls", None) is ASGIMiddleware:
                return True
        if type(app).__module__.startswith("django."):
            from django.conf import settings

            return _DJANGO_MIDDLEWARE in (getattr(settings, "MIDDLEWARE", None) or ())
    except Exception:  # an app whose attributes misbehave: it is not one of ours
        return False
    return False


def _is_factory(app: Any) -> bool:
    if not (inspect.isfunction(app) or inspect.ismethod(app)):
        return False
    parameters = inspect.signature(app).parameters.values()
    return not any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in parameters
    )


def _factory(create: Callable[..., Any], protocol: Protocol, server: str) -> Callable[..., Any]:
    @functools.wraps(create)
    def create_watched(*args: Any, **kwargs: Any) -> Any:
        return watch(create(*args, **kwargs), protocol=protocol, server=server)

    return create_watched


def watch(app: Any, *, protocol: Protocol = "auto", factory: bool = False, server: str) -> Any:
    """The application a server loaded, watched by memwatch (or as it was, if it is already).

    :param protocol: What the server says the app speaks; ``auto`` detects it.
    :param factory: ``app`` is a factory of the application (uvicorn's ``--factory``).
    :param server: The server's name, for the start-up line.
    :raises memwatch.ConfigError: for a bad ``MEMWATCH_*`` value: the server fails to start,
        as it would with ``memwatch.wrap()`` in the code.
    """
    if factory:
        return _factory(app, protocol, server)
    with _watched_lock:
        known = _watched.get(id(app))
        if known is not None and known[0] is app:
            return known[1]
        watched = _watch(app, protocol, server)
        _watched[id(app)] = (app, watched)
        return watched


def _watch(app: Any, protocol: Protocol, server: str) -> Any:
    if already_watched(app):
        return app
    from memwatch import ASGIMiddleware, Config, ConfigError, WSGIMiddleware, detect_protocol

    config = Config.from_env()
    if not config.enabled:
        return app
    if protocol == "auto":
        protocol = config.protocol
    if protocol == "auto":
        try:
            protocol = detect_protocol(app)
        except ConfigError as exc:
            if _is_factory(app):  # uvicorn calls a factory even without --factory
                return _factory(app, "auto", server)
            print(f"memwatch run: {exc}; the application is not watched", file=sys.stderr)
            return app
    middleware: WSGIMiddleware | ASGIMiddleware
    if protocol == "asgi":
        middleware = ASGIMiddleware(app, config=config)
    else:
        middleware = WSGIMiddleware(app, config=config)
    name = getattr(app, "__qualname__", type(app).__qualname__)
    print(
        f"memwatch run: watching {name} ({protocol.upper()}) under {server} in process "
        f"{os.getpid()}; metrics at {config.metrics_path or '(off)'}, report at "
        f"{config.report_path}",
        file=sys.stderr,
        flush=True,
    )
    return middleware


def patch_gunicorn(module: ModuleType) -> None:
    """Makes ``gunicorn.app.base.BaseApplication.wsgi()`` return the app watched."""
    base = module.BaseApplication
    original = base.wsgi
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def wsgi(self: Any) -> Any:
        app = original(self)
        watched = watch(app, server="gunicorn")
        self.callable = watched  # what wsgi() hands out from now on
        return watched

    setattr(wsgi, _PATCHED, True)
    base.wsgi = wsgi


_UVICORN_PROTOCOL: dict[str, Protocol] = {"auto": "auto", "asgi3": "asgi", "wsgi": "wsgi"}


def patch_uvicorn(module: ModuleType) -> None:
    """Makes ``uvicorn.config.Config.load_app()`` return the app (or factory) watched."""
    config_class = module.Config
    original = getattr(config_class, "load_app", None)
    if original is None:
        print(
            "memwatch run: this uvicorn has no Config.load_app(); the application is not "
            "watched (wrap it with memwatch.wrap() instead)",
            file=sys.stderr,
        )
        return
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def load_app(self: Any) -> Any:
        app = original(self)
        protocol = _UVICORN_PROTOCOL.get(str(getattr(self, "interface", "auto")))
        if protocol is None:  # asgi2: a double-callable memwatch does not wrap
            print(
                "memwatch run: ASGI 2 applications are not watched; wrap "
                "asgiref.compatibility.guarantee_single_callable(app) with memwatch.wrap()",
                file=sys.stderr,
            )
            return app
        return watch(app, protocol=protocol, factory=bool(self.factory), server="uvicorn")

    setattr(load_app, _PATCHED, True)
    config_class.load_app = load_app
