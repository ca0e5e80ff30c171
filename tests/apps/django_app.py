"""A Django project in one module: settings configured in code, a nested ``include()``, views
for every outcome, and the WSGI and ASGI handlers.

Importing this module configures Django's settings once (guarded, so that it coexists with any
other test that configured them first with the same URLconf).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="memwatch-tests-not-a-secret-0123456789",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path

import memwatch


class AppError(RuntimeError):
    """Raised by ``boom/``."""


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"index")


def data(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"data": [1, 2, 3]})


def item(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"pk": pk})


def deep(request: HttpRequest, slug: str) -> JsonResponse:
    return JsonResponse({"slug": slug})


def status(request: HttpRequest, code: int) -> HttpResponse:
    return HttpResponse(f"status {code}".encode(), status=code)


def boom(request: HttpRequest) -> HttpResponse:
    raise AppError("boom from the Django view")


def stream(request: HttpRequest, chunks: int) -> StreamingHttpResponse:
    if hasattr(request, "scope"):  # ASGI: Django wants an asynchronous iterator

        async def agenerate() -> AsyncIterator[bytes]:
            for i in range(chunks):
                yield b"chunk-%06d\n" % i

        return StreamingHttpResponse(agenerate(), content_type="text/plain")

    def generate() -> Iterator[bytes]:
        for i in range(chunks):
            yield b"chunk-%06d\n" % i

    return StreamingHttpResponse(generate(), content_type="text/plain")


def reset(request: HttpRequest, token: str) -> HttpResponse:
    return HttpResponse(b"reset requested")


urlpatterns = [
    path("", index),
    path(
        "api/",
        include(
            [
                path("data/", data),
                path("items/<int:pk>/", item),
                path("v1/", include([path("deep/<slug:slug>/", deep)])),
            ]
        ),
    ),
    path("status/<int:code>/", status),
    path("boom/", boom),
    path("stream/<int:chunks>/", stream),
    path("reset/<str:token>/", reset),
]


def wsgi_handler() -> WSGIHandler:
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def asgi_handler() -> ASGIHandler:
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def wrapped_wsgi() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(wsgi_handler())


def wrapped_asgi() -> memwatch.WSGIMiddleware | memwatch.ASGIMiddleware:
    return memwatch.wrap(asgi_handler())
