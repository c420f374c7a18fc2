"""What a user command needs, resolved once per invocation: the effective configuration
(ember.cli.config), the API client, the org/app context, and confirmation of destructive
actions.

Errors raised here (all EmberError, so ember.main renders them and picks the exit code)::

    NotLoggedIn            cli.not_logged_in          (Unauthorized: exit 5)
    MissingContext         cli.context_missing        (ValidationFailed: exit 2)
    ConfirmationRequired   cli.confirmation_required  (ValidationFailed: exit 2)
    TokenMissing           cli.token_missing          (ValidationFailed: exit 2)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ember.cli.config import CliConfig, config_path, resolve_explained
from ember.client import Client
from ember.core.errors import ValidationFailed
from ember.core.tenancy import Unauthorized, check_name

F = TypeVar("F", bound=Callable[..., Any])

API_TIMEOUT = 30.0

_CONTEXT = {
    "org": ("--org", "EMBER_ORG"),
    "app": ("--app", "EMBER_APP"),
    "env": ("--env", "EMBER_ENV"),
}


class NotLoggedIn(Unauthorized):
    code = "cli.not_logged_in"


class MissingContext(ValidationFailed):
    code = "cli.context_missing"


class ConfirmationRequired(ValidationFailed):
    code = "cli.confirmation_required"


class TokenMissing(ValidationFailed):
    code = "cli.token_missing"


@dataclasses.dataclass(frozen=True)
class Session:
    config: CliConfig
    sources: dict[str, str]
    config_file: Path

    @classmethod
    def load(
        cls,
        *,
        api_url: str | None = None,
        org: str | None = None,
        app: str | None = None,
        env: str | None = None,
    ) -> Session:
        """Entry-point only: the one place user commands read the environment."""
        environ = dict(os.environ)
        config, sources = resolve_explained(
            environ, Path.cwd(), api_url=api_url, org=org, app=app, env=env
        )
        return cls(config, sources, config_path(environ))

    def client(self, token: str | None = None) -> Client:
        """A client with ``token`` (login) or the configured one."""
        secret = token or self.config.token
        if not secret:
            raise NotLoggedIn(
                "not logged in: no API token",
                hint="run 'ember login', or set EMBER_API_TOKEN",
            )
        return Client(self.config.api_url, secret, timeout=API_TIMEOUT)

    def org(self) -> str:
        return self._context("org")

    def app(self) -> str:
        return self._context("app")

    def _context(self, key: str) -> str:
        flag, var = _CONTEXT[key]
        value: str | None = getattr(self.config, key)
        if not value:
            what = {"org": "organisation", "app": "app", "env": "environment"}[key]
            raise MissingContext(
                f"no {what} given",
                hint=f'pass {flag} NAME, set {var}, or add {key} = "NAME" to ember.toml'
                + (" (or run 'ember login' to store a default org)" if key == "org" else ""),
                detail={"field": key, "flag": flag, "variable": var},
            )
        return checked(value, key, what=key, source=self.sources.get(key))


def checked(value: str, field: str, *, what: str | None = None, source: str | None = None) -> str:
    """``value`` if it is a valid name (ember.core's rule, the server's too); else a
    validation error naming the field and, for a context value, where it was set."""
    try:
        return check_name(value, field, env=(what or field).startswith("env"))
    except ValidationFailed as exc:
        where = f" (set by {source})" if source else ""
        raise ValidationFailed(
            f"invalid {what or field} {value!r}{where}",
            hint=exc.hint,
            detail={**exc.detail, **({"source": source} if source else {})},
        ) from exc


def confirm(action: str, *, yes: bool, details: Callable[[], str] | None = None) -> None:
    """Ask before ``action`` on a terminal; demand --yes otherwise (scripts never hang).

    ``details`` is called only when asking (it may read the object: a missing one then
    fails as not found before anyone is asked about it).
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfirmationRequired(
            f"refusing to {action} without --yes: stdin is not a terminal, so no one can "
            "be asked to confirm",
            hint="pass --yes to confirm",
            detail={"flag": "--yes"},
        )
    extra = details() if details else ""
    click.confirm(f"{action[0].upper()}{action[1:]}{extra}?", abort=True, err=True)


# -- shared options ------------------------------------------------------------------


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON (docs/specs/cli.md)."
    )(fn)


def org_option(fn: F) -> F:
    return click.option(
        "--org",
        default=None,
        metavar="ORG",
        help="Org to act in (else EMBER_ORG, ember.toml, the default from 'ember login').",
    )(fn)


def app_option(fn: F) -> F:
    return click.option(
        "--app", default=None, metavar="APP", help="App to act on (else EMBER_APP, ember.toml)."
    )(fn)


def yes_option(fn: F) -> F:
    return click.option(
        "--yes", "-y", is_flag=True, help="Do not ask; required when stdin is not a terminal."
    )(fn)
