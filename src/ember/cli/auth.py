"""`ember login`, `ember logout`, `ember whoami`."""

from __future__ import annotations

import dataclasses
import sys

import click

from ember.cli.config import CliConfig, load_file, save_file
from ember.cli.output import dump, emit_fields, emit_json, emit_model, emit_table, when
from ember.cli.session import Session, TokenMissing, json_option
from ember.wire import models as w


def scope_text(scope: w.TokenScope) -> str:
    parts = [p for p in (scope.org, scope.app, scope.env) if p]
    return "/".join(parts) if parts else "all your orgs"


def _read_token(token: str | None) -> str:
    if token is None:
        if sys.stdin.isatty():
            token = click.prompt("API token", hide_input=True, err=True)
        else:
            token = sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise TokenMissing(
            "no API token given",
            hint="pass --token TOKEN, or pipe the token on stdin "
            "(an operator issues the first one with 'ember admin create-token')",
            detail={"field": "token"},
        )
    return token


@click.command()
@click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="The API token (else read from stdin, or prompted for on a terminal).",
)
@click.option(
    "--api-url",
    default=None,
    metavar="URL",
    help="The control-plane API (else EMBER_API_URL, the config file, http://127.0.0.1:7070).",
)
@json_option
def login(token: str | None, api_url: str | None, as_json: bool) -> None:
    """Check an API token and store it (with the API URL and a default org) in the config
    file (~/.config/ember/config.toml, or EMBER_CONFIG)."""
    session = Session.load(api_url=api_url)
    secret = _read_token(token)
    with session.client(secret) as api:
        me = api.whoami()
    stored = load_file(session.config_file)
    names = [o.name for o in me.orgs]
    if len(names) == 1:
        org: str | None = names[0]
    else:
        org = stored.org if stored.org in names else None
    same_org = org == stored.org
    config = CliConfig(
        api_url=session.config.api_url,
        token=secret,
        org=org,
        app=stored.app if same_org else None,
        env=stored.env if same_org else None,
    )
    save_file(session.config_file, config)
    if as_json:
        emit_json(
            {
                **dump(me),
                "api_url": config.api_url,
                "org": org,
                "config_file": str(session.config_file),
            }
        )
    else:
        click.echo(f"Logged in to {config.api_url} as {me.email}.")
        if org:
            click.echo(f"Default org: {org}")
        elif names:
            click.echo(
                f"You belong to {len(names)} orgs; pick one with --org or EMBER_ORG "
                "('ember orgs' lists them)."
            )
    if session.sources.get("token") == "EMBER_API_TOKEN":
        click.echo("Note: EMBER_API_TOKEN is set and overrides this login.", err=True)


@click.command()
@json_option
def logout(as_json: bool) -> None:
    """Forget the stored API token (the token itself stays valid: 'ember tokens revoke')."""
    session = Session.load()
    stored = load_file(session.config_file)
    had_token = stored.token is not None
    if had_token:
        save_file(session.config_file, dataclasses.replace(stored, token=None))
    if as_json:
        emit_json({"logged_out": had_token, "config_file": str(session.config_file)})
    else:
        click.echo("Logged out." if had_token else "Not logged in; nothing to do.")
    if session.sources.get("token") == "EMBER_API_TOKEN":
        click.echo("Note: EMBER_API_TOKEN is still set and is used instead.", err=True)


@click.command()
@json_option
def whoami(as_json: bool) -> None:
    """Who the current token belongs to, what it may do, and your orgs."""
    session = Session.load()
    with session.client() as api:
        me = api.whoami()
    if as_json:
        emit_model(me)
        return
    emit_fields(
        {
            "email": me.email,
            "user": me.user_id,
            "token": f"{me.token.name} ({me.token.id}, ...{me.token.hint})",
            "scope": scope_text(me.token.scope),
            "capabilities": ", ".join(c.value for c in me.token.capabilities),
            "expires": when(me.token.expires_at) if me.token.expires_at else "never",
            "api": session.config.api_url,
        }
    )
    if me.orgs:
        click.echo()
        emit_table(
            None,
            ["ORG", "ROLE", "CREATED"],
            [(o.name, o.role.value, when(o.created_at)) for o in me.orgs],
        )
