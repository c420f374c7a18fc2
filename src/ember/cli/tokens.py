"""`ember tokens`: your API tokens."""

from __future__ import annotations

import click

from ember.cli.auth import scope_text
from ember.cli.output import emit_json, emit_model, emit_table, when
from ember.cli.session import Session, checked, confirm, json_option, yes_option
from ember.core.tenancy import Capability


@click.group()
def tokens() -> None:
    """Your API tokens: create (for CI, say), list, revoke."""


@tokens.command("create")
@click.option("--name", required=True, help="What the token is for, e.g. 'ci-deploy'.")
@click.option("--org", default=None, metavar="ORG", help="Limit the token to this org.")
@click.option("--app", default=None, metavar="APP", help="Limit it to this app (needs --org).")
@click.option("--env", default=None, metavar="ENV", help="Limit it to this env (needs --app).")
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    type=click.Choice([c.value for c in Capability]),
    help="Repeatable. Default: read. Never more than the token you use has.",
)
@click.option(
    "--expires-in-days", type=click.IntRange(1, 3650), default=None, help="Default: never."
)
@json_option
def create_token(
    name: str,
    org: str | None,
    app: str | None,
    env: str | None,
    capabilities: tuple[str, ...],
    expires_in_days: int | None,
    as_json: bool,
) -> None:
    """Create a token for yourself and print its secret, once.

    The scope comes from --org/--app/--env only (never from EMBER_ORG or ember.toml): a
    token's reach should not depend on the directory you ran this in.
    """
    session = Session.load()
    for value, field in ((org, "org"), (app, "app"), (env, "env")):
        if value is not None:
            checked(value, field, what=field, source="--" + field)
    with session.client() as api:
        created = api.create_token(
            name,
            org=org,
            app=app,
            env=env,
            capabilities=list(capabilities) or None,
            expires_in_days=expires_in_days,
        )
    if as_json:
        emit_model(created)
        return
    click.echo(created.token)
    click.echo(
        f"Created token {created.name} ({created.id}); scope: {scope_text(created.scope)}; "
        f"capabilities: {', '.join(c.value for c in created.capabilities)}. "
        "The secret above is shown once: store it now.",
        err=True,
    )


@tokens.command("list")
@json_option
def list_tokens(as_json: bool) -> None:
    """List your tokens (never their secrets: 'HINT' is the last four characters)."""
    session = Session.load()
    with session.client() as api:
        items = api.list_tokens()
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["ID", "NAME", "HINT", "SCOPE", "CAPABILITIES", "EXPIRES", "REVOKED"],
        [
            (
                t.id,
                t.name,
                "..." + t.hint,
                scope_text(t.scope),
                ",".join(c.value for c in t.capabilities),
                when(t.expires_at) if t.expires_at else "never",
                when(t.revoked_at) if t.revoked_at else "",
            )
            for t in items
        ],
    )


@tokens.command("revoke")
@click.argument("token_id", metavar="ID")
@yes_option
@json_option
def revoke_token(token_id: str, yes: bool, as_json: bool) -> None:
    """Revoke token ID (see 'ember tokens list'); it stops working at once."""
    session = Session.load()
    with session.client() as api:
        confirm(f"revoke token {token_id!r}", yes=yes)
        api.revoke_token(token_id)
    if as_json:
        emit_json({"id": token_id, "revoked": True})
    else:
        click.echo(f"Revoked token {token_id}")
