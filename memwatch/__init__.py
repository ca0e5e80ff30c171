"""memwatch: find memory leaks in running Python web services.

One line wraps any WSGI or ASGI application::

    import memwatch
    app = memwatch.wrap(app)

memwatch then counts requests by route template, method, auth scheme and outcome, samples the
process's memory cheaply, and serves Prometheus metrics at ``/metrics`` and a report at
``/memwatch/`` (loopback or token). See README.md and docs/.
"""

from __future__ import annotations

import inspect
import sys
import typing as t

from memwatch.asgi import ASGIMiddleware
from memwatch.config import Config, ConfigError
from memwatch.core import Memwatch, open_window
from memwatch.wsgi import WSGIMiddleware

__version__ = "0.1.0"
__all__ = [
    "ASGIMiddleware",
    "Config",
    "ConfigError",
    "Memwatch",
    "WSGIMiddleware",
    "__version__",
    "detect_protocol",
    "diagnose",
    "wrap",
]


def detect_protocol(app: object) -> t.Literal["wsgi", "asgi"]:
    """Tells a WSGI callable from an ASGI 3 one, the way asgiref inspects callables.

    A coroutine function (or an object whose ``__call__`` is one) is ASGI; otherwise the number
    of required positional parameters decides: two (environ, start_response) is WSGI, three (scope,
    receive, send) is ASGI. Anything else is ambiguous: pass ``protocol=`` explicitly.
    """
    call = getattr(app, "__call__", None)  # noqa: B004 - we want the method, not callable()
    if call is None:
        raise ConfigError(f"memwatch.wrap() needs a WSGI or ASGI callable, got {app!r}")
    # Before the coroutine test: a class's __call__ is its instances' method, so an ASGI 2 class
    # with an async __call__ would otherwise pass for an ASGI 3 callable.
    if inspect.isclass(app):
        raise ConfigError(
            f"{app!r} is a class: for an ASGI 2 (double-callable) application wrap "
            "asgiref.compatibility.guarantee_single_callable(app); for anything else pass "
            "protocol='wsgi' or protocol='asgi'"
        )
    if _iscoroutinefunction(app) or _iscoroutinefunction(call):
        return "asgi"
    try:
        # Required parameters only: a WSGI app with an optional third parameter is still WSGI.
        params = [
            p
            for p in inspect.signature(app).parameters.values()  # type: ignore[arg-type]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) == 2:
        return "wsgi"
    if len(params) == 3:
        return "asgi"
    raise ConfigError(
        f"cannot tell whether {app!r} is a WSGI or an ASGI application; "
        "pass protocol='wsgi' or protocol='asgi' (or set MEMWATCH_PROTOCOL)"
    )


def _iscoroutinefunction(func: object) -> bool:
    """``asgiref.sync.iscoroutinefunction`` without importing asgiref and asyncio (about 1.7 MB
    that a WSGI process would otherwise hold for one test at start-up).

    asgiref's test is ``inspect.iscoroutinefunction`` on Python 3.12 and later (which sees
    ``inspect.markcoroutinefunction``'s marker), and ``asyncio.iscoroutinefunction`` before: the
    same, or the function carries ``asyncio.coroutines._is_coroutine`` (which asgiref's and
    asyncio's own markers set). No object can carry that marker before asyncio is loaded.
    """
    if inspect.iscoroutinefunction(func):
        return True
    marker = getattr(sys.modules.get("asyncio.coroutines"), "_is_coroutine", None)
    return marker is not None and getattr(func, "_is_coroutine", None) is marker


def diagnose(reason: str = "on demand", *, force: bool = False) -> int:
    """Opens a diagnosis window in every memwatch instance of this process.

    Returns how many windows were opened. An instance already in a window is left alone, and
    so is one whose duty-cycle pause after a previous window is still running (an INFO log line
    says for how long): on-demand windows keep to ``diagnosis_duty_cycle`` too, except an
    instance's first one, which always opens. ``force=True`` opens a window in spite of the
    pause. The results appear in the report (``sites``, route attribution) once the window has
    finished.
    """
    from memwatch.monitor import all_monitors

    return sum(1 for monitor in all_monitors() if open_window(monitor, reason, force=force)[0])


def wrap(
    app: t.Any, *, config: Config | None = None, **options: t.Any
) -> WSGIMiddleware | ASGIMiddleware:
    """Wraps a WSGI or ASGI application; the protocol is detected unless ``protocol=`` says.

    :param app: The application (Flask app or its ``wsgi_app``, Django handler, Starlette or
        FastAPI app, any WSGI or ASGI 3 callable).
    :param config: A :class:`Config`; by default built from ``MEMWATCH_*`` environment variables
        and the keyword ``options``.
    :param options: ``registry=``, ``signals=``, ``on_leak=`` and ``on_clear=`` for the
        middleware (see :class:`WSGIMiddleware`), or any :class:`Config` field.
    """
    extra = {
        k: options.pop(k) for k in ("registry", "signals", "on_leak", "on_clear") if k in options
    }
    cfg = config or Config.from_env(**options)
    protocol = cfg.protocol if cfg.protocol != "auto" else detect_protocol(app)
    if protocol == "asgi":
        return ASGIMiddleware(app, config=cfg, **extra)
    return WSGIMiddleware(app, config=cfg, **extra)
