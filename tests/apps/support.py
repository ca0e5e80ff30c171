"""Helpers shared by the middleware and framework tests: drive a WSGI or ASGI app the way a real
server does, and read memwatch's counts back through its public surfaces."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}
REPORT_TOKEN = "report-token-0123456789"
METRICS_TOKEN = "metrics-token-0123456789"


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def wsgi_request(
    app: Any,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    query: str = "",
    remote_addr: str = "127.0.0.1",
) -> Reply:
    """One request through a WSGI app with Werkzeug's test client in buffered mode, which
    consumes the body and calls its ``close()`` the way a PEP 3333 server does."""
    client = Client(app, use_cookies=False)  # the Cookie header is sent as given
    response = client.open(
        path,
        method=method,
        headers=list((headers or {}).items()),
        query_string=query or None,
        environ_base={"REMOTE_ADDR": remote_addr},
        buffered=True,
    )
    try:
        return Reply(response.status_code, list(response.headers.items()), response.get_data())
    finally:
        response.close()


async def asgi_requests(
    app: Any,
    requests: Iterable[tuple[str, str, Mapping[str, str] | None]],
    *,
    client: tuple[str, int] = ("127.0.0.1", 50000),
    raise_app_exceptions: bool = True,
) -> list[Reply]:
    """Sends (method, url, headers) requests to an ASGI app through httpx's ASGI transport."""
    transport = httpx.ASGITransport(
        app, client=client, raise_app_exceptions=raise_app_exceptions
    )
    replies = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        for method, url, headers in requests:
            # Values as latin-1 bytes: header bytes outside ASCII reach the app as sent.
            raw = {name: value.encode("latin-1") for name, value in (headers or {}).items()}
            response = await http.request(method, url, headers=raw)
            replies.append(
                Reply(response.status_code, list(response.headers.items()), response.content)
            )
    return replies


def asgi_request(
    app: Any,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
    raise_app_exceptions: bool = True,
) -> Reply:
    (reply,) = asyncio.run(
        asgi_requests(
            app,
            [(method, path, headers)],
            client=client,
            raise_app_exceptions=raise_app_exceptions,
        )
    )
    return reply


def counts(middleware: Any) -> dict[tuple[str, str, str, str], int]:
    """memwatch's request counts, keyed by (route, method, auth, outcome)."""
    return dict(middleware.monitor.snapshot().counts)


def count_by(middleware: Any, field: str) -> Counter[str]:
    """Request counts summed over one label: route, method, auth or outcome."""
    index = ("route", "method", "auth", "outcome").index(field)
    totals: Counter[str] = Counter()
    for key, n in counts(middleware).items():
        totals[key[index]] += n
    return totals


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric (sample name, e.g. ``memwatch_requests_total``) in exposition text."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found


def requests_total(text: str) -> float:
    return sum(value for _, value in metric_samples(text, "memwatch_requests_total"))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# --- driving a WSGI app the way a PEP 3333 server does ---------------------------------------


def make_environ(
    path: str,
    *,
    method: str = "GET",
    query: str = "",
    headers: Mapping[str, str] | None = None,
    remote_addr: str = "127.0.0.1",
) -> dict[str, Any]:
    """A complete WSGI environ (wsgiref's testing defaults) with the given request line and
    headers (``Name: value`` becomes ``HTTP_NAME``)."""
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REMOTE_ADDR": remote_addr,
    }
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = value
    setup_testing_defaults(environ)
    return environ


def run_wsgi(app: Any, environ: dict[str, Any]) -> Reply:
    """Calls a WSGI app, consumes its body and closes it, as a server does."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    return Reply(int(status[:3]), headers, body)


# --- report and metrics access rules, one table for both middlewares -------------------------

# (id, config options, path, method, peer address, request headers, expected status)
ENDPOINT_CASES = [
    pytest.param({}, "/memwatch/report.json", "GET", "127.0.0.1", {}, 200, id="report from IPv4 loopback"),
    pytest.param({}, "/memwatch/report.json", "GET", "127.8.9.10", {}, 200, id="report from 127/8"),
    pytest.param({}, "/memwatch/report.json", "GET", "::1", {}, 200, id="report from IPv6 loopback"),
    pytest.param({}, "/memwatch/", "GET", "127.0.0.1", {}, 200, id="html page from loopback"),
    pytest.param({}, "/memwatch/report.json", "GET", "10.1.2.3", {}, 404, id="report from elsewhere, no token configured"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/report.json", "GET", "10.1.2.3", {}, 404, id="report from elsewhere without token"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/report.json", "GET", "10.1.2.3", {"Authorization": "Bearer " + REPORT_TOKEN}, 200, id="report from elsewhere with token"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/", "GET", "203.0.113.5", {"Authorization": "bearer " + REPORT_TOKEN}, 200, id="html from elsewhere with token, lower-case scheme"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/report.json", "GET", "10.1.2.3", {"Authorization": "Bearer " + REPORT_TOKEN[:-1] + "X"}, 404, id="report with wrong token"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/report.json", "GET", "10.1.2.3", {"Authorization": "Basic " + REPORT_TOKEN}, 404, id="report token under another scheme"),
    pytest.param({}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "203.0.113.7"}, 404, id="loopback peer forwarding a remote client"),
    pytest.param({}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}, 404, id="forwarded by an untrusted local proxy"),
    pytest.param({}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Real-IP": "203.0.113.7"}, 404, id="X-Real-IP from loopback peer"),
    pytest.param({"trusted_proxies": ("127.0.0.1",)}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "203.0.113.7"}, 404, id="trusted proxy, remote client"),
    pytest.param({"trusted_proxies": ("127.0.0.1",)}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}, 200, id="trusted local proxy, loopback client"),
    pytest.param({"trusted_proxies": ("10.0.0.0/8",)}, "/memwatch/report.json", "GET", "10.9.9.9", {"X-Forwarded-For": "127.0.0.1"}, 200, id="trusted proxy, loopback client"),
    pytest.param({"trusted_proxies": ("127.0.0.1",)}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "127.0.0.1, 203.0.113.7"}, 404, id="trusted proxy, spoofed left-most hop"),
    pytest.param({"trusted_proxies": ("127.0.0.1",)}, "/memwatch/report.json", "GET", "10.9.9.9", {"X-Forwarded-For": "127.0.0.1"}, 404, id="untrusted peer claiming loopback"),
    pytest.param({"trusted_proxies": ("10.0.0.0/8",)}, "/memwatch/report.json", "GET", "10.9.9.9", {"X-Forwarded-For": "::1"}, 200, id="trusted proxy network, IPv6 loopback client"),
    pytest.param({"token": REPORT_TOKEN}, "/memwatch/report.json", "GET", "127.0.0.1", {"X-Forwarded-For": "198.51.100.1", "Authorization": "Bearer " + REPORT_TOKEN}, 200, id="forwarded remote client with token"),
    pytest.param({}, "/memwatch/report.json", "POST", "127.0.0.1", {}, 405, id="report POST from loopback"),
    pytest.param({}, "/memwatch/report.json", "POST", "10.1.2.3", {}, 404, id="report POST from elsewhere"),
    pytest.param({}, "/memwatch/nothing-here", "GET", "127.0.0.1", {}, 404, id="unknown path under the report prefix"),
    pytest.param({}, "/metrics", "GET", "10.1.2.3", {}, 200, id="metrics open by default"),
    pytest.param({"metrics_token": METRICS_TOKEN}, "/metrics", "GET", "127.0.0.1", {}, 401, id="metrics token required even on loopback"),
    pytest.param({"metrics_token": METRICS_TOKEN}, "/metrics", "GET", "10.1.2.3", {"Authorization": "Bearer nope-nope-nope"}, 401, id="metrics with wrong token"),
    pytest.param({"metrics_token": METRICS_TOKEN}, "/metrics", "GET", "10.1.2.3", {"Authorization": "Bearer " + METRICS_TOKEN}, 200, id="metrics with token"),
    pytest.param({"metrics_token": METRICS_TOKEN, "token": REPORT_TOKEN}, "/metrics", "GET", "10.1.2.3", {"Authorization": "Bearer " + REPORT_TOKEN}, 401, id="report token does not open metrics"),
    pytest.param({"metrics_path": "/internal/prom"}, "/internal/prom", "GET", "10.1.2.3", {}, 200, id="metrics at a configured path"),
    pytest.param({"report_path": "/_mw/"}, "/_mw/report.json", "GET", "127.0.0.1", {}, 200, id="report at a configured prefix"),
]


def expected_content_type(path: str, status: int) -> str:
    if status != 200:
        return "text/plain"
    if path.endswith("report.json"):
        return "application/json"
    if path.endswith("/"):
        return "text/html"
    return "text/plain"  # Prometheus text exposition


# --- canary credentials: none of these bytes may appear in any output ------------------------

CANARY = "mwcanary"  # every secret below contains it; outputs are searched case-insensitively
BEARER_SECRET = "mwcanary.Bearer.7f3a9c1e5b"
BASIC_USER, BASIC_PASSWORD = "mwcanary-user-42", "mwcanary-pass-9981"
DIGEST_USER = "mwcanary-digest-user-31"
APIKEY_SECRET = "mwcanary-apikey-55aa77"
QUERY_SECRET = "mwcanary-query-0001"
SESSION_SECRET = "mwcanary-session-8d8d"
OTHER_SECRET = "mwcanary-negotiate-YIIB"
PATH_SECRETS = ("mwcanary-path-4b1d93e0aa", "mwcanaryQ0x9Zk3LmP5rT8vW2yB4", "mwcanaryQxZvTrWpLmNbKeRt")


def canary_requests() -> list[tuple[str, str, dict[str, str]]]:
    """(path, query, headers) of requests carrying canary secrets in every place a credential
    can travel: each auth scheme, cookies, query strings and path segments."""
    digest = (
        f'Digest username="{DIGEST_USER}", realm="api", nonce="mwcanary-nonce-77", '
        'uri="/", response="mwcanary-response-1f", qop=auth, nc=00000001, cnonce="mwcanary-cn"'
    )
    return [
        ("/", "", {"Authorization": "Bearer " + BEARER_SECRET}),
        ("/", "", {"Authorization": basic(BASIC_USER, BASIC_PASSWORD)}),
        ("/", "", {"Authorization": digest}),
        ("/", "", {"X-API-Key": APIKEY_SECRET}),
        ("/", "", {"Authorization": "Token " + APIKEY_SECRET}),
        ("/", "token=" + QUERY_SECRET, {}),
        ("/", "page=2&api_key=" + QUERY_SECRET, {}),
        ("/", "access_token=" + QUERY_SECRET, {}),
        ("/", "", {"Cookie": f"theme=dark; sessionid={SESSION_SECRET}; csrftoken=mwcanary-csrf-3"}),
        ("/", "", {"Authorization": "Negotiate " + OTHER_SECRET}),
        ("/", "", {"Authorization": BEARER_SECRET}),  # a bare value, no scheme
        *[(f"/reset/{secret}", "token=" + QUERY_SECRET, {}) for secret in PATH_SECRETS],
    ]


def assert_no_canary(text: str, where: str) -> None:
    lowered = text.lower()
    assert CANARY not in lowered, f"a canary credential leaked into {where}"
    blob = basic(BASIC_USER, BASIC_PASSWORD).split()[1].lower()
    assert blob not in lowered, f"a Basic credential leaked into {where}"


# --- malformed Authorization and Cookie headers (as WSGI text: latin-1 decoded bytes) --------

MALFORMED_HEADERS = [
    pytest.param("Basic !!!***not-base64***", None, id="basic not base64"),
    pytest.param("Basic " + base64.b64encode(b"\xff\xfe\xfd:\x80\x81").decode(), None, id="basic not utf-8 inside"),
    pytest.param(b"Bearer \xff\xfe\xc3\x28 \xa0".decode("latin-1"), None, id="bearer non-utf-8 bytes"),
    pytest.param("", "", id="empty"),
    pytest.param("   ", " ; ; ", id="whitespace only"),
    pytest.param("Bearer " + "A" * 65536, None, id="64 KiB bearer"),
    pytest.param("Basic " + "Q" * 65536, "sessionid=" + "b" * 65536, id="64 KiB basic and cookie"),
    pytest.param("X" * 65536, None, id="64 KiB bare value"),
    pytest.param("\t Bearer \t tok \t", " ;  sessionid = abc ;; ", id="odd whitespace"),
    pytest.param("bEaReR tok", "SessionID=abc", id="mixed-case scheme and cookie name"),
    pytest.param("BASIC", None, id="scheme only"),
    pytest.param("Digest username", None, id="digest without value"),
    pytest.param('Digest username="abc, realm=', None, id="digest unterminated quote"),
    pytest.param("Digest ,,,=,==", None, id="digest empty params"),
    pytest.param(None, "sessionid", id="cookie without equals"),
    pytest.param(None, ";;;;=;=;sessionid=;", id="cookie of separators"),
    pytest.param(None, b"sessionid=\xff\xfe\x00".decode("latin-1"), id="cookie non-utf-8"),
    pytest.param(None, "a=" + "c" * 65536 + "; session=z", id="64 KiB cookie before session"),
]


# --- driving an ASGI app at message level -----------------------------------------------------


def make_scope(
    path: str,
    *,
    method: str = "GET",
    query: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] | Mapping[str, str] = (),
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
) -> dict[str, Any]:
    """An ASGI 3 HTTP scope; ``headers`` as raw (name, value) byte pairs, or a str mapping."""
    if isinstance(headers, Mapping):
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    else:
        raw = list(headers)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1", "replace"),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *raw],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    """Runs one HTTP request through an ASGI app; returns every message the app sent."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def run_asgi(app: Any, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    return asyncio.run(call_asgi(app, scope, body))


def asgi_reply(messages: list[dict[str, Any]]) -> Reply:
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])]
    return Reply(start["status"], headers, body)


def latin1_bytes(text: str | None) -> bytes | None:
    return None if text is None else text.encode("latin-1")


# --- every auth scheme, for the framework matrices --------------------------------------------

DIGEST_HEADER = (
    'Digest username="alice", realm="api", nonce="dcd98b7102dd2f0e", uri="/", '
    'response="6629fae49393a05397450978507c4ef1", qop=auth, nc=00000001, cnonce="0a4f113b"'
)

# (headers, query string, expected auth label)
AUTH_CASES = [
    pytest.param({"Authorization": "Bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl"}, "", "bearer", id="bearer"),
    pytest.param({"Authorization": basic("alice", "wonderland")}, "", "basic", id="basic"),
    pytest.param({"Authorization": DIGEST_HEADER}, "", "digest", id="digest"),
    pytest.param({"X-API-Key": "key-0123456789"}, "", "apikey", id="apikey header"),
    pytest.param({"Authorization": "Token 9944b09199c62bcf9418ad846dd0e4bb"}, "", "apikey", id="apikey Token scheme"),
    pytest.param({}, "page=2&api_key=key-0123456789", "apikey", id="apikey in query"),
    pytest.param({}, "access_token=tok-0123456789", "bearer", id="bearer in query"),
    pytest.param({"Cookie": "theme=dark; sessionid=s-0123456789"}, "", "session", id="session cookie"),
    pytest.param({"Authorization": "Negotiate YIIBhwYGKwYBBQUCoIIBezCCAXeg"}, "", "other", id="other scheme"),
    pytest.param({}, "", "anonymous", id="anonymous"),
    pytest.param({"Authorization": "Bearer t-1", "Cookie": "sessionid=s-1"}, "", "bearer", id="bearer beats session cookie"),
]

# Status codes the /status/<code> routes answer with, and the outcome memwatch must record.
STATUS_OUTCOMES = {200: "ok", 401: "rejected", 403: "rejected", 404: "client_error", 500: "server_error"}


def expected_matrix(
    status_route: str, boom_route: str, auth: str, method: str = "GET"
) -> dict[tuple[str, str, str, str], int]:
    """The counts after one request per STATUS_OUTCOMES code and one to the raising route."""
    expected: dict[tuple[str, str, str, str], int] = Counter()  # type: ignore[assignment]
    for outcome in STATUS_OUTCOMES.values():
        expected[(status_route, method, auth, outcome)] += 1
    expected[(boom_route, method, auth, "server_error")] += 1
    return dict(expected)


async def communicate(
    app: Any, scope: dict[str, Any], body: bytes = b"", timeout: float = 5.0
) -> list[dict[str, Any]]:
    """One HTTP request through asgiref's ApplicationCommunicator: sends the request body,
    collects every message up to the final body message, then waits for the app to return.
    ``receive`` blocks like a live connection (no early ``http.disconnect``)."""
    from asgiref.testing import ApplicationCommunicator

    communicator = ApplicationCommunicator(app, scope)
    await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
    messages: list[dict[str, Any]] = []
    while True:
        message = await communicator.receive_output(timeout)
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            break
    await communicator.wait(timeout)
    return messages
