"""`ember hosts`: the machines that run instances (platform operators only).

Needs the token of a platform operator, unscoped, with the ``admin`` capability (the
one `ember dev up` stores is); any other token exits 5 (``auth.forbidden``).
``enroll-token`` makes the one-time token a host's agent enrols with (ADR-0015).
"""

from __future__ import annotations

import re

import click

from ember.cli.output import emit_fields, emit_model, emit_table, when
from ember.cli.session import Session, json_option
from ember.core.enrollment import DEFAULT_EXPIRES_S, MAX_EXPIRES_S, MIN_EXPIRES_S
from ember.core.errors import ValidationFailed
from ember.core.hosts import HOST_ID_RE
from ember.wire import hosts as wh

_ACTIONS = {
    "cordon": "cordoned: nothing new is placed on it",
    "uncordon": "ready: it receives new instances again",
    "drain": "draining: nothing new is placed on it and its instances move elsewhere",
}


_EXPIRES_RE = re.compile(r"^(\d{1,7})([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _checked(host_id: str, field: str = "host") -> str:
    if not HOST_ID_RE.match(host_id):
        raise ValidationFailed(
            f"invalid host id {host_id!r}",
            hint="host ids are lowercase letters, digits and '-' ('ember hosts list')",
            detail={"field": field},
        )
    return host_id


def _expires_s(text: str) -> int:
    """Seconds from ``3600``, ``90s``, ``30m``, ``1h`` or ``7d``, within the server's range."""
    m = _EXPIRES_RE.match(text.strip())
    seconds = int(m[1]) * _UNIT_S[m[2]] if m else None
    if seconds is None or not MIN_EXPIRES_S <= seconds <= MAX_EXPIRES_S:
        raise ValidationFailed(
            f"invalid --expires {text!r}",
            hint="use a duration like 10m, 1h or 7d, from 60s up to 7d",
            detail={"field": "--expires"},
        )
    return seconds


def _memory(host: wh.Host) -> str:
    return f"{host.usage.memory_mb}/{host.memory_mb} MiB"


def _cpus(host: wh.Host) -> str:
    return f"{host.usage.cpus:g}/{host.vcpus}"


@click.group()
def hosts() -> None:
    """Hosts: the machines that run instances (platform operators only)."""


@hosts.command("list")
@json_option
def list_hosts(as_json: bool) -> None:
    """List every host with its state and what its instances use."""
    with Session.load().client() as api:
        items = api.list_hosts()
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["HOST", "STATE", "REGION", "INSTANCES", "MEMORY", "CPUS", "LAST SEEN"],
        [
            (
                h.id,
                h.state,
                h.region or "-",
                h.usage.instances,
                _memory(h),
                _cpus(h),
                when(h.last_seen),
            )
            for h in items
        ],
    )


@hosts.command("show")
@click.argument("host")
@json_option
def show_host(host: str, as_json: bool) -> None:
    """Show HOST and the instances on it."""
    with Session.load().client() as api:
        item = api.get_host(_checked(host))
    if as_json:
        emit_model(item)
        return
    emit_fields(
        {
            "host": item.id,
            "state": item.state
            + (f" (operator: {item.admin_state})" if item.state != item.admin_state else ""),
            "since": when(item.state_since),
            "region": item.region or "-",
            "address": item.address or "-",
            "labels": ", ".join(f"{k}={v}" for k, v in sorted(item.labels.items())) or "-",
            "memory": _memory(item),
            "cpus": _cpus(item),
            "disk": f"{item.disk_mb} MiB",
            "instances": item.usage.instances,
            "last seen": when(item.last_seen),
            "identity": item.public_key or "- (its agent has not enrolled)",
            "registered": when(item.registered_at),
        }
    )
    if item.instances:
        click.echo()
        emit_table(
            None,
            ["INSTANCE", "APP", "ENV", "PROCESS", "STATE", "MEMORY"],
            [
                (
                    i.instance_id,
                    f"{i.org}/{i.app}" if i.org and i.app else i.app_id,
                    i.env,
                    i.process,
                    i.state,
                    f"{i.memory_mb} MiB",
                )
                for i in item.instances
            ],
        )


def _done(item: wh.HostDetail, action: str, as_json: bool) -> None:
    if as_json:
        emit_model(item)
    else:
        click.echo(f"Host {item.id} is {_ACTIONS[action]}")


@hosts.command("cordon")
@click.argument("host")
@json_option
def cordon_host(host: str, as_json: bool) -> None:
    """Place nothing new on HOST; what runs there stays (idempotent)."""
    with Session.load().client() as api:
        item = api.cordon_host(_checked(host))
    _done(item, "cordon", as_json)


@hosts.command("uncordon")
@click.argument("host")
@json_option
def uncordon_host(host: str, as_json: bool) -> None:
    """Let HOST receive new instances again, also after a drain (idempotent)."""
    with Session.load().client() as api:
        item = api.uncordon_host(_checked(host))
    _done(item, "uncordon", as_json)


@hosts.command("drain")
@click.argument("host")
@json_option
def drain_host(host: str, as_json: bool) -> None:
    """Place nothing new on HOST and move its instances elsewhere (idempotent)."""
    with Session.load().client() as api:
        item = api.drain_host(_checked(host))
    _done(item, "drain", as_json)


@hosts.command("enroll-token")
@click.option(
    "--host-id",
    default=None,
    metavar="ID",
    help="The only host the token may enrol (default: any host id that has no identity yet).",
)
@click.option(
    "--expires",
    default=f"{DEFAULT_EXPIRES_S // 3600}h",
    show_default=True,
    metavar="DURATION",
    help="How long the token is valid: 10m, 1h, 7d (60s to 7d).",
)
@json_option
def enroll_token(host_id: str | None, expires: str, as_json: bool) -> None:
    """Create a one-time token a host's agent enrols with (shown once)."""
    if host_id is not None:
        _checked(host_id, "--host-id")
    seconds = _expires_s(expires)
    with Session.load().client() as api:
        created = api.create_enrollment_token(host_id=host_id, expires_in_s=seconds)
    if as_json:
        emit_model(created)
        return
    target = f"host {created.host_id}" if created.host_id else "any host"
    click.echo(f"Enrolment token for {target} (shown once; it works once):")
    click.echo(f"  {created.token}")
    click.echo(f"Expires {when(created.expires_at)}. Give it to the host's agent now.")
