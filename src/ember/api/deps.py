"""Request-scoped dependencies: the service, the caller, pagination."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from ember.api.service import Tenancy
from ember.core.tenancy import Principal


def service(request: Request) -> Tenancy:
    svc: Tenancy = request.app.state.tenancy
    return svc


def principal(request: Request, svc: Annotated[Tenancy, Depends(service)]) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return svc.authenticate(token.strip() if scheme.lower() == "bearer" else None)


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=200, description="Items per page.")] = 50,
        cursor: Annotated[
            str | None, Query(max_length=200, description="next_cursor of the previous page.")
        ] = None,
    ) -> None:
        self.limit = limit
        self.cursor = cursor


Svc = Annotated[Tenancy, Depends(service)]
Who = Annotated[Principal, Depends(principal)]
Paging = Annotated[PageParams, Depends(PageParams)]
