"""`ember envs`: an app's environments (prod, staging, ...)."""

from __future__ import annotations

import click

from ember.cli.output import emit_json, emit_model, emit_table, when
from ember.cli.session import (
    Session,
    app_option,
    checked,
    confirm,
    json_option,
    org_option,
    yes_option,
)


@click.group()
def envs() -> None:
    """Environments of an app (the app comes from --app, EMBER_APP or ember.toml)."""


@envs.command("create")
@click.argument("name")
@org_option
@app_option
@json_option
def create_env(name: str, org: str | None, app: str | None, as_json: bool) -> None:
    """Create environment NAME in the app (succeeds if it already exists)."""
    session = Session.load(org=org, app=app)
    org_name, app_name = session.org(), session.app()
    checked(name, "name", what="env name")
    with session.client() as api:
        result = api.create_env(org_name, app_name, name)
    if as_json:
        emit_model(result.item)
    elif result.created:
        click.echo(f"Created environment {name} of app {app_name}")
    else:
        click.echo(f"Environment {name} of app {app_name} already exists")


@envs.command("list")
@org_option
@app_option
@json_option
def list_envs(org: str | None, app: str | None, as_json: bool) -> None:
    """List the app's environments."""
    session = Session.load(org=org, app=app)
    org_name, app_name = session.org(), session.app()
    with session.client() as api:
        items = api.list_envs(org_name, app_name)
    if as_json:
        emit_model(items)
        return
    emit_table(
        None, ["ENV", "APP", "CREATED"], [(e.name, e.app, when(e.created_at)) for e in items]
    )


@envs.command("delete")
@click.argument("name")
@org_option
@app_option
@yes_option
@json_option
def delete_env(name: str, org: str | None, app: str | None, yes: bool, as_json: bool) -> None:
    """Delete environment NAME of the app. Asks first; --yes to skip (required in scripts)."""
    session = Session.load(org=org, app=app)
    org_name, app_name = session.org(), session.app()
    checked(name, "name", what="env name")
    with session.client() as api:

        def details() -> str:
            api.get_env(org_name, app_name, name)  # not found fails before asking
            return ""

        confirm(
            f"delete environment {name!r} of app {app_name!r} in org {org_name!r}",
            yes=yes,
            details=details,
        )
        api.delete_env(org_name, app_name, name)
    if as_json:
        emit_json({"org": org_name, "app": app_name, "env": name, "deleted": True})
    else:
        click.echo(f"Deleted environment {name} of app {app_name}")
