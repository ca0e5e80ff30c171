"""``app.add_middleware(memwatch.ASGIMiddleware, ...)`` in Starlette and FastAPI: the middleware
then runs inside the app (after ``ServerErrorMiddleware``, before the router) instead of around
it, and must still give every request the labels ``memwatch.wrap(app)`` gives it: route templates
(mounts and routers included), auth schemes and outcomes, and the same endpoint access rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import memwatch
from memwatch.core import Memwatch
from tests.apps import fastapi_app, starlette_app
from tests.apps.support import AUTH_CASES, ENDPOINT_CASES, asgi_requests, expected_content_type

# (app factory, [(path, expected route label)]): every outcome, mounts, routers, a non-match.
APPS = {
    "Starlette": (
        starlette_app.create_app,
        [
            ("/", "/"),
            ("/orders/12", "/orders/{order_id:int}"),
            ("/v1/things/t9", "/v1/things/{tid}"),
            ("/plain/users/5", "/plain/users/{id}"),
            ("/status/200", "/status/{code:int}"),
            ("/status/401", "/status/{code:int}"),
            ("/status/403", "/status/{code:int}"),
            ("/status/404", "/status/{code:int}"),
            ("/boom", "/boom"),
            ("/nope/42", "__unmatched__"),
        ],
    ),
    "FastAPI": (
        fastapi_app.create_app,
        [
            ("/users/3", "/users/{user_id}"),
            ("/api/items/x1", "/api/items/{item_id}"),
            ("/api/items/x1/tags/t", "/api/items/{item_id}/tags/{tag}"),
            ("/v2/outer/inner/leaf/4", "/v2/outer/inner/leaf/{leaf_id}"),
            ("/sub/things/8", "/sub/things/{tid}"),
            ("/sub/r/deep/d", "/sub/r/deep/{did}"),
            ("/status/200", "/status/{code}"),
            ("/status/401", "/status/{code}"),
            ("/status/404", "/status/{code}"),
            ("/boom", "/boom"),
            ("/nope", "__unmatched__"),
        ],
    ),
}


def with_add_middleware(create: Any, **options: Any) -> tuple[Any, Memwatch]:
    """The app with memwatch added as its middleware; the Memwatch instance to read it back."""
    instance = Memwatch(memwatch.Config.from_env(log_startup=False, **options))
    app = create()
    app.add_middleware(memwatch.ASGIMiddleware, memwatch=instance)
    return app, instance


def send(app: Any, requests: list[tuple[str, str, dict[str, str] | None]], peer: str = "127.0.0.1") -> list[Any]:
    return asyncio.run(asgi_requests(app, requests, client=(peer, 41000), raise_app_exceptions=False))


@pytest.mark.parametrize("name", list(APPS))
def test_labels_identical_to_wrap(name: str) -> None:
    # GIVEN the same app twice: wrapped around, and with memwatch added as its middleware
    create, routes = APPS[name]
    wrapped = memwatch.wrap(create(), registry=CollectorRegistry(), log_startup=False)
    app, instance = with_add_middleware(create)

    # WHEN every route is requested with every auth scheme
    requests = []
    for path, _ in routes:
        for case in AUTH_CASES:
            headers, query, _ = case.values
            requests.append(("GET", path + ("?" + query if query else ""), headers))
    via_wrap = send(wrapped, requests)
    via_middleware = send(app, requests)

    # THEN the answers are the same and so are memwatch's counts, label for label
    assert [r.status for r in via_middleware] == [r.status for r in via_wrap]
    expected = dict(wrapped.monitor.snapshot().counts)
    assert dict(instance.monitor.snapshot().counts) == expected
    assert {key[0] for key in expected} == {label for _, label in routes}
    assert {key[2] for key in expected} == {case.values[2] for case in AUTH_CASES}
    assert instance.monitor.errors.total == 0


@pytest.mark.parametrize(("options", "path", "method", "peer", "headers", "status"), ENDPOINT_CASES)
def test_endpoint_access_rules(
    options: dict[str, Any], path: str, method: str, peer: str, headers: dict[str, str], status: int
) -> None:
    app, instance = with_add_middleware(fastapi_app.create_app, **options)
    (reply,) = send(app, [(method, path, headers)], peer=peer)
    assert reply.status == status
    content_type = dict((k.lower(), v) for k, v in reply.headers)["content-type"]
    assert content_type.startswith(expected_content_type(path, status))
    assert instance.monitor.snapshot().requests == 0
