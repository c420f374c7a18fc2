"""`ember routes`: how connections reach an environment's processes through the edge.

``create`` checks what it can before sending (hostname syntax, port numbers, the process
name, PROXY protocol version, the address) with the server's own rules
(ember.core.routes.check_route) and exits 2 naming the flag; the server checks the rest
(the port pool, the live release's processes, uniqueness: exit 4 on a conflict). Creating
a route that exists already exits 0 and changes nothing.
"""

from __future__ import annotations

from typing import TypeVar

import click

from ember.cli.deploy import current_env, env_option
from ember.cli.output import emit_fields, emit_json, emit_model, emit_table, when
from ember.cli.session import Session, app_option, confirm, json_option, org_option, yes_option
from ember.client import Client
from ember.core.errors import EmberError, NotFound, ValidationFailed
from ember.core.routes import (
    AUTO,
    InvalidRoute,
    RouteNotFound,
    RoutingConfig,
    check_route,
    describe_binding,
)
from ember.wire import routes as wr

FLAGS = {
    "kind": "--tcp",
    "hostname": "--hostname",
    "port": "--port",
    "process": "--process",
    "backend_port": "--backend-port",
    "proxy_protocol": "--proxy-protocol",
    "ip": "--ip",
}
# The syntax only: the pool and the TLS port are the server's to check.
_SYNTAX = RoutingConfig(tcp_ports=(1, 65535))


def _number(flag: str, field: str, text: str) -> int:
    if not text.strip().isdigit():
        raise ValidationFailed(
            f"{flag}: {text!r} is not a port number",
            hint=f"like {flag} 8443",
            detail={"field": field, "flag": flag, "argument": text},
        )
    return int(text)


E = TypeVar("E", bound=EmberError)


def _flagged(exc: E) -> E:
    """The server's or core's error, with the flag that sets the field it names."""
    field = exc.detail.get("field")
    if isinstance(field, str) and field in FLAGS and "flag" not in exc.detail:
        exc.detail["flag"] = FLAGS[field]
        if not exc.message.startswith(FLAGS[field]):
            exc.message = f"{FLAGS[field]}: {exc.message}"
    return exc


def _context(org: str | None, app: str | None, env: str | None) -> tuple[Session, str, str, str]:
    session = Session.load(org=org, app=app, env=env)
    return session, session.org(), session.app(), current_env(session)


def _listen(route: wr.Route) -> str:
    return describe_binding(route.address, route.port)


def _summary(route: wr.Route) -> str:
    where = _listen(route) + (" (dedicated)" if route.dedicated else "")
    front = f"TLS {route.hostname} on {where}" if route.kind == "tls" else f"TCP {where}"
    proxy = ", PROXY v2" if route.proxy_protocol else ""
    return f"{front} -> {route.process}:{route.backend_port}{proxy}"


def _resolve(api: Client, org: str, app: str, env: str, ref: str) -> wr.Route:
    """A route by id, or by hostname when exactly one route of the env has it."""
    if ref.startswith("rt_"):
        return api.get_route(org, app, env, ref)
    name = ref.strip().lower()
    found = [r for r in api.list_routes(org, app, env) if r.hostname == name]
    if not found:
        raise RouteNotFound(
            f"no route {ref!r} in {app} ({env})",
            hint="'ember routes list' shows the routes and their ids",
            detail={"route": ref},
        )
    if len(found) > 1:
        raise ValidationFailed(
            f"{len(found)} routes of {app} ({env}) serve {name}: name one by id",
            hint="ids: " + ", ".join(r.id for r in found),
            detail={"field": "ROUTE", "argument": ref},
        )
    return found[0]


@click.group()
def routes() -> None:
    """Routes: TLS passed through on SNI (a hostname), or raw TCP on a port of its own."""


@routes.command("create")
@click.option("--hostname", default=None, metavar="NAME", help="TLS: the SNI name to route.")
@click.option("--tcp", "raw_tcp", is_flag=True, help="A raw TCP route on a port of its own.")
@click.option(
    "--port",
    default=None,
    metavar="PORT|auto",
    help="Edge port. TLS: 443 (default) or a port of the pool; TCP: 'auto' (default) or a "
    "free port of the pool.",
)
@click.option("--process", required=True, metavar="NAME", help="The process to reach.")
@click.option(
    "--backend-port", required=True, metavar="PORT", help="The port the process listens on."
)
@click.option(
    "--proxy-protocol",
    default=None,
    metavar="v2",
    help="Send a PROXY protocol v2 header with the client's address on every connection "
    "(the service must expect it).",
)
@click.option("--ip", default=None, metavar="ADDRESS", help="A dedicated IPv4 of the org.")
@org_option
@app_option
@env_option
@json_option
def create_route(
    hostname: str | None,
    raw_tcp: bool,
    port: str | None,
    process: str,
    backend_port: str,
    proxy_protocol: str | None,
    ip: str | None,
    org: str | None,
    app: str | None,
    env: str | None,
    as_json: bool,
) -> None:
    """Route connections to a process: 'ember routes create --hostname api.example.com
    --process web --backend-port 8443', or 'ember routes create --tcp --port auto
    --process db --backend-port 5432'."""
    wanted: int | str | None = None
    if port is not None:
        wanted = AUTO if port.strip().lower() == AUTO else _number("--port", "port", port)
    target = _number("--backend-port", "backend_port", backend_port)
    kind = "tcp" if raw_tcp else "tls"
    try:
        check_route(
            _SYNTAX,
            kind=kind,
            hostname=hostname,
            port=wanted,
            process=process,
            backend_port=target,
            proxy_protocol=proxy_protocol,
            ip=ip,
        )
    except InvalidRoute as exc:
        raise _flagged(exc) from None
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        try:
            result = api.create_route(
                org_name,
                app_name,
                env_name,
                kind=kind,
                hostname=hostname,
                port=wanted,
                process=process,
                backend_port=target,
                proxy_protocol=proxy_protocol,
                ip=ip,
            )
        except (ValidationFailed, NotFound) as exc:  # a bad field, an unknown process or ip
            raise _flagged(exc) from None
    route = result.item
    if as_json:
        emit_model(route)
        return
    if result.created:
        click.echo(f"Created route {route.id}: {_summary(route)}")
    else:
        click.echo(f"Route {route.id} exists already: {_summary(route)}; nothing to do")
    if route.proxy_protocol and result.created:
        click.echo(
            f"Note: every connection to {route.process}:{route.backend_port} now starts with "
            "a PROXY v2 header; the service must be configured to expect it."
        )


@routes.command("list")
@org_option
@app_option
@env_option
@json_option
def list_routes(org: str | None, app: str | None, env: str | None, as_json: bool) -> None:
    """List the environment's routes."""
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        items = api.list_routes(org_name, app_name, env_name)
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["ROUTE", "KIND", "HOSTNAME", "LISTEN", "PROCESS", "BACKEND PORT", "PROXY"],
        [
            (
                r.id,
                r.kind,
                r.hostname or "-",
                _listen(r) + (" (dedicated)" if r.dedicated else ""),
                r.process,
                r.backend_port,
                r.proxy_protocol or "-",
            )
            for r in items
        ],
    )


@routes.command("show")
@click.argument("route")
@org_option
@app_option
@env_option
@json_option
def show_route(
    route: str, org: str | None, app: str | None, env: str | None, as_json: bool
) -> None:
    """Show ROUTE (its id, or its hostname when one route has it)."""
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        item = _resolve(api, org_name, app_name, env_name, route)
    if as_json:
        emit_model(item)
        return
    emit_fields(
        {
            "route": item.id,
            "kind": item.kind,
            "hostname": item.hostname or "-",
            "listen": _listen(item),
            "address": f"{item.address} ({'dedicated' if item.dedicated else 'shared'})",
            "port": f"{item.port}" + (" (auto)" if item.port_auto else ""),
            "process": item.process,
            "backend port": item.backend_port,
            "proxy protocol": item.proxy_protocol or "off",
            "app": f"{item.app} ({item.env})",
            "created": when(item.created_at),
        }
    )


@routes.command("delete")
@click.argument("route")
@org_option
@app_option
@env_option
@yes_option
@json_option
def delete_route(
    route: str, org: str | None, app: str | None, env: str | None, yes: bool, as_json: bool
) -> None:
    """Delete ROUTE (its id, or its hostname when one route has it): new connections stop
    reaching the process. Asks first; --yes to skip (required in scripts)."""
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        item = _resolve(api, org_name, app_name, env_name, route)
        confirm(f"delete route {item.id} ({_summary(item)})", yes=yes)
        api.delete_route(org_name, app_name, env_name, item.id)
    if as_json:
        emit_json({"route": item.id, "deleted": True})
    else:
        click.echo(f"Deleted route {item.id}: {_summary(item)}")
