"""`ember orgs`: the orgs you belong to."""

from __future__ import annotations

import click

from ember.cli.output import emit_model, emit_table, when
from ember.cli.session import Session, checked, json_option


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def orgs(ctx: click.Context, as_json: bool) -> None:
    """The orgs you belong to ('ember orgs' alone lists them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_orgs, as_json=as_json)


@orgs.command("list")
@json_option
def list_orgs(as_json: bool) -> None:
    """List your orgs and your role in each."""
    session = Session.load()
    with session.client() as api:
        items = api.list_orgs()
    if as_json:
        emit_model(items)
        return
    default = session.config.org
    emit_table(
        None,
        ["ORG", "ROLE", "CREATED", ""],
        [
            (o.name, o.role.value, when(o.created_at), "default" if o.name == default else "")
            for o in items
        ],
    )


@orgs.command("create")
@click.argument("name")
@json_option
def create_org(name: str, as_json: bool) -> None:
    """Create an org owned by you (succeeds if you already own one by that name)."""
    session = Session.load()
    checked(name, "name", what="org name")
    with session.client() as api:
        result = api.create_org(name)
    if as_json:
        emit_model(result.item)
    elif result.created:
        click.echo(f"Created org {name}")
    else:
        click.echo(f"Org {name} already exists")
