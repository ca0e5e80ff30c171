"""CLEAN: a Django app with ``DEBUG = True`` that runs SQL (sqlite, in memory) on every request.

With DEBUG on, Django records every query in a connection's ``queries_log``, a
``deque(maxlen=9000)``. The request's connection is cleared at each ``request_started``. This
app also writes an audit trail (eight queries for most requests) through a second connection it
made itself (``connections.create_connection``), which Django's per-request reset does not know
about: that connection's query log fills up to the 9,000-entry cap within about 1,600 requests
(inside memwatch's warm-up) and then stays at that size. Neither is a leak.
"""

from __future__ import annotations

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=True,
        SECRET_KEY="memwatch-corpus-not-a-secret-0123456789",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
    )
    django.setup()

import threading

from django.core.wsgi import get_wsgi_application
from django.db import connection, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

import memwatch
from tests.corpus import common

AUDIT_QUERIES_PER_REQUEST = 8
_audit_db = threading.local()


def _audit(kind: str, ref: int) -> None:
    db = getattr(_audit_db, "connection", None)
    if db is None:
        db = _audit_db.connection = connections.create_connection("default")
    with db.cursor() as cursor:
        for step in range(AUDIT_QUERIES_PER_REQUEST):
            cursor.execute("SELECT %s, %s, %s", [kind, ref, step])
            cursor.fetchone()


def _query(n: int) -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < %s) "
            "SELECT i, i * %s FROM s",
            [n, n],
        )
        return list(cursor.fetchall())


def _unauthorized() -> HttpResponse:
    return JsonResponse({"error": "unauthorized"}, status=401)


def articles(request: HttpRequest) -> HttpResponse:
    rows = _query(5)
    _audit("list", len(rows))
    return JsonResponse({"articles": [{"id": i, "score": s} for i, s in rows]})


def article(request: HttpRequest, pk: int) -> HttpResponse:
    rows = _query(pk % 7 + 1)
    _audit("read", pk)
    return JsonResponse({"id": pk, "sections": len(rows)})


def comments(request: HttpRequest, pk: int) -> HttpResponse:
    if not common.session_valid(common.session_from_cookie(request.META.get("HTTP_COOKIE"))):
        return _unauthorized()
    rows = _query(3)
    if request.method == "POST":
        request.body  # noqa: B018 - read the form like a real view would
        _audit("comment", pk)
        return JsonResponse({"created": True}, status=201)
    return JsonResponse({"article": pk, "comments": [r[0] for r in rows]})


def stats(request: HttpRequest) -> HttpResponse:
    token = common.bearer_of(request.META.get("HTTP_AUTHORIZATION"))
    if token is None or common.decode_token(token) is None:
        return _unauthorized()
    rows = _query(10)
    _audit("stats", len(rows))
    return JsonResponse({"total": sum(s for _, s in rows)})


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [
    path("articles/", articles),
    path("articles/<int:pk>/", article),
    path("articles/<int:pk>/comments/", comments),
    path("stats/", stats),
    path("health/", health),
]

app = memwatch.wrap(get_wsgi_application())
