"""Django middleware: memwatch from ``settings.py``, without touching ``wsgi.py`` or ``asgi.py``.

Usage, first in ``MIDDLEWARE`` so that it sees every request and answers its own paths before
any other middleware (authentication, CSRF) does::

    MIDDLEWARE = [
        "memwatch.django.MemwatchMiddleware",
        ...
    ]
    MEMWATCH = {"max_routes": 500, "token": env("MEMWATCH_TOKEN")}  # optional

``MEMWATCH`` keys are :class:`memwatch.Config` fields (lower case); they win over the
``MEMWATCH_*`` environment variables. ``on_leak`` and ``on_clear`` may be callables or dotted
paths to them. The middleware runs synchronously under WSGI and natively under ASGI; labels are
the same as with ``memwatch.wrap(get_wsgi_application())``: it records through the WSGI
middleware's :class:`~memwatch.wsgi.EnvironRecorder`, since ``request.META`` is a WSGI environ
(under ASGI, Django builds it with the same keys). The route template is
``request.resolver_match.route``, read when the response comes back. The request is recorded
then, before a streamed body is sent (``wrap()`` records once the server has sent the body).

Django may build several handlers, hence several middleware instances, in one process; they share
one :class:`memwatch.core.Memwatch` (one monitor per process, as the memory is the process's).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.http import HttpResponse
from django.utils.module_loading import import_string

from memwatch.config import Config
from memwatch.core import Memwatch
from memwatch.endpoints import EndpointResponse
from memwatch.routes import ROUTE_KEY, django_template
from memwatch.wsgi import EnvironRecorder

if TYPE_CHECKING:
    from memwatch.attribution import Probe
    from memwatch.diagnosis import Tag

_EXTRA = ("registry", "signals", "on_leak", "on_clear")  # Memwatch arguments, not Config fields
_lock = threading.Lock()
_shared: tuple[tuple[Any, ...], Memwatch] | None = None


def instance() -> Memwatch | None:
    """This process's memwatch instance, once a ``MemwatchMiddleware`` has been created."""
    return _shared[1] if _shared is not None else None


def reset() -> None:
    """Forgets this process's instance; the next middleware created builds a new one (tests)."""
    global _shared
    with _lock:
        _shared = None


def _options() -> tuple[Config, dict[str, Any]]:
    options = getattr(settings, "MEMWATCH", None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured("settings.MEMWATCH must be a dict of memwatch options")
    fields = {k: v for k, v in options.items() if k not in _EXTRA}
    extra = {k: options[k] for k in _EXTRA if k in options}
    for name in ("on_leak", "on_clear"):
        if isinstance(extra.get(name), str):
            extra[name] = import_string(extra[name])
    return Config.from_env(**fields), extra


def _memwatch(config: Config, extra: dict[str, Any], mode: str) -> Memwatch:
    global _shared
    key = (config, *(extra.get(name) for name in _EXTRA))
    with _lock:
        if _shared is None or _shared[0] != key:
            _shared = (key, Memwatch(config, **extra))
            _shared[1].log_startup(MemwatchMiddleware, mode)
        return _shared[1]


# Called through a diagnosis window's trampolines, which call ``app(environ, start_response)``
# and ``await app(scope, receive, send)``: the trampoline's frame is then on the view's stack.
def _call(get_response: Any, request: Any) -> Any:
    return get_response(request)


async def _acall(get_response: Any, request: Any, box: list[Any]) -> None:
    box.append(await get_response(request))


def _http_response(answer: EndpointResponse) -> Any:
    response = HttpResponse(answer.body, status=answer.status)
    for name, value in answer.headers:
        response[name] = value
    return response


class MemwatchMiddleware(EnvironRecorder):
    """Watches every request that reaches it; serves ``/metrics`` and the report endpoints."""

    kind = "django"
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        config, extra = _options()
        if not config.enabled:
            raise MiddlewareNotUsed("memwatch is disabled (MEMWATCH_ENABLED / enabled)")
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        mode = "Django ASGI" if self.is_async else "Django WSGI"
        super().__init__(_memwatch(config, extra, mode), "django")

    def _enter(self, meta: dict[str, Any]) -> tuple[Any, Probe | None, Tag | None]:
        """memwatch's own answer (for its paths), else the request's entry probe and tag."""
        if self.memwatch.endpoints.handles(meta.get("PATH_INFO") or "/"):
            answer = self.respond(meta)
            if answer is not None:
                return _http_response(answer), None, None
        try:
            entry = self.monitor.request_entry()
        except Exception as exc:
            self.monitor.errors.record("django.entry", exc)
            entry = None
        tag = self.tag_request(meta) if self.monitor.diagnosis.window is not None else None
        return None, entry, tag

    def _record(self, request: Any, status: str, entry: Probe | None, tag: Tag | None) -> None:
        route = django_template(request)
        if route is not None:
            request.META[ROUTE_KEY] = route
        self.finish(request.META, status, entry, tag)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        answer, entry, tag = self._enter(request.META)
        if answer is not None:
            return answer
        status = "500"
        try:
            if tag is None:
                response = self.get_response(request)
            else:  # a diagnosis window: call the view through the request's trampoline
                response = tag.wsgi(_call, self.get_response, request)
            status = str(response.status_code)
            return response
        finally:
            self._record(request, status, entry, tag)

    async def __acall__(self, request: Any) -> Any:
        answer, entry, tag = self._enter(request.META)
        if answer is not None:
            return answer
        status = "500"
        try:
            if tag is None:
                response = await self.get_response(request)
            else:
                box: list[Any] = []
                await tag.asgi(_acall, self.get_response, request, box)
                response = box[0]
            status = str(response.status_code)
            return response
        finally:
            self._record(request, status, entry, tag)
