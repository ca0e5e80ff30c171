"""``memwatch.flask.Memwatch``: the Flask extension over a real Flask app (tests/apps/flask_app.py).
It watches exactly as ``memwatch.wrap(app.wsgi_app)`` does, keeps ``app`` a Flask object, takes
its options from the environment, ``app.config["MEMWATCH"]`` and its keywords (in that order),
and works with application factories."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

import memwatch
from memwatch.flask import Memwatch
from tests.apps import flask_app
from tests.apps.support import (
    AUTH_CASES,
    ENDPOINT_CASES,
    expected_content_type,
    metric_samples,
    requests_total,
    wsgi_request,
)

# (path, expected route label): templates, a blueprint, every outcome, an exception, a non-match.
ROUTES = [
    ("/", "/"),
    ("/reports/42", "/reports/<int:rid>"),
    ("/api/v2/items/widget", "/api/v2/items/<name>"),
    ("/api/v2/items/3/parts/a/b", "/api/v2/items/<int:iid>/parts/<path:rest>"),
    ("/status/200", "/status/<int:code>"),
    ("/status/401", "/status/<int:code>"),
    ("/status/403", "/status/<int:code>"),
    ("/status/404", "/status/<int:code>"),
    ("/boom", "/boom"),
    ("/nope/42", "__unmatched__"),
]


def extended(**options: Any) -> tuple[Flask, Memwatch]:
    app = flask_app.create_app(propagate=False)
    options.setdefault("log_startup", False)
    options.setdefault("registry", CollectorRegistry())
    return app, Memwatch(app, **options)


def test_labels_identical_to_wrap() -> None:
    # GIVEN the same app twice: wrapped by hand, and with the extension
    plain = flask_app.create_app(propagate=False)
    wrapped = memwatch.wrap(plain.wsgi_app, registry=CollectorRegistry(), log_startup=False)
    plain.wsgi_app = wrapped  # type: ignore[method-assign]
    app, ext = extended()

    # WHEN every route is requested with every auth scheme
    for path, _ in ROUTES:
        for case in AUTH_CASES:
            headers, query, _ = case.values
            a = wsgi_request(plain, path, headers=headers, query=query)
            b = wsgi_request(app, path, headers=headers, query=query)
            assert a.status == b.status

    # THEN memwatch counted the same requests under the same labels
    assert ext.middleware is not None
    expected = dict(wrapped.monitor.snapshot().counts)
    assert dict(ext.middleware.monitor.snapshot().counts) == expected
    assert {key[0] for key in expected} == {label for _, label in ROUTES}
    assert ext.middleware.monitor.errors.total == 0


def test_app_stays_a_flask_app() -> None:
    app, ext = extended()
    assert isinstance(app, Flask)
    assert isinstance(app.wsgi_app, memwatch.WSGIMiddleware)
    assert app.extensions["memwatch"] is ext
    assert app.wsgi_app is ext.middleware
    # Flask's own test client goes through app.wsgi_app, hence through memwatch (which records
    # the request when the body is closed, as a server closes it)
    client = app.test_client()
    with client.get("/reports/1", headers={"Authorization": "Bearer t"}) as response:
        assert response.status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert metric_samples(text, "memwatch_requests_total") == [
        ({"route": "/reports/<int:rid>", "method": "GET", "auth": "bearer", "outcome": "ok"}, 1.0)
    ]


def test_application_factory() -> None:
    ext = Memwatch(log_startup=False)

    def create_app() -> Flask:
        app = flask_app.create_app(propagate=False)
        ext.init_app(app)
        return app

    first, second = create_app(), create_app()
    assert first.extensions["memwatch"] is second.extensions["memwatch"] is ext
    assert first.wsgi_app is not second.wsgi_app  # one middleware (and monitor) per app
    wsgi_request(first, "/reports/1")
    assert requests_total(wsgi_request(first, "/metrics").body.decode()) == 1
    assert requests_total(wsgi_request(second, "/metrics").body.decode()) == 0


def test_options_environment_then_app_config_then_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMWATCH_MAX_ROUTES", "7")
    monkeypatch.setenv("MEMWATCH_SAMPLE_EVERY_REQUESTS", "70")
    monkeypatch.setenv("MEMWATCH_METRICS_PATH", "/from-env")
    app = flask_app.create_app()
    app.config["MEMWATCH"] = {"metrics_path": "/prom", "sample_every_requests": 90}
    ext = Memwatch(app, sample_every_requests=110, log_startup=False)
    assert ext.middleware is not None
    config = ext.middleware.config
    assert (config.max_routes, config.metrics_path, config.sample_every_requests) == (7, "/prom", 110)
    assert wsgi_request(app, "/prom").status == 200


def test_bad_options_fail_at_init() -> None:
    app = flask_app.create_app()
    app.config["MEMWATCH"] = {"max_routez": 5}
    with pytest.raises(memwatch.ConfigError, match="max_routez"):
        Memwatch(app)


@pytest.mark.parametrize("how", ["extension twice", "wrapped by hand first"])
def test_watching_twice_is_refused(how: str) -> None:
    app, _ = extended() if how == "extension twice" else (flask_app.create_app(), None)
    if how == "wrapped by hand first":
        app.wsgi_app = memwatch.wrap(app.wsgi_app, log_startup=False)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="already watching"):
        Memwatch(app)


@pytest.mark.parametrize(("options", "path", "method", "peer", "headers", "status"), ENDPOINT_CASES)
def test_endpoint_access_rules(
    options: dict[str, Any], path: str, method: str, peer: str, headers: dict[str, str], status: int
) -> None:
    app, _ = extended(**options)
    reply = wsgi_request(app, path, method=method, headers=headers, remote_addr=peer)
    assert reply.status == status
    content_type = dict((k.lower(), v) for k, v in reply.headers)["content-type"]
    assert content_type.startswith(expected_content_type(path, status))
