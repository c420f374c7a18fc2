"""The API's error envelope: ``{"error": {"code", "message", "detail", "hint"?}}``.

Status codes derive from an error's kind, never from its message; every code is stable.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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


def error_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


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

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http.{exc.status_code}")
        return error_response(
            exc.status_code, envelope(code, str(exc.detail)), dict(exc.headers or {})
        )
