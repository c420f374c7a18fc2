"""`ember apps`: create, list, show and delete apps in an org."""

from __future__ import annotations

import click

from ember.cli.output import emit_fields, emit_json, emit_model, emit_table, when
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
def apps() -> None:
    """Apps: a named thing you deploy, with environments (prod, staging, ...)."""


@apps.command("create")
@click.argument("name")
@org_option
@json_option
def create_app(name: str, org: str | None, as_json: bool) -> None:
    """Create app NAME in the org (succeeds if it already exists)."""
    session = Session.load(org=org)
    org_name = session.org()
    checked(name, "name", what="app name")
    with session.client() as api:
        result = api.create_app(org_name, name)
    if as_json:
        emit_model(result.item)
    elif result.created:
        click.echo(f"Created app {name} in org {org_name}")
    else:
        click.echo(f"App {name} already exists in org {org_name}")


@apps.command("list")
@org_option
@json_option
def list_apps(org: str | None, as_json: bool) -> None:
    """List the org's apps you can see."""
    session = Session.load(org=org)
    org_name = session.org()
    with session.client() as api:
        items = api.list_apps(org_name)
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["APP", "ENVS", "CREATED"],
        [(a.name, ", ".join(a.envs) or "-", when(a.created_at)) for a in items],
    )


@apps.command("show")
@click.argument("name", required=False)
@org_option
@app_option
@json_option
def show_app(name: str | None, org: str | None, app: str | None, as_json: bool) -> None:
    """Show app NAME (default: the current app: --app, EMBER_APP, ember.toml)."""
    session = Session.load(org=org, app=app)
    org_name = session.org()
    app_name = checked(name, "name", what="app name") if name else session.app()
    with session.client() as api:
        item = api.get_app(org_name, app_name)
    if as_json:
        emit_model(item)
        return
    emit_fields(
        {
            "app": item.name,
            "org": item.org,
            "id": item.id,
            "envs": ", ".join(item.envs) or "-",
            "created": when(item.created_at),
        }
    )


@apps.command("delete")
@click.argument("name")
@org_option
@yes_option
@json_option
def delete_app(name: str, org: str | None, yes: bool, as_json: bool) -> None:
    """Delete app NAME and its environments. Asks first; --yes to skip (required in scripts)."""
    session = Session.load(org=org)
    org_name = session.org()
    checked(name, "name", what="app name")
    with session.client() as api:

        def details() -> str:
            envs = api.get_app(org_name, name).envs
            return f" and its environments ({', '.join(envs)})" if envs else ""

        confirm(f"delete app {name!r} in org {org_name!r}", yes=yes, details=details)
        api.delete_app(org_name, name)
    if as_json:
        emit_json({"org": org_name, "app": name, "deleted": True})
    else:
        click.echo(f"Deleted app {name} from org {org_name}")
