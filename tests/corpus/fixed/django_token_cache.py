"""FIXED twin of tests.corpus.django_token_cache: decoded claims in a bounded lru_cache.

The fix is the ``_decode`` cache below.

The original's docstring:

LEAK: a Django API that caches decoded Bearer tokens in a module-level dict, never evicted.

``api/orders/`` (GET, bearer) decodes the token once per distinct token and keeps the claims in
``_CLAIMS_BY_TOKEN`` keyed by the token: one entry (the token string and the claims dict, about
1.5 KB) per token ever seen. Repeated tokens cost nothing; the growth follows first-seen
credentials, not requests. The other routes use other auth schemes and keep nothing.
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

import functools
from typing import Any

from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path

import memwatch
from tests.corpus import common


# token -> decoded claims, bounded (memwatch's advice: functools.lru_cache(maxsize=...)).
@functools.lru_cache(maxsize=128)
def _decode(token: str) -> dict[str, Any] | None:
    return common.decode_token(token)


def _claims(request: HttpRequest) -> dict[str, Any] | None:
    token = common.bearer_of(request.META.get("HTTP_AUTHORIZATION"))
    if token is None:
        return None
    return _decode(token)


def _unauthorized() -> HttpResponse:
    response = JsonResponse({"error": "unauthorized"}, status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


def orders(request: HttpRequest) -> HttpResponse:
    claims = _claims(request)
    if claims is None:
        return _unauthorized()
    page = int(request.GET.get("page", "1"))
    return JsonResponse(
        {
            "customer": claims["sub"],
            "page": page,
            "orders": [{"id": page * 10 + i, "total": (page * 7 + i) % 300} for i in range(5)],
        }
    )


def order(request: HttpRequest, pk: int) -> HttpResponse:
    if not common.api_key_valid(request.META.get("HTTP_X_API_KEY")):
        return _unauthorized()
    return JsonResponse({"id": pk, "status": "shipped", "items": pk % 7 + 1})


def catalog(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"products": [{"sku": f"SKU-{i:04d}", "price": i * 3} for i in range(8)]})


def cart(request: HttpRequest) -> HttpResponse:
    if not common.session_valid(common.session_from_cookie(request.META.get("HTTP_COOKIE"))):
        return _unauthorized()
    return JsonResponse({"items": 3, "total": 42})


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [
    path(
        "api/",
        include(
            [
                path("orders/", orders),
                path("orders/<int:pk>/", order),
                path("catalog/", catalog),
                path("cart/", cart),
            ]
        ),
    ),
    path("health/", health),
]

app = memwatch.wrap(get_wsgi_application())
