"""FIXED twin of tests.corpus.flask_basic_audit: the audit list is a deque(maxlen=...).

The fix is ``LOGIN_METRICS`` below.

The original's docstring:

LEAK: a Flask Basic-auth decorator that appends every decoded credential to a global list.

On ``/reports/<int:rid>`` (GET, basic) each successful login is also appended, "for metrics", as a
log line holding the decoded credential (a str of 250-350 bytes) to ``LOGIN_METRICS``, which
nothing ever trims. ``/reports`` uses the same auth scheme and decorator without the audit; the
other routes use other schemes. The credentials repeat (a pool of users), so the growth follows
requests, not distinct credentials.
"""

from __future__ import annotations

import time
from collections import deque

from flask import request

import memwatch
from tests.corpus import common, reports_base

LOGIN_METRICS: deque[str] = deque(maxlen=128)


def _authenticate(user: str, password: str) -> dict[str, str] | None:
    return {"user": user} if common.basic_valid(user, password) else None


def _record_login(user: str, password: str) -> None:
    LOGIN_METRICS.append(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}.{time.time() % 1:.6f} login user={user}:{password} "
        f"method={request.method} path={request.path} ip={request.remote_addr} "
        f"agent={request.headers.get('User-Agent', '-')} "
        f"accept={request.headers.get('Accept', '-')} "
        f"request={request.headers.get('X-Request-Id', '-')}"
    )


reports_base.ON_AUDITED_LOGIN = _record_login
flask_app = reports_base.create_app(_authenticate, audited={"report"})
app = memwatch.wrap(flask_app)
