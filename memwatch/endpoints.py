"""memwatch's own endpoints, served before the app sees the request.

- ``GET <metrics_path>`` (default ``/metrics``): Prometheus text exposition; open unless
  ``metrics_token`` is set, then ``Authorization: Bearer <token>`` is required (401 otherwise).
- ``GET <report_path>report.json`` and ``GET <report_path>`` (default ``/memwatch/``): the report as
  JSON and as an HTML page. Loopback clients need no token; anyone else needs ``token``
  (``Authorization: Bearer``); otherwise 404, so that the endpoints do not advertise themselves.
- ``POST <report_path>diagnose``: opens a diagnosis window now, with the report's access rules;
  answers 202 and ``{"started": ..., "active": ...}``. While the duty-cycle pause after a
  previous window is still running (never for the first on-demand window) it answers 429 with
  ``Retry-After`` (seconds) and ``{"started": false, ..., "retry_after_seconds": ...,
  "not_before": ...}``, unless the query string says ``force=1`` (or ``true``, ``yes``, ``on``).

A request that came through a proxy (``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP``) is not
a loopback request unless it came from one of ``trusted_proxies`` and the forwarded client is on
loopback: a reverse proxy on the same host must not open the report to the internet. Tokens are
compared in constant time.

The module is protocol-free: the middlewares hand it a :class:`EndpointRequest` and send back the
:class:`EndpointResponse` it returns.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from memwatch.config import Config

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class EndpointRequest:
    method: str
    path: str
    client: str | None  # peer address as the server saw it
    authorization: str | None
    forwarded_for: str | None  # X-Forwarded-For / Forwarded / X-Real-IP, whichever came
    query: str = ""  # the raw query string (QUERY_STRING, the ASGI scope's query_string)


@dataclass(frozen=True)
class EndpointResponse:
    status: int
    headers: Headers
    body: bytes

    @property
    def status_line(self) -> str:
        return f"{self.status} {_REASONS.get(self.status, 'Unknown')}"


_REASONS = {
    200: "OK",
    202: "Accepted",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
}

_NO_STORE = ("Cache-Control", "no-store")


def _text(status: int, text: str, extra: Headers | None = None) -> EndpointResponse:
    body = text.encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        _NO_STORE,
    ]
    return EndpointResponse(status, headers + (extra or []), body)


NOT_FOUND = _text(404, "Not Found")
# memwatch failed to answer one of its own paths. The request is not handed to the app: it may
# carry memwatch's token, and the app has nothing to say about memwatch's paths.
INTERNAL_ERROR = _text(500, "Internal Server Error")


class Endpoints:
    """Routes memwatch's paths to renderers and applies the access rules.

    :param config: The options (paths, tokens, trusted proxies).
    :param metrics: Renders the Prometheus exposition; returns (content type, body).
    :param report_json: Renders the report as JSON bytes.
    :param report_html: Renders the report page as HTML bytes.
    :param diagnose: Opens a diagnosis window (its argument: the request forces it); returns the
        JSON body and, when the window was refused for the duty cycle, the seconds to wait.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: Callable[[str | None], tuple[str, bytes]],
        report_json: Callable[[], bytes],
        report_html: Callable[[], bytes],
        diagnose: Callable[[bool], tuple[bytes, float | None]] | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._report_json = report_json
        self._report_html = report_html
        self._diagnose = diagnose or _no_diagnosis
        self.diagnose_path = config.report_path + "diagnose"
        self.metrics_path = config.metrics_path or None
        self.report_path = config.report_path
        self.report_json_path = config.report_path + "report.json"
        self._trusted = tuple(_parse_network(p) for p in config.trusted_proxies)

    def handles(self, path: str) -> bool:
        """True when the path is one of memwatch's own (cheap: called on every request)."""
        return path == self.metrics_path or path.startswith(self.report_path)

    def respond(self, request: EndpointRequest, accept: str | None = None) -> EndpointResponse:
        response = self._route(request, accept)
        if request.method == "HEAD" and response.body:
            # Every answer to HEAD goes without a body (401 and 404 too), headers unchanged.
            return EndpointResponse(response.status, response.headers, b"")
        return response

    def _route(self, request: EndpointRequest, accept: str | None) -> EndpointResponse:
        path = request.path
        if path == self.metrics_path:
            return self._serve_metrics(request, accept)
        if path == self.diagnose_path:
            if not self.report_allowed(request):
                return NOT_FOUND
            if request.method != "POST":
                return _text(405, "Method Not Allowed", [("Allow", "POST")])
            body, retry_after = self._diagnose(_forced(request.query))
            if retry_after is not None:
                headers = [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    _NO_STORE,
                    ("Retry-After", str(max(math.ceil(retry_after), 1))),
                ]
                return EndpointResponse(429, headers, body)
            return _bytes(202, "application/json", body, request.method)
        if path not in (self.report_path, self.report_json_path, self.report_path + "index.html"):
            return NOT_FOUND
        if not self.report_allowed(request):
            return NOT_FOUND
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", [("Allow", "GET, HEAD")])
        if path == self.report_json_path:
            body = self._report_json()
            content_type = "application/json"
        else:
            body = self._report_html()
            content_type = "text/html; charset=utf-8"
        return _bytes(200, content_type, body, request.method)

    def _serve_metrics(self, request: EndpointRequest, accept: str | None) -> EndpointResponse:
        token = self.config.metrics_token
        if token is not None and not _bearer_matches(request.authorization, token):
            return _text(401, "Unauthorized", [("WWW-Authenticate", 'Bearer realm="metrics"')])
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", [("Allow", "GET, HEAD")])
        content_type, body = self._metrics(accept)
        return _bytes(200, content_type, body, request.method)

    def report_allowed(self, request: EndpointRequest) -> bool:
        """Loopback clients without a token; anyone with the configured token."""
        token = self.config.token
        if token is not None and _bearer_matches(request.authorization, token):
            return True
        return self.is_loopback(request)

    def is_loopback(self, request: EndpointRequest) -> bool:
        peer = _parse_address(request.client)
        if peer is None:
            return False
        if request.forwarded_for is None:
            return peer.is_loopback
        if not self._is_trusted(peer):
            return False  # forwarded by someone we do not trust: treat as remote
        # The client is the right-most address not belonging to a trusted proxy; when every hop
        # is a trusted proxy, the left-most one is the client.
        address = None
        for hop in reversed([h.strip() for h in request.forwarded_for.split(",")]):
            address = _parse_address(hop)
            if address is None:
                return False
            if not self._is_trusted(address):
                return address.is_loopback
        return address is not None and address.is_loopback

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._trusted)


def _no_diagnosis(force: bool) -> tuple[bytes, float | None]:
    return b'{"started": false}', None


def _forced(query: str) -> bool:
    """``force=1`` (or ``true``, ``yes``, ``on``) in a query string."""
    if "force" not in query:
        return False
    return any(
        name == "force" and value.strip().lower() in ("1", "true", "yes", "on")
        for name, value in parse_qsl(query, keep_blank_values=True)
    )


def _bytes(status: int, content_type: str, body: bytes, method: str) -> EndpointResponse:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), _NO_STORE]
    return EndpointResponse(status, headers, b"" if method == "HEAD" else body)


def _bearer_matches(authorization: str | None, token: str) -> bool:
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Servers hand header values over as latin-1 text (PEP 3333, the ASGI spec): encoding them
    # back to latin-1 recovers the bytes the client sent, which are the token's UTF-8 bytes.
    sent = value.strip().encode("latin-1", "replace")
    return hmac.compare_digest(sent, token.encode("utf-8"))


def _parse_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [::1]:8000
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # 127.0.0.1:8000
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip(), strict=False)
