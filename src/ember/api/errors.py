"""The API's error envelope: ``{"error": {"code", "message", "detail", "hint"?}}``.

Status codes derive from an error's kind, never from its message; every code is stable.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ember.core.errors import EmberError, Kind

STATUS_BY_KIND = {
    Kind.INVALID: 422,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.UNAUTHORIZED: 401,
    Kind.FORBIDDEN: 403,
    Kind.UNAVAILABLE: 503,
    Kind.TIMEOUT: 504,
    Kind.INTERNAL: 500,
}

_HTTP_CODES = {
    400: "request.bad",
    401: "auth.unauthorized",
    404: "route.not_found",
    405: "method.not_allowed",
    413: "request.too_large",
    415: "request.unsupported_media_type",
}


def _responses() -> dict[int | str, dict[str, Any]]:
    from ember.wire.models import ErrorEnvelope

    return {status: {"model": ErrorEnvelope} for status in (401, 403, 404, 409, 413, 422, 503)}


#: The error responses every /v1 route documents in the OpenAPI.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = _responses()


def envelope(
    code: str, message: str, detail: dict[str, Any] | None = None, hint: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "detail": detail or {}}
    if hint:
        body["hint"] = hint
    return {"error": body}


def too_large_envelope(max_bytes: int) -> dict[str, Any]:
    return envelope(
        "request.too_large", f"request body exceeds {max_bytes} bytes", {"max_bytes": max_bytes}
    )


class BodyTooLarge(HTTPException):
    """Raised by the edge middleware when a streamed body outgrows the limit. It must be an
    HTTPException: FastAPI re-raises those from body parsing, but turns any other
    exception there into a 400 "error parsing the body"."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


class _ErrorJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            # Messages echo the caller's input, and JSON can carry a lone surrogate
            # ("\ud800") that UTF-8 cannot encode: escape it (still the same JSON).
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    return _ErrorJSON(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(EmberError)
    async def _ember(_request: Request, exc: EmberError) -> JSONResponse:
        status = STATUS_BY_KIND[exc.kind]
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, {"error": exc.to_dict()}, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": ".".join(str(p) for p in e.get("loc", ())),
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
            }
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": "", "msg": "invalid request"}
        return error_response(
            422,
            envelope(
                "request.invalid",
                f"{first['loc']}: {first['msg']}",
                {"errors": errors},
                "fix the request; see docs/specs/openapi.json",
            ),
        )

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, too_large_envelope(exc.max_bytes))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8, say): invalid input
            # like malformed JSON (a 422), and 400 is not in the documented responses.
            return error_response(
                422,
                envelope(
                    "request.invalid",
                    f"body: {exc.detail}",
                    {"errors": [{"loc": "body", "msg": str(exc.detail), "type": "body_invalid"}]},
                    "send a UTF-8 JSON body; see docs/specs/openapi.json",
                ),
            )
        code = _HTTP_CODES.get(exc.status_code, f"http.{exc.status_code}")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; a path
            # with one route per method (GET and POST /v1/orgs) needs them all.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, envelope(code, str(exc.detail)), headers)


def _allowed_methods(request: Request) -> list[str]:
    routes = request.app.router.routes
    return [
        method
        for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]
