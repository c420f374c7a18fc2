"""`ember dev`: bring the single-node stack up and down on this machine.

`up` is idempotent: it creates what is missing and starts what is not running —
PostgreSQL (embedded unless EMBER_DATABASE_URL is set), the schema, the API and the
controller — and, the first time only, the local admin user with an org and a token,
which it stores in the CLI config so `ember apps create` works right away. The local
admin is a platform operator (granted on every `up`, so older stacks get it too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time

import click
import httpx

from ember import __version__
from ember.cli.config import CliConfig, config_path, load_file, save_file
from ember.cli.output import console, emit_fields, emit_json, step
from ember.core.catalog import StackStarted, StackStopped
from ember.core.errors import Unavailable
from ember.core.events import ANY, Metadata, NewEvent
from ember.core.tenancy import Capability, Scope
from ember.dev import registry
from ember.dev.postgres import LocalCluster
from ember.dev.processes import Supervisor
from ember.ops.context import OpsContext, json_option, pass_ops
from ember.store import migrations
from ember.store.db import redact

STACK_STREAM = "stack-local"
ADMIN_EMAIL = "admin@localhost"
ADMIN_ORG = "local"
CORE_SERVICES = ("api", "controller", registry.NAME)
SERVICES = (*CORE_SERVICES, "edge")


def _supervisor(ops: OpsContext) -> Supervisor:
    # The registry is not an ember process: its pid-reuse guard is its own cmdline.
    return Supervisor(
        ops.settings.home, markers={registry.NAME: registry.marker(ops.settings.registry_dir)}
    )


def _registry_url(ops: OpsContext) -> str:
    return f"http://127.0.0.1:{ops.settings.registry_port}"


class StackFailed(Unavailable):
    code = "dev.stack_failed"


@click.group()
def dev() -> None:
    """The single-node stack: everything Ember needs, on this machine."""


def _api_url(ops: OpsContext) -> str:
    return f"http://127.0.0.1:{ops.settings.api_port}"


def _start_services(ops: OpsContext) -> dict[str, bool]:
    sup = _supervisor(ops)
    ember = os.path.join(os.path.dirname(sys.executable), "ember")
    env = {
        **os.environ,
        "EMBER_HOME": str(ops.settings.home),
        "EMBER_DATABASE_URL": ops.database_url,
        "EMBER_API_PORT": str(ops.settings.api_port),
        "EMBER_REGISTRY_URL": _registry_url(ops),
        # The dev edge binds loopback only: routes on the shared address are 127.0.0.1.
        "EMBER_EDGE_SHARED_ADDRESS": os.environ.get("EMBER_EDGE_SHARED_ADDRESS", "127.0.0.1"),
    }
    for name, port, variable in (
        ("api", ops.settings.api_port, "EMBER_API_PORT"),
        (registry.NAME, ops.settings.registry_port, "EMBER_REGISTRY_PORT"),
    ):
        if sup.pid(name) is None and _port_taken(port):
            raise StackFailed(
                f"port {port} is taken by another program",
                hint=f"stop it, or set {variable} to a free port",
                detail={"field": variable},
            )
    registry_config = registry.prepare(ops.settings.registry_dir, ops.settings.registry_port)
    registry_started = registry.start(sup, registry_config, os.environ)
    started = {
        "api": sup.start("api", [ember, "server", "api"], env),
        "controller": sup.start("controller", [ember, "server", "controller"], env),
        registry.NAME: registry_started,
    }
    try:
        _wait_ready(ops, sup)
    except StackFailed:
        for name, now in started.items():  # leave nothing half-started behind
            if now:
                sup.stop(name)
        raise
    return started


def _start_edge(ops: OpsContext) -> str:
    """`ember server edge` with its own operator token (kept in $EMBER_HOME/edge/token,
    mode 0600); skipped, and said so, where HAProxy is not installed."""
    if shutil.which("haproxy") is None:
        return "not started: haproxy is not installed (make bootstrap installs it)"
    sup = _supervisor(ops)
    edge_dir = ops.settings.home / "edge"
    edge_dir.mkdir(parents=True, exist_ok=True)
    token_file = edge_dir / "token"
    if not token_file.exists():
        svc = ops.tenancy()
        user = svc.user_by_email(ADMIN_EMAIL)
        assert user is not None, "the local admin exists by now"
        secret, _ = svc.issue_token(
            user["user_id"],
            "ember dev edge",
            scope=Scope(),
            capabilities=frozenset(Capability),
            actor="ember dev up",
        )
        token_file.touch(mode=0o600)
        token_file.write_text(secret)
    ember = os.path.join(os.path.dirname(sys.executable), "ember")
    env = {
        **os.environ,
        "EMBER_HOME": str(ops.settings.home),
        "EMBER_API_URL": _api_url(ops),
        "EMBER_EDGE_TOKEN": token_file.read_text().strip(),
        "EMBER_EDGE_DIR": str(edge_dir / "haproxy"),
    }
    started = sup.start("edge", [ember, "server", "edge"], env)
    return "started" if started else "running"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(ops: OpsContext, sup: Supervisor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in CORE_SERVICES:
            if sup.exited_early(name):
                raise StackFailed(
                    f"the {name} process exited during start-up",
                    hint=f"see {sup.log_file(name)}",
                )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(_api_url(ops) + "/readyz", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    else:
        raise StackFailed("the API did not become ready in time", hint=f"see {sup.log_file('api')}")
    try:
        registry.wait_ready(
            _registry_url(ops),
            timeout=max(deadline - time.monotonic(), 1.0),
            exited=lambda: sup.exited_early(registry.NAME),
            log=sup.log_file(registry.NAME),
        )
    except registry.RegistryFailed as exc:
        raise StackFailed(exc.message, hint=exc.hint) from exc


def _ensure_admin(ops: OpsContext) -> str | None:
    """Create the local admin once (a platform operator, so `ember hosts` works); return a
    token when one was issued now (shown once).

    A new token is also issued when the admin exists but the CLI config has no token (the
    config was deleted, or another machine user runs the CLI)."""
    svc = ops.tenancy()
    path = config_path(os.environ)
    current = load_file(path)
    user = svc.user_by_email(ADMIN_EMAIL)
    existed = user is not None
    if user is None:
        user = svc.ensure_user(ADMIN_EMAIL, "Local admin", actor="ember dev up")
        svc.create_org(None, ADMIN_ORG, owner_id=user["user_id"])
    # Every time, not only at creation: stacks made before operators existed get it too
    # (a no-op, writing nothing, once it is granted).
    svc.set_operator(ADMIN_EMAIL, True, actor="ember dev up")
    if existed and current.token:
        return None
    secret, _ = svc.issue_token(
        user["user_id"],
        "ember dev up",
        scope=Scope(),
        capabilities=frozenset(Capability),
        actor="ember dev up",
    )
    save_file(
        path,
        CliConfig(
            api_url=_api_url(ops), token=secret, org=ADMIN_ORG, app=current.app, env=current.env
        ),
    )
    return secret


@dev.command()
@json_option
@pass_ops
def up(ops: OpsContext) -> None:
    """Start the stack (idempotent): Postgres, schema, API, controller, local admin.

    Without EMBER_DATABASE_URL an embedded PostgreSQL cluster is created under
    $EMBER_HOME/postgres (default ~/.local/share/ember) and started. The API listens on
    127.0.0.1:$EMBER_API_PORT (default 7070).
    """
    embedded = ops.settings.database_url is None
    info: dict[str, object] = {"home": str(ops.settings.home)}
    if embedded:
        cluster = LocalCluster(ops.settings.postgres_dir)
        with step("Preparing the embedded PostgreSQL cluster…", quiet=ops.as_json):
            info["postgres_created"] = cluster.init()
            info["postgres_started"] = cluster.start()
            cluster.ensure_database()
        info["postgres"] = f"embedded, {cluster.data_dir}"
    else:
        info["postgres"] = "external (EMBER_DATABASE_URL)"
    with step("Migrating the schema…", quiet=ops.as_json):
        info["migrations_applied"] = [
            f"{m.version:04d}_{m.name}" for m in migrations.migrate(ops.database_url)
        ]
    started = StackStarted(
        hostname=socket.gethostname(),
        version=__version__,
        database="embedded" if embedded else "external",
    )
    result = ops.event_log().append(
        STACK_STREAM, ANY, [NewEvent.of(started, Metadata(actor="ember dev up"))]
    )
    with step("Starting the registry, the API and the controller…", quiet=ops.as_json):
        info["services_started"] = _start_services(ops)
    token = _ensure_admin(ops)
    with step("Starting the edge (HAProxy)…", quiet=ops.as_json):
        info["edge"] = _start_edge(ops)
    runner = ops.projections()
    runner.catch_up()
    info["event"] = f"stack.started at {result.cursor} (version {result.last_version})"
    info["projections"] = {s.name: str(s.cursor) for s in runner.status()}
    info["database_url"] = redact(ops.database_url)
    info["api_url"] = _api_url(ops)
    info["registry_url"] = _registry_url(ops)
    info["admin_token"] = token
    if ops.as_json:
        emit_json(info)
        return
    console().print("[bold green]Ember single-node stack is up.[/]")
    emit_fields(
        {
            "home": info["home"],
            "postgres": info["postgres"],
            "database": info["database_url"],
            "api": info["api_url"],
            "registry": info["registry_url"],
            "edge": info["edge"],
            "migrations": ", ".join(info["migrations_applied"]) or "up to date",  # type: ignore[arg-type]
            "event": info["event"],
        }
    )
    if token:
        click.echo(f"\nCreated the local admin ({ADMIN_EMAIL}, org '{ADMIN_ORG}'). Its API token,")
        click.echo(f"shown this once and saved to {config_path(os.environ)}:\n\n  {token}\n")
    click.echo("Next: 'ember apps create hello'; 'ember dev down' stops the stack.")


@dev.command()
@json_option
@pass_ops
def down(ops: OpsContext) -> None:
    """Stop the stack (idempotent). Data stays in $EMBER_HOME."""
    sup = _supervisor(ops)
    services = {name: sup.stop(name) for name in SERVICES}
    stopped = False
    if ops.settings.database_url is None:
        cluster = LocalCluster(ops.settings.postgres_dir)
        if cluster.is_running():
            _record_stop(ops)
            ops.close()
            stopped = cluster.stop()
    else:
        _record_stop(ops)
    if ops.as_json:
        emit_json({"stopped": stopped, "services_stopped": services})
    elif stopped or any(services.values()):
        click.echo("Stopped the single-node stack.")
    else:
        click.echo("Nothing was running.")


@dev.command()
@json_option
@pass_ops
def status(ops: OpsContext) -> None:
    """Is the stack up, and how far have the projections got?"""
    sup = _supervisor(ops)
    out: dict[str, object] = {"home": str(ops.settings.home)}
    if ops.settings.database_url is None:
        out["postgres_running"] = LocalCluster(ops.settings.postgres_dir).is_running()
    else:
        out["postgres_running"] = True
    out["services"] = {name: sup.pid(name) is not None for name in SERVICES}
    out["api_url"] = _api_url(ops)
    out["registry_url"] = _registry_url(ops)
    if out["postgres_running"]:
        out["head"] = str(ops.event_log().head())
        out["pending_migrations"] = [
            f"{m.version:04d}_{m.name}" for m in migrations.pending(ops.database_url)
        ]
        out["projections"] = {
            s.name: {"cursor": str(s.cursor), "lag_events": s.lag_events}
            for s in ops.projections().status()
        }
    if ops.as_json:
        emit_json(out)
    else:
        emit_fields(out)


def _record_stop(ops: OpsContext) -> None:
    stopped = StackStopped(hostname=socket.gethostname())
    ops.event_log().append(
        STACK_STREAM, ANY, [NewEvent.of(stopped, Metadata(actor="ember dev down"))]
    )
    ops.projections().catch_up()
