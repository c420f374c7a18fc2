"""Apps and their environments."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ember.api import convert, idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.wire import models as w

router = APIRouter(prefix="/v1/orgs/{org}/apps", tags=["apps"])


@router.get("", response_model=w.Page[w.App], responses=ERRORS)
def list_apps(org: str, svc: Svc, who: Who, page: Paging) -> w.Page[w.App]:
    rows = svc.list_apps(who, org, page.cursor, page.limit)
    return w.Page(
        items=[convert.app(r) for r in rows],
        next_cursor=rows[-1]["name"] if len(rows) == page.limit else None,
    )


@router.post("", response_model=w.App, status_code=201, responses={200: {"model": w.App}, **ERRORS})
def create_app(org: str, body: w.AppCreate, svc: Svc, who: Who, idem: idempotency.Idem) -> Response:
    """Create an app; 200 with the existing app when it already exists."""

    def go() -> tuple[int, object]:
        row, created = svc.create_app(who, org, body.name)
        return (201 if created else 200), convert.dump(convert.app(row))

    return idempotency.run(svc.db, idem, who, go)


@router.get("/{app}", response_model=w.App, responses=ERRORS)
def get_app(org: str, app: str, svc: Svc, who: Who) -> w.App:
    return convert.app(svc.visible_app(who, org, app))


@router.delete("/{app}", status_code=204, responses=ERRORS)
def delete_app(org: str, app: str, svc: Svc, who: Who) -> Response:
    svc.delete_app(who, org, app)
    return Response(status_code=204)


@router.get("/{app}/envs", response_model=w.Page[w.Env], responses=ERRORS)
def list_envs(org: str, app: str, svc: Svc, who: Who, page: Paging) -> w.Page[w.Env]:
    rows = svc.list_envs(who, org, app, page.cursor, page.limit)
    return w.Page(
        items=[convert.env(r) for r in rows],
        next_cursor=rows[-1]["name"] if len(rows) == page.limit else None,
    )


@router.post(
    "/{app}/envs",
    response_model=w.Env,
    status_code=201,
    responses={200: {"model": w.Env}, **ERRORS},
)
def create_env(
    org: str, app: str, body: w.EnvCreate, svc: Svc, who: Who, idem: idempotency.Idem
) -> Response:
    def go() -> tuple[int, object]:
        row, created = svc.create_env(who, org, app, body.name)
        return (201 if created else 200), convert.dump(convert.env(row))

    return idempotency.run(svc.db, idem, who, go)


@router.get("/{app}/envs/{env}", response_model=w.Env, responses=ERRORS)
def get_env(org: str, app: str, env: str, svc: Svc, who: Who) -> w.Env:
    return convert.env(svc.visible_env(who, org, app, env))


@router.delete("/{app}/envs/{env}", status_code=204, responses=ERRORS)
def delete_env(org: str, app: str, env: str, svc: Svc, who: Who) -> Response:
    svc.delete_env(who, org, app, env)
    return Response(status_code=204)
