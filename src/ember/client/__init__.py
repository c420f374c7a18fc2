"""Typed HTTP client of the control-plane API (used by the CLI, agent and edge).

``Client`` has one method per route and returns ember.wire models; errors are the typed
exceptions of ember.client.errors (each a subclass of its ember.core kind).
"""

from ember.client.api import USER_AGENT, Client, Created
from ember.client.errors import (
    UNREACHABLE_HINT,
    ApiConflict,
    ApiError,
    ApiForbidden,
    ApiInternal,
    ApiInvalid,
    ApiNotFound,
    ApiTimeout,
    ApiUnauthorized,
    ApiUnavailable,
    InvalidRequest,
    Unreachable,
    error_from_response,
)

__all__ = [
    "UNREACHABLE_HINT",
    "USER_AGENT",
    "ApiConflict",
    "ApiError",
    "ApiForbidden",
    "ApiInternal",
    "ApiInvalid",
    "ApiNotFound",
    "ApiTimeout",
    "ApiUnauthorized",
    "ApiUnavailable",
    "Client",
    "Created",
    "InvalidRequest",
    "Unreachable",
    "error_from_response",
]
