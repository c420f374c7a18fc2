"""Stable exit codes of the `ember` CLI (docs/specs/cli.md) and error rendering.

Only ``ember.main.main`` exits the process; commands raise, and this module decides the
code and prints what went wrong plus what to do next.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import click

from ember.core.errors import EmberError, Kind, ValidationFailed


class InvalidArgument(ValidationFailed):
    """A CLI argument that click's types cannot check (``web=3``, ``--since 10m``): exit 2,
    ``detail.field`` naming it."""

    code = "cli.invalid_argument"


class Exit(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2  # usage or validation error: fix the command or the input
    NOT_FOUND = 3
    CONFLICT = 4
    AUTH = 5  # authentication or permission
    TIMEOUT = 6  # timed out or did not converge
    UNREACHABLE = 7  # the control plane (or its database) cannot be reached


_BY_KIND = {
    Kind.INVALID: Exit.USAGE,
    Kind.NOT_FOUND: Exit.NOT_FOUND,
    Kind.CONFLICT: Exit.CONFLICT,
    Kind.UNAUTHORIZED: Exit.AUTH,
    Kind.FORBIDDEN: Exit.AUTH,
    Kind.TIMEOUT: Exit.TIMEOUT,
    Kind.UNAVAILABLE: Exit.UNREACHABLE,
    Kind.INTERNAL: Exit.UNEXPECTED,
}


def exit_code_for(error: EmberError) -> Exit:
    return _BY_KIND[error.kind]


def report(error: EmberError, *, as_json: bool) -> Exit:
    """Print ``error`` to stderr (JSON envelope with ``--json``); return its exit code."""
    code = exit_code_for(error)
    if as_json:
        body: dict[str, Any] = {"error": error.to_dict(), "exit_code": int(code)}
        click.echo(json.dumps(body, sort_keys=True, default=str), err=True)
    else:
        click.echo(f"Error: {error.message}", err=True)
        if error.hint:
            click.echo(f"Hint: {error.hint}", err=True)
    return code
