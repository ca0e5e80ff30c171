"""The Django project of :mod:`tests.apps.django_app` (same URLconf and views) with memwatch
enabled the settings way: ``"memwatch.django.MemwatchMiddleware"`` first in ``MIDDLEWARE`` and a
``MEMWATCH`` dict. For servers, which import this module first in a fresh process: it configures
Django's settings only if nothing has yet (in-process tests use ``override_settings`` instead).
"""

from __future__ import annotations

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="memwatch-tests-not-a-secret-0123456789",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="tests.apps.django_app",
        INSTALLED_APPS=[],
        MIDDLEWARE=["memwatch.django.MemwatchMiddleware"],
        MEMWATCH={"max_routes": 100},
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler


def wsgi() -> WSGIHandler:
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def asgi() -> ASGIHandler:
    from django.core.asgi import get_asgi_application

    return get_asgi_application()
