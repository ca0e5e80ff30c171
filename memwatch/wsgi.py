"""WSGI middleware: watches every request of a WSGI application.

Usage::

    import memwatch
    app.wsgi_app = memwatch.wrap(app.wsgi_app)          # Flask
    application = memwatch.wrap(get_wsgi_application())  # Django, in wsgi.py

The response is never buffered: the app's iterable is handed to the server as it is, inside a thin
wrapper whose ``close()`` (called by the server once the body is sent, PEP 3333) forwards to the
app's ``close()`` exactly once and then records the request. The app's exceptions propagate
unchanged; memwatch's own failures are caught and counted, and the request goes on.
"""

from __future__ import annotations

import inspect
import typing as t
from collections.abc import Iterable, Iterator

from memwatch.config import Config
from memwatch.core import Memwatch
from memwatch.endpoints import INTERNAL_ERROR, EndpointRequest, EndpointResponse
from memwatch.routes import ROUTE_KEY, UNMATCHED, install_route_hooks

if t.TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from memwatch._types import Environ, ExcInfo, Headers, StartResponse, WSGIApp
    from memwatch.attribution import Probe
    from memwatch.diagnosis import Tag
    from memwatch.monitor import LeakCallback
    from memwatch.signals import Signals


class EnvironRecorder:
    """Records requests described by a WSGI environ, and serves memwatch's endpoints for them.

    The WSGI middleware is one; Django's middleware (:mod:`memwatch.django`) is the other: its
    ``request.META`` is the WSGI environ under WSGI and is built with the same keys under ASGI.
    Labels (route, method, auth, outcome) are therefore computed here, once, for both.

    :param memwatch: The instance whose monitor and endpoints are used.
    :param framework: The framework whose route templates arrive in ``environ[ROUTE_KEY]``;
        when set, a 404 without a template counts as ``__unmatched__``.
    """

    kind = "wsgi"  # prefix of this recorder's internal-error counters

    def __init__(self, memwatch: Memwatch, framework: str | None) -> None:
        self.memwatch = memwatch
        self.config = memwatch.config
        self.monitor = memwatch.monitor
        self._endpoints = memwatch.endpoints
        self._classify = self.monitor.auth.from_environ
        self._metrics_path = self._endpoints.metrics_path
        self._report_path = self._endpoints.report_path
        self.framework = framework

    def tag_request(self, environ: Environ) -> Tag | None:
        """The request's trampoline while a diagnosis window runs. Never raises."""
        try:
            auth, credential = self.monitor.auth.from_environ(environ)
            return self.monitor.window_tag(
                environ.get("PATH_INFO") or "/",
                environ.get("REQUEST_METHOD") or "GET",
                auth,
                credential,
            )
        except Exception as exc:
            self.monitor.errors.record(self.kind + ".tag", exc)
            return None

    def finish(
        self, environ: Environ, status: str | None, entry: Probe | None, tag: Tag | None = None
    ) -> None:
        """Records a finished request. Never raises."""
        label: tuple[str, str, str] | None = None
        try:
            monitor = self.monitor
            path = None
            template = environ.get(ROUTE_KEY)
            if template is None:
                if self.framework is not None and status and status[:3] == "404":
                    template = UNMATCHED
                else:
                    path = environ.get("PATH_INFO") or "/"
            if entry is None and tag is None:
                # The fast path: classified, fingerprinted and queued in one call (in C when
                # built), counted at the next drain.
                monitor.recorder.record_environ(environ, template, path, status)
            else:
                auth, credential = self._classify(environ)
                label = monitor.record_measured(
                    template,
                    path,
                    environ.get("REQUEST_METHOD") or "GET",
                    auth,
                    status,
                    monitor.fingerprint(credential) if credential else None,
                    entry,
                )
        except Exception as exc:
            self.monitor.errors.record(self.kind + ".finish", exc)
        finally:
            if tag is not None:
                tag.window.release(tag, label)

    def respond(self, environ: Environ) -> EndpointResponse | None:
        """memwatch's answer for a request to one of its paths; a 500 if rendering failed (the
        request is not handed to the app: it may carry memwatch's token)."""
        try:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR")
            if forwarded is None and (
                "HTTP_FORWARDED" in environ or "HTTP_X_REAL_IP" in environ
            ):
                forwarded = "unknown"  # forwarded, but not in a form we read: fail closed
            request = EndpointRequest(
                method=environ.get("REQUEST_METHOD") or "GET",
                path=environ.get("PATH_INFO") or "/",
                client=environ.get("REMOTE_ADDR"),
                authorization=environ.get("HTTP_AUTHORIZATION"),
                forwarded_for=forwarded,
                query=environ.get("QUERY_STRING") or "",
            )
            return self._endpoints.respond(request, environ.get("HTTP_ACCEPT"))
        except Exception as exc:
            self.monitor.errors.record(self.kind + ".endpoint", exc)
            return INTERNAL_ERROR


# The compiled base (memwatch/_speedups.c) serves the common request in C and hands every other
# one to the Python methods below; without it, WSGIMiddleware is plain Python.
if t.TYPE_CHECKING:
    from memwatch._speedups import WSGIBase as _CompiledBase

    _COMPILED: bool
else:
    try:
        from memwatch._speedups import WSGIBase as _CompiledBase

        _COMPILED = True
    except ImportError:  # not built: the pure-Python path

        class _CompiledBase:  # an empty base (object itself would break the MRO)
            pass

        _COMPILED = False


class _CallSignature:
    """``__signature__`` of the instances: ``(environ, start_response)``, what the compiled
    ``__call__`` (a slot, whose signature inspect cannot read) takes. Tools that tell WSGI from
    ASGI by the parameters (asgiref, memwatch.detect_protocol) read it. The class itself keeps
    its constructor's signature (AttributeError on the class sends inspect the usual way)."""

    _signature = inspect.Signature(
        [
            inspect.Parameter("environ", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("start_response", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ]
    )

    def __get__(self, instance: object, owner: type | None = None) -> inspect.Signature:
        if instance is None:
            raise AttributeError("__signature__")
        return self._signature


class WSGIMiddleware(_CompiledBase, EnvironRecorder):
    """Wraps a WSGI application.

    :param app: The WSGI application.
    :param config: A :class:`memwatch.Config`; by default built from ``MEMWATCH_*`` variables
        and ``options``.
    :param registry: A prometheus_client registry to add memwatch's collector to.
    :param signals: Readings source (a seam for tests).
    :param memwatch: Share an existing :class:`memwatch.core.Memwatch` instance.
    :param on_leak: Called as ``on_leak(monitor, verdict)`` when a leak is first suspected.
    :param on_clear: Called as ``on_clear(monitor, verdict)`` when it clears.
    :param options: Any :class:`memwatch.Config` field, as a keyword.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        config: Config | None = None,
        registry: CollectorRegistry | None = None,
        signals: Signals | None = None,
        memwatch: Memwatch | None = None,
        on_leak: LeakCallback | None = None,
        on_clear: LeakCallback | None = None,
        **options: t.Any,
    ) -> None:
        self.app = app
        config = config or (memwatch.config if memwatch else Config.from_env(**options))
        memwatch = memwatch or Memwatch(
            config, registry=registry, signals=signals, on_leak=on_leak, on_clear=on_clear
        )
        self._enabled = config.enabled
        EnvironRecorder.__init__(
            self,
            memwatch,
            install_route_hooks(app, compiled=config.speedups) if self._enabled else None,
        )
        if _COMPILED:
            self._wsgi_setup(
                self._metrics_path,
                self._report_path,
                self.framework is not None,
                self._enabled and config.speedups,
            )
        if self._enabled:
            self.memwatch.log_startup(app, "WSGI")

    def _call_python(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """The whole request in Python: ``__call__`` without the compiled base, and what the
        compiled base hands over (memwatch's own paths, ``speedups=False``, unusual environs)."""
        if not self._enabled:
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO") or "/"
        # Endpoints.handles(), inlined: this runs on every request.
        if path == self._metrics_path or path.startswith(self._report_path):
            served = self._serve(environ, start_response)
            if served is not None:
                return served
        try:
            entry = self.monitor.request_entry()
        except Exception as exc:
            self.monitor.errors.record("wsgi.entry", exc)
            entry = None
        return self._respond(environ, start_response, entry)

    if not t.TYPE_CHECKING:
        if _COMPILED:
            __signature__ = _CallSignature()
        else:  # no compiled base: requests start in Python
            __call__ = _call_python

    def _respond(
        self, environ: Environ, start_response: StartResponse, entry: Probe | None
    ) -> Iterable[bytes]:
        """The request from its entry on, in Python: measured requests, diagnosis windows, and
        every request without the compiled base."""
        response = _Response(self, environ, start_response, entry)
        if self.monitor.diagnosis.window is not None:
            response.tag = self.tag_request(environ)
        try:
            if response.tag is None:
                result = self.app(environ, response.start_response)
            else:  # a diagnosis window: call through the request's trampoline
                result = response.tag.wsgi(self.app, environ, response.start_response)
        except BaseException:
            response.status = "500"
            response.close()
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            # Keep the server's zero-copy path (sendfile): count the request now.
            response.finish()
            return result
        response.iterable = result
        return response

    def _serve(self, environ: Environ, start_response: StartResponse) -> list[bytes] | None:
        response = self.respond(environ)
        if response is None:
            return None
        start_response(response.status_line, response.headers)
        return [response.body]


_NO_ENVIRON: Environ = {}  # a closed response's environ (never written to)


def _closed_start_response(
    status: str, headers: Headers, exc_info: ExcInfo | None = None
) -> t.Callable[[bytes], object]:
    raise RuntimeError("start_response called after the response was closed")


class _Response:
    """The app's response iterable, passed through untouched, with a ``close()`` that records."""

    __slots__ = (
        "_environ",
        "_middleware",
        "_start_response",
        "closed",
        "entry",
        "iterable",
        "status",
        "tag",
    )

    def __init__(
        self,
        middleware: WSGIMiddleware,
        environ: Environ,
        start_response: StartResponse,
        entry: Probe | None,
    ) -> None:
        self._middleware = middleware
        self._environ = environ
        self._start_response = start_response
        self.entry = entry
        self.status: str | None = None
        self.iterable: Iterable[bytes] = ()
        self.closed = False
        self.tag: Tag | None = None

    def start_response(
        self, status: str, headers: Headers, exc_info: ExcInfo | None = None
    ) -> t.Callable[[bytes], object]:
        self.status = status
        return self._start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        # A body that fails half-way was a 200 at start_response: the failure makes it a server
        # error, as on ASGI. A plain loop, not ``yield from``: closing this generator must not
        # close the app's iterator a second time (close() forwards the app's close() once).
        try:
            for chunk in self.iterable:  # noqa: UP028 - see above: not yield from
                yield chunk
        except Exception:
            self.status = "500"
            raise

    def finish(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._middleware.finish(self._environ, self.status, self.entry, self.tag)
            finally:
                # Servers and test drivers often keep the response in a closure that the
                # start_response callable captures: without these references nothing of the
                # request can form a cycle through memwatch (cyclic garbage waits for the
                # collector and looks like growth).
                self.iterable = ()
                self._environ = _NO_ENVIRON
                self._start_response = _closed_start_response

    def close(self) -> None:
        if self.closed:
            return
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        finally:
            self.finish()
