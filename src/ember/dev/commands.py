"""`ember dev`: bring the single-node stack up and down on this machine.

`up` is idempotent: it creates what is missing and starts what is not running —
PostgreSQL (embedded unless EMBER_DATABASE_URL is set), the schema, the registry, the API
and the controller — and, the first time only, the local admin user with an org and a
token, which it stores in the CLI config so `ember apps create` works right away. The local
admin is a platform operator (granted on every `up`, so older stacks get it too). Then the
edge (HAProxy, loopback only) and the host agent, which enrols this machine with a
one-time token on its first start and runs instances as QEMU microVMs.

`down` stops every process and then what the agent leaves running on purpose when it
stops alone (VMs, taps, routes, the nftables table: :mod:`ember.agent.teardown`), so a
stopped stack leaves nothing behind; the next `up` brings the instances back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx

from ember import __version__
from ember.agent.converge import LocalStatus
from ember.agent.state import StateStore
from ember.agent.teardown import teardown
from ember.agent.vmm.qemu import QemuConfig, QemuDriver
from ember.api.enrollment import Enrollment
from ember.api.hosts import Hosts
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
SERVICES = (*CORE_SERVICES, "edge", "agent")
AGENT_ENV = "EMBER_DEV_AGENT"
"""``0`` keeps ``ember dev up`` from starting the agent (as ``--no-agent`` does)."""


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


def _service_token(ops: OpsContext) -> str:
    """The operator token the stack's own services use (edge; the agent's enrolment),
    kept in $EMBER_HOME/edge/token, mode 0600 — made once."""
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
    return token_file.read_text().strip()


def _api_client_env(ops: OpsContext, **extra: str) -> dict[str, str]:
    """The environment of a stack process that talks to the API (the edge, the agent)."""
    return {
        **os.environ,
        "EMBER_HOME": str(ops.settings.home),
        "EMBER_API_URL": _api_url(ops),
        **extra,
    }


def _ember() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ember")


def _start_edge(ops: OpsContext) -> str:
    """`ember server edge` with the stack's operator token; skipped, and said so, where
    HAProxy is not installed."""
    if shutil.which("haproxy") is None:
        return "not started: haproxy is not installed (make bootstrap installs it)"
    sup = _supervisor(ops)
    env = _api_client_env(
        ops,
        EMBER_EDGE_TOKEN=_service_token(ops),
        EMBER_EDGE_DIR=str(ops.settings.home / "edge" / "haproxy"),
    )
    started = sup.start("edge", [_ember(), "server", "edge"], env)
    return "started" if started else "running"


def _default_host_id() -> str:
    return socket.gethostname().split(".")[0].lower()


def _agent_dir(ops: OpsContext) -> Path:
    return ops.settings.home / "agent"


def _guest_dir(ops: OpsContext, quiet: bool) -> Path | None:
    """The guest kernel and initramfs: the checkout's guest/build (built now with
    guest/build.py when missing: a few seconds when Debian's package is cached), else
    $EMBER_HOME/guest; None when neither can be had."""
    checkout = Path(__file__).resolve().parents[3]
    for candidate in (checkout / "guest" / "build", ops.settings.home / "guest"):
        if (candidate / "vmlinux").exists():
            return candidate
    build = checkout / "guest" / "build.py"
    if not build.exists():
        return None
    with step("Building the guest kernel and init (once)…", quiet=quiet):
        proc = subprocess.run(
            [sys.executable, str(build), "--out", str(checkout / "guest" / "build")],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise StackFailed(
            "building the guest kernel and init failed: " + proc.stderr.strip()[-500:],
            hint="run 'make guest' to see the whole output",
        )
    return checkout / "guest" / "build"


def _start_agent(ops: OpsContext, wanted: bool, host_id: str) -> str:
    """`ember server agent` (QEMU microVMs) for this machine, enrolled on its first start
    with a one-time token made here; skipped, and said why, where it cannot run."""
    if not wanted or os.environ.get(AGENT_ENV, "1") == "0":
        return f"not started (--no-agent or {AGENT_ENV}=0): deploys stay pending"
    if os.geteuid() != 0:
        return "not started: the agent needs root (tap devices, nftables, cgroups)"
    if shutil.which("qemu-system-x86_64") is None:
        return "not started: qemu-system-x86_64 is missing (make bootstrap installs it)"
    sup = _supervisor(ops)
    if sup.pid("agent") is not None:
        return "running"
    guest = _guest_dir(ops, quiet=ops.as_json)
    if guest is None:
        return "not started: no guest kernel (run 'make guest' in the checkout)"
    data_dir = _agent_dir(ops)
    env = _api_client_env(ops, EMBER_AGENT_DIR=str(data_dir))
    if StateStore(data_dir).load().host_id is None:  # first start: enrol
        svc = ops.tenancy()
        who = svc.authenticate(_service_token(ops))
        secret, _ = Enrollment(Hosts(svc)).create_token(who, host_id=host_id, expires_in_s=600)
        env["EMBER_AGENT_ENROLL_TOKEN"] = secret
    sup.start(
        "agent",
        [
            *(_ember(), "server", "agent", "--host-id", host_id, "--guest-dir", str(guest)),
            # A development machine keeps no core back for itself (a production agent
            # reserves one): CPU is shared anyway, and one core x the scheduler's
            # oversubscription would hold only four one-vCPU instances here.
            *("--vcpus", str(os.cpu_count() or 1)),
        ],
        env,
    )
    deadline = time.monotonic() + 60
    while StateStore(data_dir).load().host_id is None:
        if sup.exited_early("agent") or time.monotonic() > deadline:
            raise StackFailed("the agent did not enrol", hint=f"see {sup.log_file('agent')}")
        time.sleep(0.2)
    return f"started (host {StateStore(data_dir).load().host_id})"


def _stop_agent(ops: OpsContext, sup: Supervisor) -> dict[str, object]:
    """Stop the agent, then what it leaves running by design (VMs, taps, routes, the
    nftables table): a stopped stack leaves nothing behind."""
    out: dict[str, object] = {"agent": sup.stop("agent")}
    data_dir = _agent_dir(ops)
    if not StateStore(data_dir).path.exists() or os.geteuid() != 0:
        return out
    report = teardown(data_dir, driver=QemuDriver(QemuConfig(state_dir=data_dir / "qemu")))
    out["vms_stopped"] = list(report.vms_stopped)
    out["taps_deleted"] = list(report.taps_deleted)
    out["firewall_removed"] = report.firewall_removed
    return out


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
@click.option(
    "--agent/--no-agent",
    default=True,
    show_default=True,
    help=f"run this machine's host agent (QEMU microVMs; needs root) [env: {AGENT_ENV}=0]",
)
@click.option(
    "--host-id",
    default=_default_host_id,
    show_default="the hostname",
    help="the id this machine enrols with (first start only)",
)
@json_option
@pass_ops
def up(ops: OpsContext, agent: bool, host_id: str) -> None:
    """Start the stack (idempotent): Postgres, schema, registry, API, controller, local
    admin, edge (HAProxy) and the host agent.

    Without EMBER_DATABASE_URL an embedded PostgreSQL cluster is created under
    $EMBER_HOME/postgres (default ~/.local/share/ember) and started. The API listens on
    127.0.0.1:$EMBER_API_PORT (default 7070). The agent enrols this machine on its first
    start and runs instances as QEMU microVMs.
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
    with step("Starting the host agent…", quiet=ops.as_json):
        info["agent"] = _start_agent(ops, agent, host_id)
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
            "agent": info["agent"],
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
    """Stop the stack (idempotent): every process, and the agent's VMs, tap devices,
    routes and nftables table. Data stays in $EMBER_HOME; 'ember dev up' brings the
    instances back."""
    sup = _supervisor(ops)
    # The agent first, so it does not restart what is being stopped; then its VMs.
    agent = _stop_agent(ops, sup)
    services = {name: sup.stop(name) for name in SERVICES if name != "agent"}
    services["agent"] = bool(agent.pop("agent"))
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
        emit_json({"stopped": stopped, "services_stopped": services, **agent})
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
    out["pids"] = {name: sup.pid(name) for name in SERVICES}
    agent_state = StateStore(_agent_dir(ops))
    if agent_state.path.exists():
        local = agent_state.load()
        out["agent"] = {
            "host_id": local.host_id,
            "instances": {
                st.value: sum(1 for r in local.instances.values() if r.status is st)
                for st in LocalStatus
            },
        }
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
