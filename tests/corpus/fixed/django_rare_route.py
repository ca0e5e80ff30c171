"""FIXED twin of tests.corpus.django_rare_route: rendered invoices in a deque(maxlen=...).

The fix is ``_RENDERED`` below.

The original's docstring:

LEAK on a rarely used route: a Django shop API where only ``api/invoices/<int:pk>/pdf/``

(GET, bearer; about a tenth of the traffic) keeps something.

Rendering an invoice records its metadata (a dict of seven fields, about 1 KB with its strings)
in ``_RENDERED``, "to avoid rendering twice" — but it is keyed by nothing and only appended to.
Every other route, including other bearer routes, keeps nothing.
"""

from __future__ import annotations

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="memwatch-corpus-not-a-secret-0123456789",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()

import time
from collections import deque
from typing import Any

from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path

import memwatch
from tests.corpus import common

_RENDERED: deque[dict[str, Any]] = deque(maxlen=64)


def _claims(request: HttpRequest) -> dict[str, Any] | None:
    token = common.bearer_of(request.META.get("HTTP_AUTHORIZATION"))
    return common.decode_token(token) if token else None


def _unauthorized() -> HttpResponse:
    return JsonResponse({"error": "unauthorized"}, status=401)


def invoice_pdf(request: HttpRequest, pk: int) -> HttpResponse:
    claims = _claims(request)
    if claims is None:
        return _unauthorized()
    _RENDERED.append(
        {
            "invoice": pk,
            "customer": claims["sub"],
            "tenant": claims["tenant"],
            "rendered_at": time.time(),
            "template": f"invoices/{claims['tenant']}/standard-v3.html",
            "request_id": request.META.get("HTTP_X_REQUEST_ID", ""),
            "pages": pk % 4 + 1,
        }
    )
    body = b"%PDF-1.7\n% invoice " + str(pk).encode() + b"\n" + b"0" * 256
    return HttpResponse(body, content_type="application/pdf")


def invoices(request: HttpRequest) -> HttpResponse:
    claims = _claims(request)
    if claims is None:
        return _unauthorized()
    return JsonResponse({"customer": claims["sub"], "invoices": list(range(12))})


def products(request: HttpRequest) -> HttpResponse:
    page = int(request.GET.get("page", "1"))
    return JsonResponse(
        {"page": page, "products": [{"sku": f"SKU-{page}-{i}", "price": i * 5} for i in range(10)]}
    )


def product(request: HttpRequest, pk: int) -> HttpResponse:
    return JsonResponse({"sku": f"SKU-{pk}", "price": pk % 200, "stock": pk % 9})


def cart(request: HttpRequest) -> HttpResponse:
    if not common.session_valid(common.session_from_cookie(request.META.get("HTTP_COOKIE"))):
        return _unauthorized()
    if request.method == "POST":
        request.body  # noqa: B018 - read the JSON body like a real view would
        return JsonResponse({"added": True}, status=201)
    return JsonResponse({"items": 2, "total": 30})


def stock(request: HttpRequest) -> HttpResponse:
    if not common.api_key_valid(request.META.get("HTTP_X_API_KEY")):
        return _unauthorized()
    return JsonResponse({"warehouses": {"north": 12, "south": 7}})


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [
    path(
        "api/",
        include(
            [
                path("products/", products),
                path("products/<int:pk>/", product),
                path("cart/", cart),
                path("invoices/", invoices),
                path("invoices/<int:pk>/pdf/", invoice_pdf),
                path("stock/", stock),
            ]
        ),
    ),
    path("health/", health),
]

app = memwatch.wrap(get_wsgi_application())
