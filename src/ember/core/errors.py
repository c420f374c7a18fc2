"""The root of every error Ember raises on purpose.

Each component has one exception tree under :class:`EmberError`; every class carries a
stable ``code`` (the wire contract: API error envelopes and CLI exit codes are derived from
it, never from the class name or message)::

    EmberError
    ├── ValidationFailed          validation.failed    bad input; nothing was changed
    │   ├── UnknownEventType      event.unknown_type
    │   ├── InvalidEvent          event.invalid
    │   └── IdempotencyKeyReused  event.idempotency_key_reused
    ├── NotFound                  not_found
    ├── Conflict                  conflict
    │   └── ConcurrencyConflict   event.version_conflict
    ├── Unavailable               unavailable          a dependency cannot be reached
    └── (component trees: ember.store.errors, ...)

``Kind`` groups codes into the handful of outcomes a caller can act on; the API maps a
kind to an HTTP status and the CLI to an exit code (docs/specs/cli.md).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar


class Kind(enum.Enum):
    """What a caller can do about an error; stable across releases."""

    INVALID = "invalid"  # fix the input and retry
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # re-read and retry
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"  # retry later
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class EmberError(Exception):
    """Base of every deliberate Ember error.

    ``message`` says what went wrong; ``hint`` says what to do next; ``detail`` carries
    machine-readable context (field names, versions) for the API envelope and ``--json``.
    """

    code: ClassVar[str] = "internal"
    kind: ClassVar[Kind] = Kind.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail: dict[str, Any] = dict(detail or {})

    def to_dict(self) -> dict[str, Any]:
        """The error envelope body: ``{"code", "message", "detail"[, "hint"]}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message, "detail": self.detail}
        if self.hint:
            out["hint"] = self.hint
        return out


class ValidationFailed(EmberError):
    code = "validation.failed"
    kind = Kind.INVALID


class NotFound(EmberError):
    code = "not_found"
    kind = Kind.NOT_FOUND


class Conflict(EmberError):
    code = "conflict"
    kind = Kind.CONFLICT


class Unavailable(EmberError):
    code = "unavailable"
    kind = Kind.UNAVAILABLE


class UnknownEventType(ValidationFailed):
    code = "event.unknown_type"


class InvalidEvent(ValidationFailed):
    code = "event.invalid"


class IdempotencyKeyReused(ValidationFailed):
    code = "event.idempotency_key_reused"


class ConcurrencyConflict(Conflict):
    """The stream moved on since the caller read it; re-read and decide again."""

    code = "event.version_conflict"
