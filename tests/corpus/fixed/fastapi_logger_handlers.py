"""FIXED twin of tests.corpus.fastapi_logger_handlers: one handler, configured at startup.

The fix: the handler is added once, at import, and the request id travels with each record (``extra=``).

The original's docstring:

LEAK under asyncio: a FastAPI payments API that adds a logging handler per request.

``POST /payments`` (apikey) attaches a request-scoped handler to the ``eval.payments`` logger to
tag its log lines with the request id, and never removes it. Each handler (with its lock, its
filter list and logging's weak references to it) stays alive, attached to the logger. The logger
logs at DEBUG, which is disabled, so the growing handler list costs no time per request — only
memory. The other routes keep nothing.
"""

from __future__ import annotations

import io
import logging

from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

import memwatch
from tests.corpus import common

log = logging.getLogger("eval.payments")
log.setLevel(logging.INFO)
log.propagate = False


class RequestContextHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the payments log with the request id (from each record's ``extra``) in front."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.setFormatter(logging.Formatter("[%(request_id)s] %(levelname)s %(message)s"))


log.addHandler(RequestContextHandler())  # once, at startup


class Payment(BaseModel):
    amount: int
    currency: str = "EUR"
    reference: str = ""


fastapi_app = FastAPI()


@fastapi_app.post("/payments", status_code=201)
async def create_payment(
    payment: Payment, request: Request, x_api_key: str | None = Header(default=None)
) -> dict[str, object]:
    if not common.api_key_valid(x_api_key):
        raise HTTPException(status_code=401)
    request_id = request.headers.get("x-request-id", "-")
    log.debug(
        "payment of %s %s accepted",
        payment.amount,
        payment.currency,
        extra={"request_id": request_id},
    )
    return {"accepted": True, "amount": payment.amount}


@fastapi_app.get("/payments/{payment_id}")
async def get_payment(
    payment_id: int, x_api_key: str | None = Header(default=None)
) -> dict[str, object]:
    if not common.api_key_valid(x_api_key):
        raise HTTPException(status_code=401)
    return {"id": payment_id, "state": "settled"}


@fastapi_app.get("/me")
async def me(request: Request) -> dict[str, object]:
    token = common.bearer_of(request.headers.get("authorization"))
    claims = common.decode_token(token) if token else None
    if claims is None:
        raise HTTPException(status_code=401)
    return {"user": claims["sub"]}


@fastapi_app.get("/rates")
async def rates() -> dict[str, float]:
    return {"EUR": 1.0, "USD": 1.08, "GBP": 0.86}


app = memwatch.wrap(fastapi_app)
