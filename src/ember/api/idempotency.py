"""``Idempotency-Key`` on POST: a retry with the same key (by the same token) answers the
first response and changes nothing; the same key on a different request is a 422."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb

from ember.api.errors import envelope
from ember.core.tenancy import Principal
from ember.store.db import Database


@dataclasses.dataclass(frozen=True)
class IdempotencyContext:
    key: str | None
    request_hash: str
    locks: Database | None = None
    """Where the per-key lock is held: a pool apart from the one the work uses."""


async def context(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="Retry-safe key: a retry answers the first response."),
    ] = None,
) -> IdempotencyContext:
    body = await request.body()
    digest = hashlib.sha256(
        request.method.encode() + b" " + request.url.path.encode() + b"\n" + body
    ).hexdigest()
    locks: Database | None = getattr(request.app.state, "idempotency_locks", None)
    return IdempotencyContext(idempotency_key or None, digest, locks)


Idem = Annotated[IdempotencyContext, Depends(context)]


def run(
    db: Database,
    ctx: IdempotencyContext,
    who: Principal,
    fn: Callable[[], tuple[int, Any]],
    *,
    secret_field: str | None = None,
) -> JSONResponse:
    """Run ``fn`` (returning status and a JSON-able body) at most once per key.

    ``secret_field`` names a field that must never be stored (a new token's secret): a
    replay of such a response answers 409 instead of the secret.
    """
    if ctx.key is None:
        status, body = fn()
        return JSONResponse(body, status_code=status)
    lock = zlib.crc32(f"{who.token_id}\0{ctx.key}".encode())
    with (ctx.locks or db).connection() as conn:
        # A concurrent retry with the same key waits here for the first one's answer.
        conn.execute("SELECT pg_advisory_lock(1162, %s)", (lock - 2**31,))
        try:
            row = conn.execute(
                "SELECT request_hash, status, body FROM api_idempotency "
                "WHERE token_id = %s AND key = %s",
                (who.token_id, ctx.key),
            ).fetchone()
            if row is not None:
                if row[0] != ctx.request_hash:
                    return JSONResponse(
                        envelope(
                            "request.idempotency_key_reused",
                            "this Idempotency-Key was already used for a different request",
                            {"idempotency_key": ctx.key},
                            "use a fresh key for a new request",
                        ),
                        status_code=422,
                    )
                if secret_field and row[1] < 300:
                    return JSONResponse(
                        envelope(
                            "request.secret_not_replayable",
                            "this request already succeeded and its secret is shown only once",
                            {"id": row[2].get("id")},
                            "revoke that token and create a new one",
                        ),
                        status_code=409,
                    )
                return JSONResponse(
                    row[2], status_code=row[1], headers={"Idempotent-Replayed": "true"}
                )
            status, body = fn()
            stored = {k: v for k, v in body.items() if k != secret_field}
            if status < 500:
                conn.execute(
                    "INSERT INTO api_idempotency (token_id, key, request_hash, status, body) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (who.token_id, ctx.key, ctx.request_hash, status, Jsonb(stored)),
                )
            return JSONResponse(body, status_code=status)
        finally:
            conn.execute("SELECT pg_advisory_unlock(1162, %s)", (lock - 2**31,))
