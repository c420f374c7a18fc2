"""Releases of an app's environment: deploy, list, show, roll back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from ember.api import convert, idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.releases import Releases
from ember.wire import models as w

router = APIRouter(prefix="/v1/orgs/{org}/apps/{app}/envs/{env}", tags=["releases"])


def releases(request: Request) -> Releases:
    svc: Releases = request.app.state.releases
    return svc


Rel = Annotated[Releases, Depends(releases)]


@router.post(
    "/releases",
    response_model=w.ReleaseDetail,
    status_code=201,
    responses={200: {"model": w.ReleaseDetail}, **ERRORS},
)
def deploy(
    org: str,
    app: str,
    env: str,
    body: w.ReleaseCreate,
    svc: Svc,
    rel: Rel,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Create a release of the pinned image and manifest and promote it in the env.
    200 with the live release when it is identical (nothing new is created)."""

    def go() -> tuple[int, object]:
        row, created = rel.deploy(
            who,
            org,
            app,
            env,
            repository=body.image.repository,
            digest=body.image.digest,
            manifest_text=body.manifest,
            auto_rollback=body.auto_rollback,
        )
        return (201 if created else 200), convert.release(row, app, detail=True).model_dump(
            mode="json"
        )

    return idempotency.run(svc.db, idem, who, go)


@router.get("/releases", response_model=w.Page[w.Release], responses=ERRORS)
def list_releases(
    org: str, app: str, env: str, rel: Rel, who: Who, page: Paging
) -> w.Page[w.Release]:
    """Newest first; ``cursor`` is the version to list below."""
    before = int(page.cursor) if page.cursor and page.cursor.isdigit() else None
    rows = rel.list(who, org, app, env, before, page.limit)
    return w.Page(
        items=[convert.release(r, app) for r in rows],
        next_cursor=str(rows[-1]["version"]) if len(rows) == page.limit else None,
    )


@router.get("/releases/{version}", response_model=w.ReleaseDetail, responses=ERRORS)
def get_release(org: str, app: str, env: str, version: int, rel: Rel, who: Who) -> w.Release:
    return convert.release(rel.get(who, org, app, env, version), app, detail=True)


@router.post(
    "/rollback",
    response_model=w.ReleaseDetail,
    status_code=201,
    responses={200: {"model": w.ReleaseDetail}, **ERRORS},
)
def rollback(
    org: str,
    app: str,
    env: str,
    body: w.RollbackRequest,
    svc: Svc,
    rel: Rel,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """A new release with the contents of ``version`` (default: the one before the live
    release); 200 with the live release when those contents are live already."""

    def go() -> tuple[int, object]:
        row, created = rel.rollback(who, org, app, env, body.version)
        return (201 if created else 200), convert.release(row, app, detail=True).model_dump(
            mode="json"
        )

    return idempotency.run(svc.db, idem, who, go)
