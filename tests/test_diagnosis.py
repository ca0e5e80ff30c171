"""Diagnosis windows: whether retained growth follows first-seen credentials."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import memwatch
from memwatch import WSGIMiddleware
from memwatch.diagnosis import MIN_SPLIT_REQUESTS, CredentialSplit
from tests.apps.support import make_environ, run_wsgi


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        pytest.param(
            CredentialSplit(40, 40 * 2000, 100, 100 * 20), "distinct_credentials", id="cache"
        ),
        pytest.param(CredentialSplit(40, 40 * 700, 100, 100 * 650), "requests", id="per request"),
        pytest.param(CredentialSplit(40, 40 * 10, 100, 100 * 8), None, id="nothing kept"),
        pytest.param(CredentialSplit(40, 40 * 900, 100, 100 * 350), None, id="in between"),
        pytest.param(CredentialSplit(MIN_SPLIT_REQUESTS - 1, 9000, 100, 0), None, id="too few new"),
        pytest.param(CredentialSplit(40, 80_000, 2, 0), None, id="too few known"),
        pytest.param(
            CredentialSplit(2, 100, 100, 100 * 700), "requests", id="known ones keep it"
        ),
    ],
)
def test_credential_split_decides_only_on_clear_evidence(
    split: CredentialSplit, expected: str | None
) -> None:
    assert split.scales_with(minimum=16.0) == expected


TOKEN_CACHE: dict[str, dict[str, Any]] = {}
AUDIT: list[dict[str, Any]] = []


def token_cache_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Caches decoded claims per bearer token (a leak that follows new credentials)."""
    token = environ.get("HTTP_AUTHORIZATION", "")[7:]
    claims = TOKEN_CACHE.get(token)
    if claims is None:
        claims = TOKEN_CACHE[token] = {"sub": token[-12:], "scopes": ["read", "write"] * 20}
    body = json.dumps({"sub": claims["sub"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def audit_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Appends a record per request, whoever sends it (a leak that follows requests)."""
    AUDIT.append({"path": environ["PATH_INFO"], "pad": ["x" * 40] * 20})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def drive_window(app: Any, *, new_share: float, seed: int) -> str | None:
    """Warms memwatch's first-seen filter with a pool of tokens, then runs a diagnosis window
    with traffic where ``new_share`` of the requests carry a never-seen token."""
    rng = random.Random(seed)
    mw = memwatch.wrap(
        app,
        registry=CollectorRegistry(),
        log_startup=False,
        diagnosis="off",
        diagnosis_requests=600,
    )
    assert isinstance(mw, WSGIMiddleware)
    pool = [f"tok-{seed}-{i:04d}-" + "a1b2c3d4" * 8 for i in range(200)]
    fresh = iter(f"new-{seed}-{i:06d}-" + "e5f6a7b8" * 8 for i in range(100_000))

    def send(token: str) -> None:
        environ = make_environ("/api/orders", headers={"Authorization": f"Bearer {token}"})
        run_wsgi(mw, environ)

    for _ in range(3):  # every pool token seen (and recorded) before the window
        for token in pool:
            send(token)
    assert mw.monitor.start_diagnosis("test", force=True)
    try:
        deadline = time.monotonic() + 60
        while mw.monitor.diagnosis.windows == 0 and time.monotonic() < deadline:
            send(next(fresh) if rng.random() < new_share else rng.choice(pool))
            time.sleep(0.0005)  # the diagnosis thread takes the snapshots
        last = mw.monitor.diagnosis.last
        assert last is not None and last.credentials is not None
        assert last.credentials.new_requests >= MIN_SPLIT_REQUESTS
        return last.credentials.scales_with(minimum=16.0)
    finally:
        if mw.monitor.diagnosis.window is not None:
            mw.monitor.diagnosis.abandon()
        TOKEN_CACHE.clear()
        AUDIT.clear()


@pytest.mark.slow  # a real window: tracemalloc snapshots and the holder search take seconds
def test_window_says_a_token_keyed_cache_follows_new_credentials() -> None:
    assert drive_window(token_cache_app, new_share=0.3, seed=1) == "distinct_credentials"


@pytest.mark.slow
def test_window_says_a_per_request_list_follows_requests() -> None:
    assert drive_window(audit_app, new_share=0.3, seed=2) == "requests"


KEPT: list[Any] = []


def two_route_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """``/leak`` keeps a small record per request; ``/noise`` keeps one 20 KB buffer in fifty
    requests (about as many bytes per request on average, from a handful of requests)."""
    path = environ["PATH_INFO"]
    if path == "/leak":
        KEPT.append({"path": path, "pad": ["x" * 40] * 8})
    elif path == "/noise":
        counter = int(environ["QUERY_STRING"] or 0)
        if counter % 50 == 0:
            KEPT.append(bytearray(20_000))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.mark.slow
def test_window_marks_a_route_only_when_its_replicates_agree() -> None:
    from memwatch.attribution import window_estimates

    mw = memwatch.wrap(
        two_route_app,
        registry=CollectorRegistry(),
        log_startup=False,
        diagnosis="off",
        diagnosis_requests=800,
    )
    assert isinstance(mw, WSGIMiddleware)
    assert mw.monitor.start_diagnosis("test", force=True)
    n = 0
    try:
        deadline = time.monotonic() + 60
        while mw.monitor.diagnosis.windows == 0 and time.monotonic() < deadline:
            n += 1
            path = "/leak" if n % 2 else "/noise"
            run_wsgi(mw, make_environ(path, query=str(n // 2)))
            time.sleep(0.0005)
        result = mw.monitor.diagnosis.last
        assert result is not None
        by_route = {r.key[0]: r for r in result.routes}
        assert len(by_route["/leak"].replicate_rates) == 4
        estimates = {e.key[0]: e for e in window_estimates(result, [], minimum=16.0)}
        assert estimates["/leak"].significant
        noise = estimates.get("/noise")
        assert noise is None or not noise.significant, by_route.get("/noise")
    finally:
        if mw.monitor.diagnosis.window is not None:
            mw.monitor.diagnosis.abandon()
        KEPT.clear()


def test_allocations_made_by_memwatch_through_the_stdlib_are_not_sites() -> None:
    import dataclasses
    import os
    import tracemalloc

    import memwatch.report
    from memwatch.diagnosis import TRAMPOLINE_PREFIX, made_by_memwatch

    def frames(*names: str) -> list[tracemalloc.Frame]:
        return [tracemalloc.Frame((name, 1)) for name in names]  # oldest first

    stdlib = dataclasses.__file__
    ours = memwatch.report.__file__
    app = os.path.abspath("myapp/views.py")
    library = os.path.join("/srv/venv/lib/python3.11/site-packages", "flask", "app.py")
    assert made_by_memwatch(frames(app, ours, stdlib))  # our report, serialised by dataclasses
    assert made_by_memwatch(frames(ours))
    assert not made_by_memwatch(frames(ours, app, stdlib))  # the app's, through the stdlib
    assert not made_by_memwatch(frames(ours, f"{TRAMPOLINE_PREFIX}3>", stdlib))
    assert not made_by_memwatch(frames(ours, library))
