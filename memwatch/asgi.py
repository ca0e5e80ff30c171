"""ASGI middleware: watches every HTTP request of an ASGI application.

Usage::

    import memwatch
    app = memwatch.wrap(app)                      # Starlette, FastAPI, Django's ASGI handler
    app.add_middleware(memwatch.ASGIMiddleware)   # or inside a Starlette/FastAPI app

The response is observed by wrapping ``send``: the status from ``http.response.start``, the end
when the app returns. Nothing per request is kept on ``self``. ``lifespan`` and ``websocket``
scopes pass straight through. The app's exceptions propagate unchanged; memwatch's own failures
are caught and counted.
"""

from __future__ import annotations

import functools
import typing as t

from memwatch.config import Config
from memwatch.core import Memwatch
from memwatch.endpoints import INTERNAL_ERROR, EndpointRequest, EndpointResponse
from memwatch.routes import ROUTE_KEY, UNMATCHED, install_route_hooks, starlette_template

if t.TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from prometheus_client import CollectorRegistry

    from memwatch._types import ASGIApp, Message, Receive, Scope, Send
    from memwatch.attribution import Probe
    from memwatch.diagnosis import Tag
    from memwatch.monitor import LeakCallback
    from memwatch.signals import Signals

_FORWARD_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


class _Sender(t.Protocol):
    """The ``send`` the compiled fast path hands to the app (``memwatch._speedups.StatusSend``):
    it keeps the response's status and records the request when finished."""

    def __call__(self, message: Message) -> Awaitable[None]: ...

    def failed(self) -> None: ...

    def finish(self) -> None: ...


_ASGIFast: t.Any
_AsyncCall: t.Any
try:
    from memwatch._speedups import ASGIFast as _ASGIFast
    from memwatch._speedups import AsyncCall as _AsyncCall
except ImportError:  # not built: every request takes the Python path
    _ASGIFast = None
    _AsyncCall = None


def _python_only(scope: Scope, send: Send) -> _Sender | None:
    return None


def _compiled_call(func: t.Any) -> t.Any:
    """``memwatch._speedups.AsyncCall(func)`` dressed as ``func``: the same name, signature and
    code object (whose coroutine flag is what ``inspect.iscoroutinefunction`` reads)."""
    call = _AsyncCall(func)
    functools.update_wrapper(call, func)
    call.__code__ = func.__code__
    call.__defaults__ = func.__defaults__
    call.__kwdefaults__ = func.__kwdefaults__
    return call


# The compiled base (memwatch/_speedups.c) keeps `app` and `_fast` in slots, which the
# compiled __call__ reads at every request; without it, ASGIMiddleware is plain Python.
if t.TYPE_CHECKING:
    from memwatch._speedups import ASGIBase as _CompiledBase
else:
    try:
        from memwatch._speedups import ASGIBase as _CompiledBase
    except ImportError:  # not built: the pure-Python path

        class _CompiledBase:  # an empty base (object itself would break the MRO)
            pass


class ASGIMiddleware(_CompiledBase):
    """Wraps an ASGI 3 application.

    :param app: The ASGI application.
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
        app: ASGIApp,
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
        self.config = config or (memwatch.config if memwatch else Config.from_env(**options))
        self.memwatch = memwatch or Memwatch(
            self.config, registry=registry, signals=signals, on_leak=on_leak, on_clear=on_clear
        )
        self.monitor = self.memwatch.monitor
        self._endpoints = self.memwatch.endpoints
        self._classify = self.monitor.auth.from_scope
        self._metrics_path = self._endpoints.metrics_path
        self._report_path = self._endpoints.report_path
        self._enabled = self.config.enabled
        self.framework = install_route_hooks(app) if self._enabled else None
        self._enter: Callable[[Scope, Send], _Sender | None] = _python_only
        # The compiled fast path; __call__ (memwatch._speedups.AsyncCall) reads it from here.
        self._fast: t.Any = None
        if _ASGIFast is not None:
            self._fast = _ASGIFast(
                monitor=self.monitor,
                metrics_path=self._metrics_path,
                report_path=self._report_path,
                finish=self.finish,
                # A 404 without a template is "__unmatched__" when a framework routes.
                unmatched=self.framework is not None,
                fast=self._enabled and self.config.speedups,
            )
            self._enter = self._fast.enter
        if self._enabled:
            self.memwatch.log_startup(app, "ASGI")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The common request: numbered, observed and recorded by the compiled fast path
        # (memwatch._speedups.ASGIFast); None hands the request to the Python path.
        sender = self._enter(scope, send)
        if sender is None:
            await self._call_python(scope, receive, send)
            return
        try:
            await self.app(scope, receive, sender)
        except Exception:
            sender.failed()
            raise
        finally:
            sender.finish()

    if not t.TYPE_CHECKING and _AsyncCall is not None:
        # The same coroutine, stepped in C: no frame and no coroutine object per request. The
        # descriptor carries the function's code and names, so inspect and asyncio (and the
        # servers that ask them) see a coroutine function; it calls the function above for
        # anything but a middleware with its compiled fast path.
        __call__ = _compiled_call(__call__)

    async def _call_python(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The whole request in Python: lifespan and websocket scopes, memwatch's own paths,
        diagnosis windows, and every request without the compiled module or with
        ``speedups=False``."""
        if scope["type"] != "http" or not self._enabled:
            await self.app(scope, receive, send)
            return
        path = scope.get("path") or "/"
        # Endpoints.handles(), inlined: this runs on every request.
        if path == self._metrics_path or path.startswith(self._report_path):
            response = self._respond(scope)
            if response is not None:
                await _send_response(send, response)
                return
        monitor = self.monitor
        try:
            entry = monitor.request_entry()
        except Exception as exc:
            monitor.errors.record("asgi.entry", exc)
            entry = None
        root_path = scope.get("root_path") or ""
        status = 0
        tag = self._tag(scope) if monitor.diagnosis.window is not None else None

        # A plain function that returns the server's awaitable, not a coroutine function:
        # ``await send_status(message)`` then costs one call, not a coroutine object and a
        # frame per message (two messages per response at least).
        def send_status(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            if tag is None:
                await self.app(scope, receive, send_status)
            else:  # a diagnosis window: call through the request's trampoline
                await tag.asgi(self.app, scope, receive, send_status)
        except Exception:
            status = 500
            raise
        finally:
            self.finish(scope, status or 500, entry, root_path, tag)

    def _tag(self, scope: Scope) -> Tag | None:
        try:
            auth, credential = self.monitor.auth.from_scope(scope)
            return self.monitor.window_tag(
                scope.get("path") or "/", scope.get("method") or "GET", auth, credential
            )
        except Exception as exc:
            self.monitor.errors.record("asgi.tag", exc)
            return None

    def finish(
        self,
        scope: Scope,
        status: int,
        entry: Probe | None,
        root_path: str,
        tag: Tag | None = None,
    ) -> None:
        """Records a finished request. Never raises."""
        label: tuple[str, str, str] | None = None
        try:
            monitor = self.monitor
            path = None
            template = scope.get(ROUTE_KEY) or starlette_template(scope, root_path)
            if template is None:
                if status == 404 and (self.framework is not None or "app" in scope):
                    template = UNMATCHED
                else:
                    path = scope.get("path") or "/"
            if entry is None and tag is None:
                # The fast path: classified, fingerprinted and queued in one call (in C when
                # built), counted at the next drain.
                monitor.recorder.record_scope(scope, template, path, status)
            else:
                auth, credential = self._classify(scope)
                label = monitor.record_measured(
                    template,
                    path,
                    scope.get("method") or "GET",
                    auth,
                    status,
                    monitor.fingerprint(credential) if credential else None,
                    entry,
                )
        except Exception as exc:
            self.monitor.errors.record("asgi.finish", exc)
        finally:
            if tag is not None:
                tag.window.release(tag, label)

    def _respond(self, scope: Scope) -> EndpointResponse | None:
        try:
            authorization = accept = None
            hops: list[str] = []
            other_forwarding = False
            for name, value in scope.get("headers") or ():
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                elif name == b"accept":
                    accept = value.decode("latin-1")
                elif name == b"x-forwarded-for":
                    hops.append(value.decode("latin-1"))  # several lines form one list
                elif name in _FORWARD_HEADERS:
                    other_forwarding = True
            # Only X-Forwarded-For is read; any other forwarding header fails closed.
            forwarded = ",".join(hops) if hops else ("unknown" if other_forwarding else None)
            client = scope.get("client")
            request = EndpointRequest(
                method=scope.get("method") or "GET",
                path=scope.get("path") or "/",
                client=client[0] if client else None,
                authorization=authorization,
                forwarded_for=forwarded,
                query=bytes(scope.get("query_string") or b"").decode("latin-1"),
            )
            return self._endpoints.respond(request, accept)
        except Exception as exc:
            self.monitor.errors.record("asgi.endpoint", exc)
            return INTERNAL_ERROR  # not handed to the app: the request may carry our token


async def _send_response(send: Send, response: EndpointResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
