"""Credentials shared by the corpus apps and the traffic generator.

Every credential verifies itself with an HMAC over a fixed test secret, so that apps need no user
table and the traffic generator can mint as many valid (or deliberately wrong) credentials as it
wants:

- Bearer: a JWT-like ``header.payload.signature`` (base64url JSON, HMAC-SHA256), one per session;
- Basic: ``user-NNNN`` with the password :func:`password_for` gives;
- API key: ``ak_<id>_<mac>`` in ``X-Api-Key``;
- session: ``<id>.<mac>`` in the ``sessionid`` cookie.

Nothing here is a secret: these are test fixtures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

SECRET = b"memwatch-corpus-not-a-secret"
_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()


def _mac(text: str, length: int = 16) -> str:
    return hmac.new(SECRET, text.encode(), hashlib.sha256).hexdigest()[:length]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- Bearer ----------------------------------------------------------------------------------


def mint_token(user: int, session: int, issued_at: int = 1_763_900_000) -> str:
    """A signed JWT-like token for ``user``'s ``session`` (about 330 characters)."""
    claims = {
        "sub": f"user-{user:06d}",
        "sid": f"{session:012x}",
        "iss": "https://auth.corpus.example",
        "aud": "orders-api",
        "iat": issued_at,
        "exp": issued_at + 3600,
        "scope": "orders:read orders:write profile",
        "tenant": f"tenant-{user % 97:03d}",
        "roles": ["customer"] if user % 5 else ["customer", "support"],
    }
    body = _HEADER + "." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    return body + "." + signature


def decode_token(token: str) -> dict[str, Any] | None:
    """The claims of a valid token, or None (bad format or signature)."""
    body, _, signature = token.rpartition(".")
    if not body or "." not in body:
        return None
    expected = _b64(hmac.new(SECRET, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        claims = json.loads(_unb64(body.split(".", 1)[1]))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def bearer_of(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


# --- Basic -----------------------------------------------------------------------------------


def user_name(user: int) -> str:
    return f"user-{user:04d}"


def password_for(user: str) -> str:
    return "pw-" + _mac("basic:" + user, 12)


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_basic(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from a Basic ``Authorization`` header, or None."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def basic_valid(user: str, password: str) -> bool:
    return hmac.compare_digest(password, password_for(user))


# --- API keys and sessions -------------------------------------------------------------------


def api_key(n: int) -> str:
    return f"ak_{n:05d}_{_mac(f'apikey:{n}')}"


def api_key_valid(key: str | None) -> bool:
    if not key or not key.startswith("ak_"):
        return False
    _, n, mac = [*key.split("_"), "", ""][:3]
    return n.isdigit() and hmac.compare_digest(mac, _mac(f"apikey:{int(n)}"))


def session_id(n: int) -> str:
    return f"{n:08x}.{_mac(f'session:{n}', 24)}"


def session_valid(sid: str | None) -> bool:
    if not sid or "." not in sid:
        return False
    n, mac = sid.split(".", 1)
    try:
        value = int(n, 16)
    except ValueError:
        return False
    return hmac.compare_digest(mac, _mac(f"session:{value}", 24))


def session_from_cookie(cookie: str | None) -> str | None:
    for part in (cookie or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "sessionid":
            return value
    return None
