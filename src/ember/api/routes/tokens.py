"""API tokens (self-service) and whoami."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ember.api import convert, idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.core.tenancy import check_capabilities
from ember.wire import models as w

router = APIRouter(tags=["tokens"])


@router.get("/v1/whoami", response_model=w.WhoAmI, responses=ERRORS)
def whoami(svc: Svc, who: Who) -> w.WhoAmI:
    row = svc.token(who.token_id)
    assert row is not None
    return w.WhoAmI(
        user_id=who.user_id,
        email=who.email,
        token=convert.token(row),
        orgs=[convert.org(r) for r in svc.list_orgs(who, None, 200)],
    )


@router.get("/v1/tokens", response_model=w.Page[w.Token], responses=ERRORS)
def list_tokens(svc: Svc, who: Who, page: Paging) -> w.Page[w.Token]:
    rows = svc.list_tokens(who, page.cursor, page.limit)
    return w.Page(
        items=[convert.token(r) for r in rows],
        next_cursor=rows[-1]["token_id"] if len(rows) == page.limit else None,
    )


@router.post("/v1/tokens", response_model=w.TokenCreated, status_code=201, responses=ERRORS)
def create_token(body: w.TokenCreate, svc: Svc, who: Who, idem: idempotency.Idem) -> Response:
    """Create a token for yourself, never wider than the token making the request.
    The secret is in the response only: store it now."""

    def go() -> tuple[int, object]:
        secret, row = svc.create_token(
            who,
            body.name,
            org=body.org,
            app=body.app,
            env=body.env,
            capabilities=check_capabilities(body.capabilities),
            expires_in_days=body.expires_in_days,
        )
        out = w.TokenCreated(**convert.token(row).model_dump(), token=secret)
        return 201, convert.dump(out)

    return idempotency.run(svc.db, idem, who, go, secret_field="token")  # noqa: S106 - a field name


@router.delete("/v1/tokens/{token_id}", status_code=204, responses=ERRORS)
def revoke_token(token_id: str, svc: Svc, who: Who) -> Response:
    """Revoke one of your tokens; it stops working on the next request."""
    svc.revoke_token(who, token_id)
    return Response(status_code=204)
