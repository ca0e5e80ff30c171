"""CLEAN: a plain FastAPI JSON API with several routes and every common auth scheme.

Pydantic models in and out, async dependencies for auth, path and query parameters, one sync
endpoint (run in the thread pool); nothing kept between requests.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

import memwatch
from tests.corpus import common


class Account(BaseModel):
    id: int
    owner: str
    balance_cents: int
    currency: str = "EUR"


class Transaction(BaseModel):
    id: int
    amount_cents: int
    label: str


class QuoteIn(BaseModel):
    amount_cents: int
    currency: str = "EUR"


async def bearer_user(request: Request) -> str:
    token = common.bearer_of(request.headers.get("authorization"))
    claims = common.decode_token(token) if token else None
    if claims is None:
        raise HTTPException(status_code=401)
    return str(claims["sub"])


async def api_client(x_api_key: str | None = Header(default=None)) -> str:
    if not common.api_key_valid(x_api_key):
        raise HTTPException(status_code=401)
    return str(x_api_key)[:8]


async def session_user(request: Request) -> str:
    sid = common.session_from_cookie(request.headers.get("cookie"))
    if not common.session_valid(sid):
        raise HTTPException(status_code=401)
    return str(sid)[:8]


async def basic_user(request: Request) -> str:
    parsed = common.parse_basic(request.headers.get("authorization"))
    if parsed is None or not common.basic_valid(*parsed):
        raise HTTPException(status_code=401)
    return parsed[0]


fastapi_app = FastAPI()


@fastapi_app.get("/v1/accounts/{account_id}")
async def account(account_id: int, user: str = Depends(bearer_user)) -> Account:
    return Account(id=account_id, owner=user, balance_cents=account_id * 113 % 100_000)


@fastapi_app.get("/v1/accounts/{account_id}/transactions")
async def transactions(
    account_id: int, limit: int = 10, user: str = Depends(bearer_user)
) -> list[Transaction]:
    return [
        Transaction(id=account_id * 100 + i, amount_cents=(i * 37) % 900 - 450, label=f"tx {i}")
        for i in range(min(limit, 20))
    ]


@fastapi_app.post("/v1/quotes")
async def quote(body: QuoteIn, client: str = Depends(api_client)) -> dict[str, object]:
    return {"amount_cents": body.amount_cents, "fee_cents": body.amount_cents // 100 + 30}


@fastapi_app.get("/v1/profile")
def profile(user: str = Depends(session_user)) -> dict[str, object]:
    return {"session": user, "theme": "light"}  # a sync endpoint: runs in the thread pool


@fastapi_app.get("/v1/legacy/export")
async def legacy(user: str = Depends(basic_user)) -> dict[str, object]:
    return {"user": user, "rows": [[i, i * i] for i in range(8)]}


@fastapi_app.get("/v1/status")
async def status() -> dict[str, str]:
    return {"status": "ok"}


app = memwatch.wrap(fastapi_app)
