"""Which authentication path a request took, and a handle on its credential for counting.

The scheme becomes the ``auth`` label: one of :data:`AUTH_SCHEMES`. The credential (token, Basic
blob, API key, session id) is returned only so that the monitor can fold a keyed hash of it into a
fixed-size sketch of distinct credentials; it is never stored, logged or exported.

Classification reads only what it needs, in this order: the ``Authorization`` header, the
configured API-key headers, the configured query-string parameters, the configured session
cookies. Explicit credentials win over ambient ones (a browser's session cookie on an API call
with a token is a token request). Malformed input (not base64, not UTF-8, empty, huge, odd
whitespace) never raises: it falls into the nearest honest category.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from memwatch.config import Config

AUTH_SCHEMES = ("bearer", "basic", "digest", "apikey", "session", "other", "anonymous")

# Authorization schemes that carry an API key rather than a user credential (DRF's "Token",
# "Api-Key" from djangorestframework-api-key, and common variants).
_APIKEY_SCHEMES = frozenset({"token", "apikey", "api-key", "api_key", "key"})
_NAMED_SCHEMES = {"bearer": "bearer", "basic": "basic", "digest": "digest"}

# Long header values are cut before anything else looks at them: bounded work per request.
_MAX_VALUE = 8192

Classified = tuple[str, str | None]
# Byte values whose latin-1 character str.isspace() is true for (what the slow path strips).
_BLANK_BYTES = frozenset(c for c in range(256) if chr(c).isspace())
ANONYMOUS: Classified = ("anonymous", None)


class FastPathTables(NamedTuple):
    """What the compiled recorder (:mod:`memwatch.recorder`) needs to decide the common cases
    exactly as :class:`AuthClassifier` does, and to know when to hand a request back to it."""

    apikey_raw: tuple[bytes, ...]  # API-key header names as ASGI sends them (lower case)
    apikey_environ: tuple[str, ...]  # the same as WSGI environ keys, in the order tried
    query_needles: tuple[bytes, ...]  # "name=" of each query credential, lower case
    cookie_needles: tuple[bytes, ...]  # "name=" of each session cookie, lower case
    blank: bytes  # 256 flags: 1 where the latin-1 character is whitespace (str.isspace)


class AuthClassifier:
    """Classifies a request's authentication path from its headers, query and cookies."""

    def __init__(self, config: Config) -> None:
        self._apikey_environ = tuple(
            "HTTP_" + name.upper().replace("-", "_") for name in config.apikey_headers
        )
        self._apikey_raw = frozenset(name.encode("latin-1") for name in config.apikey_headers)
        self._wanted = self._apikey_raw | {b"authorization", b"cookie"}
        self._query = tuple(
            (name + "=", "bearer" if name == "access_token" else "apikey")
            for name in config.query_credentials
        )
        self._cookies = tuple(name + "=" for name in config.session_cookies)
        self._cookies_lower = tuple(c.lower() for c in self._cookies)

    def fast_path_tables(self) -> FastPathTables:
        """The tables the compiled recorder works from (needles it cannot match as ASCII are
        kept as they are: a non-ASCII needle always sends the request to this classifier)."""
        return FastPathTables(
            apikey_raw=tuple(sorted(self._apikey_raw)),
            apikey_environ=self._apikey_environ,
            query_needles=tuple(
                needle.encode("utf-8", "surrogatepass") for needle, _scheme in self._query
            ),
            cookie_needles=tuple(
                needle.encode("utf-8", "surrogatepass") for needle in self._cookies_lower
            ),
            blank=bytes(1 if c in _BLANK_BYTES else 0 for c in range(256)),
        )

    def from_environ(self, environ: dict[str, object]) -> Classified:
        """Classify a WSGI request."""
        authorization = environ.get("HTTP_AUTHORIZATION")
        if authorization:
            scheme = classify_authorization(str(authorization))
            if scheme is not ANONYMOUS:  # a blank header leaves the other sources to decide
                return scheme
        for key in self._apikey_environ:
            value = environ.get(key)
            if value:
                return "apikey", str(value)[:_MAX_VALUE]
        query = environ.get("QUERY_STRING")
        if query:
            found = self._from_query(str(query))
            if found is not None:
                return found
        cookie = environ.get("HTTP_COOKIE")
        if cookie:
            found = self._from_cookie(str(cookie))
            if found is not None:
                return found
        return ANONYMOUS

    def from_scope(self, scope: dict[str, object] | object) -> Classified:
        """Classify an ASGI HTTP request from its scope."""
        get = getattr(scope, "get", None)
        if get is None:
            return ANONYMOUS
        headers: Iterable[tuple[bytes, bytes]] = get("headers") or ()
        # One set look-up per header, in one pass: cheaper than building a dict of them (which
        # allocates a table per request) and exact for repeated names (the last Authorization,
        # the first non-empty API-key header, every Cookie joined).
        wanted = self._wanted
        authorization: bytes | None = None
        apikey: bytes | None = None
        cookie: bytes | None = None
        for name, value in headers:
            if name in wanted:
                if name == b"authorization":
                    authorization = value
                elif name == b"cookie":
                    cookie = value if cookie is None else cookie + b"; " + value
                elif not apikey:
                    apikey = value
        if authorization:
            # The common case without a call: "Bearer <token>" needing no stripping (what
            # classify_authorization returns for it, checked by the tests).
            if (
                authorization.startswith(b"Bearer ")
                and 8 <= len(authorization) <= _MAX_VALUE
                and authorization[7] not in _BLANK_BYTES
                and authorization[-1] not in _BLANK_BYTES
            ):
                return "bearer", authorization[7:].decode("latin-1")
            scheme = classify_authorization(bytes(authorization[:_MAX_VALUE]).decode("latin-1"))
            if scheme is not ANONYMOUS:  # a blank header leaves the other sources to decide
                return scheme
        if apikey:
            return "apikey", bytes(apikey[:_MAX_VALUE]).decode("latin-1")
        query = get("query_string")
        if query:
            found = self._from_query(bytes(query)[:_MAX_VALUE].decode("latin-1"))
            if found is not None:
                return found
        if cookie:
            found = self._from_cookie(bytes(cookie).decode("latin-1"))
            if found is not None:
                return found
        return ANONYMOUS

    # Names are compared on each part's own prefix, not through offsets into a lowered copy:
    # str.lower() can change a string's length (U+0130 becomes two characters), which would
    # shift the offsets and let the credential slice run past the bound.
    def _from_query(self, query: str) -> Classified | None:
        query = query[:_MAX_VALUE]
        lowered = query.lower()
        for needle, scheme in self._query:
            if needle not in lowered:
                continue
            for part in query.split("&"):
                if part[: len(needle)].lower() == needle:
                    return scheme, part[len(needle) :] or None
        return None

    def _from_cookie(self, cookie: str) -> Classified | None:
        cookie = cookie[:_MAX_VALUE]
        lowered = cookie.lower()
        for needle in self._cookies_lower:
            if needle not in lowered:
                continue
            for part in cookie.split(";"):
                stripped = part.lstrip()
                if stripped[: len(needle)].lower() == needle:
                    return "session", stripped[len(needle) :].strip() or None
        return None


def classify_authorization(header: str) -> Classified:
    """Classify an ``Authorization`` header value (RFC 9110 ``credentials``)."""
    if header.startswith("Bearer ") and len(header) <= _MAX_VALUE:
        # The common case, decided without copies: what the general rules below return for a
        # value that needs no stripping.
        token = header[7:]
        if token and not token[0].isspace() and not token[-1].isspace():
            return "bearer", token
    value = header[:_MAX_VALUE].strip()
    if not value:
        return ANONYMOUS
    # Any whitespace separates the scheme, as in the frameworks that read the header (DRF's
    # get_authorization_header().split()): "Bearer\tabc" is a bearer token.
    scheme, *tail = value.split(None, 1)
    lowered = scheme.lower()
    rest = tail[0].strip() if tail else ""
    named = _NAMED_SCHEMES.get(lowered)
    if named == "digest":
        return "digest", _digest_username(rest)
    if named is not None:
        return named, rest or None
    if lowered in _APIKEY_SCHEMES:
        return "apikey", rest or None
    # A bare value without a scheme ("Authorization: abc123") is a key in practice.
    if not rest:
        return "apikey", scheme
    return "other", rest


def _digest_username(params: str) -> str | None:
    """The ``username`` of a Digest response: every request carries a new nonce, so the user is
    what identifies the credential."""
    for part in params.split(","):
        key, _, val = part.strip().partition("=")
        if key.strip().lower() in ("username", "username*"):
            return val.strip().strip('"') or None
    return None
