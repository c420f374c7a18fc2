"""`ember hosts`: the machines that run instances (platform operators only).

Needs the token of a platform operator, unscoped, with the ``admin`` capability (the
one `ember dev up` stores is); any other token exits 5 (``auth.forbidden``).
"""

from __future__ import annotations

import click

from ember.cli.output import emit_fields, emit_model, emit_table, when
from ember.cli.session import Session, json_option
from ember.core.errors import ValidationFailed
from ember.core.hosts import HOST_ID_RE
from ember.wire import hosts as wh

_ACTIONS = {
    "cordon": "cordoned: nothing new is placed on it",
    "uncordon": "ready: it receives new instances again",
    "drain": "draining: nothing new is placed on it and its instances move elsewhere",
}


def _checked(host_id: str) -> str:
    if not HOST_ID_RE.match(host_id):
        raise ValidationFailed(
            f"invalid host id {host_id!r}",
            hint="host ids are lowercase letters, digits and '-' ('ember hosts list')",
            detail={"field": "host"},
        )
    return host_id


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
