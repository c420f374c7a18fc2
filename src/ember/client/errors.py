"""Errors of the API client: the server's error envelope turned back into typed exceptions.

Every class subclasses the ember.core class of its kind, so callers catch by kind
(``except NotFound``) and the CLI derives its exit code from ``kind`` as for any other
EmberError. Instances carry the server's stable ``code`` (``app.not_found``,
``name.taken``, ...), message, hint and detail; the class-level ``code`` below is only a
fallback for a response without an envelope::

    ApiError                      api.error           any error the API answered
    ├── ApiInvalid                (ValidationFailed)  400, 405, 413, 415, 422
    ├── ApiUnauthorized           (Unauthorized)      401
    ├── ApiForbidden              (Forbidden)         403
    ├── ApiNotFound               (NotFound)          404
    ├── ApiConflict               (Conflict)          409
    ├── ApiGone                   (Conflict)          410: a watch's cursor expired; list again
    ├── ApiUnavailable            (Unavailable)       503
    ├── ApiTimeout                (kind TIMEOUT)      504
    └── ApiInternal               (kind INTERNAL)     other 5xx, unexpected answers
    Unreachable                   (Unavailable)       no answer: refused, DNS, timeout
    InvalidRequest                (ValidationFailed)  refused before sending

``error_from_response`` is a pure function (status, headers, body -> exception) so the
mapping is tested without a network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from ember.core.errors import (
    Conflict,
    EmberError,
    Kind,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from ember.core.tenancy import Forbidden, Unauthorized

UNREACHABLE_HINT = (
    "is the control plane running? 'ember dev up' starts one locally; or set EMBER_API_URL"
)


class ApiError(EmberError):
    """The API answered with an error. ``code`` is the server's stable code."""

    code: ClassVar[str] = "api.error"
    default_hint: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        hint: str | None = None,
        detail: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint or self.default_hint, detail=detail)
        if code:
            # The server's code, not the class default: scripts match on it.
            self.code = code  # type: ignore[misc]
        self.status = status
        self.request_id = request_id

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.request_id:
            out["request_id"] = self.request_id
        return out


class ApiInvalid(ApiError, ValidationFailed):
    code = "api.invalid"
    default_hint = "fix the input; nothing was changed"


class ApiUnauthorized(ApiError, Unauthorized):
    code = "api.unauthorized"
    default_hint = "run 'ember login' or set EMBER_API_TOKEN"


class ApiForbidden(ApiError, Forbidden):
    code = "api.forbidden"
    default_hint = "ask an owner or admin of the org for access, or use a wider token"


class ApiNotFound(ApiError, NotFound):
    code = "api.not_found"
    default_hint = "check the name"


class ApiConflict(ApiError, Conflict):
    code = "api.conflict"
    default_hint = "re-read and retry"


class ApiGone(ApiError, Conflict):
    """The API cannot resume from the cursor given (``allocations.cursor_expired``): the
    caller lists again and watches from the list's cursor (list + watch)."""

    code = "api.gone"
    default_hint = "list again and watch from the list's cursor"


class ApiUnavailable(ApiError, Unavailable):
    code = "api.unavailable"
    default_hint = "retry in a moment; the control plane cannot reach its database"


class ApiTimeout(ApiError):
    code = "api.timeout"
    kind = Kind.TIMEOUT
    default_hint = "retry in a moment"


class ApiInternal(ApiError):
    code = "api.internal"
    kind = Kind.INTERNAL
    default_hint = "retry; if it persists, report it with the request id"


class Unreachable(Unavailable):
    """No answer at all: connection refused, DNS failure, TLS failure, timeout."""

    code = "api.unreachable"


class InvalidRequest(ValidationFailed):
    """The client refused to send a request the API would reject (a bad field value)."""

    code = "api.request_invalid"


_BY_STATUS: dict[int, type[ApiError]] = {
    400: ApiInvalid,
    401: ApiUnauthorized,
    403: ApiForbidden,
    404: ApiNotFound,
    405: ApiInvalid,
    409: ApiConflict,
    410: ApiGone,
    413: ApiInvalid,
    415: ApiInvalid,
    422: ApiInvalid,
    503: ApiUnavailable,
    504: ApiTimeout,
}


def error_class(status: int) -> type[ApiError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ApiInvalid if 400 <= status < 500 else ApiInternal


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes | str | None
) -> ApiError:
    """The exception for one error response (``status`` >= 400).

    A body that is not our envelope (a proxy's HTML page, an empty 502) still maps by
    status, with a message that says what came back.
    """
    cls = error_class(status)
    request_id = _header(headers, "x-request-id")
    envelope = _parse_envelope(body)
    if envelope is None:
        snippet = _snippet(body)
        message = f"the API answered HTTP {status}" + (f": {snippet}" if snippet else "")
        return cls(message, status=status, request_id=request_id)
    detail = envelope.get("detail")
    hint = envelope.get("hint")
    return cls(
        str(envelope.get("message") or f"the API answered HTTP {status}"),
        code=str(envelope["code"]),
        status=status,
        hint=str(hint) if hint else None,
        detail=detail if isinstance(detail, dict) else None,
        request_id=request_id,
    )


def _parse_envelope(body: bytes | str | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    error = parsed.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return None
    return error


def _snippet(body: bytes | str | None, limit: int = 200) -> str:
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None
