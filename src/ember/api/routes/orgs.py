"""Orgs and their members."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ember.api import convert, idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.wire import models as w

router = APIRouter(prefix="/v1/orgs", tags=["orgs"])


@router.get("", response_model=w.Page[w.Org], responses=ERRORS)
def list_orgs(svc: Svc, who: Who, page: Paging) -> w.Page[w.Org]:
    rows = svc.list_orgs(who, page.cursor, page.limit)
    return w.Page(
        items=[convert.org(r) for r in rows],
        next_cursor=rows[-1]["name"] if len(rows) == page.limit else None,
    )


@router.post("", response_model=w.Org, status_code=201, responses={200: {"model": w.Org}, **ERRORS})
def create_org(body: w.OrgCreate, svc: Svc, who: Who, idem: idempotency.Idem) -> Response:
    def go() -> tuple[int, object]:
        row, created = svc.create_org(who, body.name)
        return (201 if created else 200), convert.dump(convert.org(row))

    return idempotency.run(svc.db, idem, who, go)


@router.get("/{org}", response_model=w.Org, responses=ERRORS)
def get_org(org: str, svc: Svc, who: Who) -> w.Org:
    return convert.org(svc.visible_org(who, org))


@router.get("/{org}/members", response_model=w.Page[w.Member], responses=ERRORS)
def list_members(org: str, svc: Svc, who: Who, page: Paging) -> w.Page[w.Member]:
    rows = svc.list_members(who, org, page.cursor, page.limit)
    return w.Page(
        items=[convert.member(r) for r in rows],
        next_cursor=rows[-1]["email"] if len(rows) == page.limit else None,
    )


@router.post("/{org}/members", response_model=w.Member, responses=ERRORS)
def set_member(org: str, body: w.MemberAdd, svc: Svc, who: Who, idem: idempotency.Idem) -> Response:
    """Add a user to the org, or change their role (idempotent)."""

    def go() -> tuple[int, object]:
        return 200, convert.dump(convert.member(svc.set_member(who, org, body.email, body.role)))

    return idempotency.run(svc.db, idem, who, go)


@router.delete("/{org}/members/{user_id}", status_code=204, responses=ERRORS)
def remove_member(org: str, user_id: str, svc: Svc, who: Who) -> Response:
    svc.remove_member(who, org, user_id)
    return Response(status_code=204)
