"""memwatch's own endpoints: /metrics, the report pages, and who may see them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from memwatch.config import Config
from memwatch.core import Memwatch
from memwatch.endpoints import EndpointRequest, EndpointResponse, Endpoints
from tests.fixtures import make_signals

TOKEN = "report-token-0123"
METRICS_TOKEN = "metrics-token-4567"
REMOTE = "203.0.113.7"


def endpoints(**options: Any) -> Endpoints:
    """Real endpoints over a real memwatch instance (fixture signals, private registry)."""
    options.setdefault("log_startup", False)
    mw = Memwatch(Config(**options), registry=CollectorRegistry(), signals=make_signals())
    return mw.endpoints


def request(
    path: str = "/memwatch/report.json",
    *,
    method: str = "GET",
    client: str | None = "127.0.0.1",
    authorization: str | None = None,
    forwarded_for: str | None = None,
) -> EndpointRequest:
    return EndpointRequest(method, path, client, authorization, forwarded_for)


def header(response: EndpointResponse, name: str) -> str | None:
    values = [v for k, v in response.headers if k.lower() == name.lower()]
    assert len(values) <= 1
    return values[0] if values else None


# --- /metrics ----------------------------------------------------------------------------------


def test_metrics_are_open_by_default() -> None:
    response = endpoints().respond(request("/metrics", client=REMOTE))
    assert response.status == 200
    assert (header(response, "Content-Type") or "").startswith("text/plain")
    assert b"# TYPE memwatch_process_resident_memory_bytes gauge" in response.body
    assert header(response, "Content-Length") == str(len(response.body))
    assert header(response, "Cache-Control") == "no-store"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        pytest.param(None, 401, id="missing"),
        pytest.param("", 401, id="empty"),
        pytest.param("Bearer wrong-token-000", 401, id="wrong"),
        pytest.param(f"Bearer {METRICS_TOKEN}x", 401, id="token plus a character"),
        pytest.param(f"Bearer {METRICS_TOKEN[:-1]}", 401, id="token minus a character"),
        pytest.param(f"Basic {METRICS_TOKEN}", 401, id="right value, wrong scheme"),
        pytest.param(METRICS_TOKEN, 401, id="no scheme"),
        pytest.param("Bearer tökén-ünïcode-\udc80", 401, id="non-ascii and a lone surrogate"),
        pytest.param(f"Bearer {METRICS_TOKEN}", 200, id="correct"),
        pytest.param(f"bearer   {METRICS_TOKEN}  ", 200, id="correct, scheme case and padding"),
    ],
)
def test_metrics_token(authorization: str | None, status: int) -> None:
    response = endpoints(metrics_token=METRICS_TOKEN).respond(
        request("/metrics", client="127.0.0.1", authorization=authorization)
    )
    assert response.status == status
    if status == 401:
        assert (header(response, "WWW-Authenticate") or "").startswith("Bearer")
        assert b"memwatch_" not in response.body
    else:
        assert b"memwatch_process_resident_memory_bytes" in response.body


def test_a_non_ascii_token_matches_the_bytes_the_client_sent() -> None:
    # Servers hand headers over as latin-1 text: UTF-8 bytes on the wire, decoded as latin-1.
    token = "pässwört-ünïcode"
    on_the_wire = f"Bearer {token}".encode().decode("latin-1")
    ep = endpoints(metrics_token=token)
    assert ep.respond(request("/metrics", authorization=on_the_wire)).status == 200
    assert ep.respond(request("/metrics", authorization=f"Bearer {token}x")).status == 401


def test_metrics_head_and_post() -> None:
    ep = endpoints()
    head = ep.respond(request("/metrics", method="HEAD", client=REMOTE))
    assert (head.status, head.body) == (200, b"")
    assert int(header(head, "Content-Length") or 0) > 0
    post = ep.respond(request("/metrics", method="POST", client=REMOTE))
    assert post.status == 405
    assert header(post, "Allow") == "GET, HEAD"


def test_metrics_accept_header_selects_openmetrics() -> None:
    response = endpoints().respond(
        request("/metrics"), accept="application/openmetrics-text; version=1.0.0"
    )
    assert response.status == 200
    assert (header(response, "Content-Type") or "").startswith("application/openmetrics-text")
    assert response.body.rstrip().endswith(b"# EOF")


def test_metrics_path_is_configurable_and_can_be_disabled() -> None:
    moved = endpoints(metrics_path="/internal/metrics")
    assert moved.handles("/internal/metrics") and not moved.handles("/metrics")
    assert moved.respond(request("/internal/metrics")).status == 200
    off = endpoints(metrics_path="")
    assert not off.handles("/metrics")
    assert off.respond(request("/metrics")).status == 404


# --- the report pages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "forwarded", "trusted", "authorization", "status"),
    [
        # Loopback peers without a token.
        pytest.param("127.0.0.1", None, (), None, 200, id="127.0.0.1"),
        pytest.param("127.8.9.10", None, (), None, 200, id="127/8"),
        pytest.param("::1", None, (), None, 200, id="::1"),
        pytest.param("::ffff:127.0.0.1", None, (), None, 200, id="ipv4-mapped loopback"),
        pytest.param("127.0.0.1:54321", None, (), None, 200, id="with port"),
        pytest.param("[::1]:8000", None, (), None, 200, id="ipv6 with port"),
        # Everyone else needs the token.
        pytest.param(REMOTE, None, (), None, 404, id="remote without token"),
        pytest.param("::ffff:203.0.113.7", None, (), None, 404, id="ipv4-mapped remote"),
        pytest.param("10.1.2.3", None, (), None, 404, id="private is not loopback"),
        pytest.param(None, None, (), None, 404, id="no peer address"),
        pytest.param("/run/app.sock", None, (), None, 404, id="unix socket path"),
        pytest.param(REMOTE, None, (), f"Bearer {TOKEN}", 200, id="remote with token"),
        pytest.param(REMOTE, None, (), "Bearer not-the-token", 404, id="remote with wrong token"),
        pytest.param(REMOTE, None, (), f"Basic {TOKEN}", 404, id="remote, token as basic"),
        pytest.param(
            REMOTE, "127.0.0.1", (), f"Bearer {TOKEN}", 200, id="token wins over forwarding"
        ),
        # Forwarded requests: loopback only through a trusted proxy, judged on the client.
        pytest.param("127.0.0.1", "203.0.113.9", (), None, 404, id="loopback proxy, untrusted"),
        pytest.param("127.0.0.1", "127.0.0.1", (), None, 404, id="untrusted proxy claims loopback"),
        pytest.param(
            "127.0.0.1", "203.0.113.9", ("127.0.0.1",), None, 404, id="trusted proxy, remote client"
        ),
        pytest.param(
            "127.0.0.1", "::1", ("127.0.0.1",), None, 200, id="trusted proxy, loopback client"
        ),
        pytest.param(
            "10.0.0.2",
            "127.0.0.1, 10.0.0.3",
            ("10.0.0.0/8",),
            None,
            200,
            id="right-most untrusted hop is loopback",
        ),
        pytest.param(
            "10.0.0.2",
            "127.0.0.1, 203.0.113.9, 10.0.0.3",
            ("10.0.0.0/8",),
            None,
            404,
            id="spoofed left-most hop ignored",
        ),
        pytest.param(
            "10.0.0.2", "unknown, 10.0.0.3", ("10.0.0.0/8",), None, 404, id="unparsable hop"
        ),
        pytest.param(
            REMOTE, "127.0.0.1", ("10.0.0.0/8",), None, 404, id="untrusted peer forwards loopback"
        ),
        pytest.param(
            "127.0.0.1",
            "for=127.0.0.1",
            ("127.0.0.1",),
            None,
            404,
            id="Forwarded syntax is not trusted",
        ),
    ],
)
def test_report_access(
    client: str | None,
    forwarded: str | None,
    trusted: tuple[str, ...],
    authorization: str | None,
    status: int,
) -> None:
    ep = endpoints(token=TOKEN, trusted_proxies=trusted)
    for path in ("/memwatch/report.json", "/memwatch/", "/memwatch/index.html"):
        response = ep.respond(
            request(path, client=client, authorization=authorization, forwarded_for=forwarded)
        )
        assert response.status == status, path
        if status == 404:
            assert b"memwatch" not in response.body.lower()  # nothing advertises the endpoint


def test_without_a_configured_token_no_bearer_opens_the_report() -> None:
    response = endpoints().respond(request(client=REMOTE, authorization="Bearer anything-at-all"))
    assert response.status == 404


def test_report_json_and_html() -> None:
    ep = endpoints()
    as_json = ep.respond(request("/memwatch/report.json"))
    assert as_json.status == 200
    assert header(as_json, "Content-Type") == "application/json"
    assert {"leak", "routes", "sites", "roots"} <= set(json.loads(as_json.body))
    for path in ("/memwatch/", "/memwatch/index.html"):
        page = ep.respond(request(path))
        assert page.status == 200
        assert (header(page, "Content-Type") or "").startswith("text/html")
        assert page.body.startswith(b"<!doctype html>")
        assert header(page, "Cache-Control") == "no-store"


@pytest.mark.parametrize(
    ("method", "client", "status"),
    [
        pytest.param("HEAD", "127.0.0.1", 200, id="HEAD allowed"),
        pytest.param("POST", "127.0.0.1", 405, id="POST from loopback"),
        pytest.param("DELETE", "::1", 405, id="DELETE from loopback"),
        pytest.param("POST", REMOTE, 404, id="POST from remote does not advertise"),
    ],
)
def test_report_methods(method: str, client: str, status: int) -> None:
    response = endpoints().respond(request(method=method, client=client))
    assert response.status == status
    if status == 405:
        assert header(response, "Allow") == "GET, HEAD"


@pytest.mark.parametrize(
    ("path", "client", "options"),
    [
        pytest.param("/metrics", REMOTE, {"metrics_token": METRICS_TOKEN}, id="401"),
        pytest.param("/memwatch/report.json", REMOTE, {}, id="404 report"),
        pytest.param("/memwatch/nope", "127.0.0.1", {}, id="404 unknown subpath"),
        pytest.param("/memwatch/report.json", "127.0.0.1", {}, id="200 json"),
        pytest.param("/memwatch/", "127.0.0.1", {}, id="200 html"),
    ],
)
def test_head_never_has_a_body(path: str, client: str, options: dict[str, Any]) -> None:
    ep = endpoints(**options)
    get = ep.respond(request(path, client=client))
    head = ep.respond(request(path, method="HEAD", client=client))
    assert head.status == get.status
    assert head.body == b""
    assert header(head, "Content-Type") == header(get, "Content-Type")


@pytest.mark.parametrize(
    "path",
    [
        "/memwatch/secret",
        "/memwatch/report.json/",
        "/memwatch/report.jsonx",
        "/memwatch/../metrics",
        "/memwatch//",
    ],
)
def test_unknown_subpaths_are_404_even_from_loopback(path: str) -> None:
    ep = endpoints()
    assert ep.handles(path)
    assert ep.respond(request(path)).status == 404


def test_handles_only_its_own_paths() -> None:
    ep = endpoints(report_path="/_mw/")
    assert ep.handles("/metrics") and ep.handles("/_mw/") and ep.handles("/_mw/report.json")
    assert not ep.handles("/memwatch/") and not ep.handles("/_mw") and not ep.handles("/")
    assert ep.respond(request("/_mw/report.json")).status == 200
