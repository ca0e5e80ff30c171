"""CLEAN: the same app and traffic as :mod:`tests.corpus.flask_basic_audit`, but the decoded
credential goes into a bounded ``functools.lru_cache(maxsize=128)`` keyed by the credential.

The cache fills within the first few hundred requests and then churns at a constant size (the
user pool is larger than 128): memory stays flat.
"""

from __future__ import annotations

import functools

import memwatch
from tests.corpus import common, reports_base


@functools.lru_cache(maxsize=128)
def _authenticate(user: str, password: str) -> dict[str, str] | None:
    return (
        {"user": user, "display": user.replace("-", " ").title()}
        if common.basic_valid(user, password)
        else None
    )


flask_app = reports_base.create_app(_authenticate, audited=set())
app = memwatch.wrap(flask_app)
