"""`ember ips`: the org's dedicated IPv4 addresses, a paid add-on (ADR 0007).

Routes bind one with ``ember routes create --ip ADDRESS``. Allocating and releasing need
the ``admin`` capability on the org; every ``allocate-v4`` allocates another address.
"""

from __future__ import annotations

import click

from ember.cli.output import emit_json, emit_model, emit_table, when
from ember.cli.session import Session, confirm, json_option, org_option, yes_option
from ember.core.errors import ValidationFailed
from ember.core.ipv4 import check_address


@click.group()
def ips() -> None:
    """Dedicated IPv4 addresses of the org (a paid add-on, billed as dedicated_ipv4)."""


@ips.command("allocate-v4")
@org_option
@json_option
def allocate_v4(org: str | None, as_json: bool) -> None:
    """Allocate a dedicated IPv4 address to the org (billed while it is held)."""
    session = Session.load(org=org)
    org_name = session.org()
    with session.client() as api:
        item = api.allocate_ipv4(org_name)
    if as_json:
        emit_model(item)
        return
    click.echo(
        f"Allocated {item.address} to org {org_name}: a dedicated IPv4 address, billed as "
        f"{item.billing} until released"
    )
    click.echo(f"Bind it with 'ember routes create ... --ip {item.address}'")


@ips.command("list")
@org_option
@json_option
def list_ips(org: str | None, as_json: bool) -> None:
    """List the org's dedicated addresses."""
    session = Session.load(org=org)
    org_name = session.org()
    with session.client() as api:
        items = api.list_ips(org_name)
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["ADDRESS", "FAMILY", "ROUTES", "BILLING", "ALLOCATED"],
        [(i.address, i.family, i.routes, i.billing, when(i.allocated_at)) for i in items],
    )


@ips.command("release")
@click.argument("address")
@org_option
@yes_option
@json_option
def release_ip(address: str, org: str | None, yes: bool, as_json: bool) -> None:
    """Give ADDRESS back to the pool (billing stops). Fails while routes bind it. Asks
    first; --yes to skip (required in scripts)."""
    normal = check_address(address)
    if normal is None:
        raise ValidationFailed(
            f"invalid address {address!r}: an IPv4 address",
            hint="'ember ips list' shows the org's addresses",
            detail={"field": "ADDRESS", "argument": address},
        )
    session = Session.load(org=org)
    org_name = session.org()
    with session.client() as api:
        confirm(f"release {normal} of org {org_name!r} (routes can no longer bind it)", yes=yes)
        api.release_ip(org_name, normal)
    if as_json:
        emit_json({"org": org_name, "address": normal, "released": True})
    else:
        click.echo(f"Released {normal} from org {org_name}")
