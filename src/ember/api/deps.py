"""Request-scoped dependencies: the service, the caller, pagination.

Two kinds of caller: a user through an API token (``Authorization: Bearer``), and a
host's agent through its node identity (``Authorization: EmberNode``, a signed request;
ember.api.node_auth). ``Who`` admits users only, so every route refuses nodes (403) unless
it asks for ``Caller``: the agent routes, which then check that a node acts for its own
host (ember.core.tenancy.check_agent).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from ember.api import node_auth
from ember.api.service import Tenancy
from ember.core.node_auth import is_node_scheme
from ember.core.tenancy import Forbidden, Principal


def service(request: Request) -> Tenancy:
    svc: Tenancy = request.app.state.tenancy
    return svc


async def caller(request: Request, svc: Annotated[Tenancy, Depends(service)]) -> Principal:
    """A user (Bearer token) or a node (EmberNode signature over the request)."""
    header = request.headers.get("authorization", "")
    if is_node_scheme(header):
        body = await request.body()  # cached: the route's body parameter reads the same
        return await run_in_threadpool(
            node_auth.authenticate,
            svc,
            header,
            method=request.method,
            # The decoded path as the server routes it (not request.url.path: a decoded
            # '?' or '#' would be re-parsed there).
            path=request.scope["path"],
            query=request.scope.get("query_string", b"").decode("latin-1"),
            body=body,
        )
    scheme, _, token = header.partition(" ")
    return await run_in_threadpool(
        svc.authenticate, token.strip() if scheme.lower() == "bearer" else None
    )


async def principal(who: Annotated[Principal, Depends(caller)]) -> Principal:
    """A user; a node identity is refused (it reaches only its host's agent routes)."""
    if who.node_host is not None:
        raise Forbidden(
            "a node identity may only call its own host's agent routes",
            hint="use a user's API token for this",
            detail={"host_id": who.node_host},
        )
    return who


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
Caller = Annotated[Principal, Depends(caller)]
"""A user or a node: only for agent routes, which authorise with check_agent."""
Paging = Annotated[PageParams, Depends(PageParams)]
