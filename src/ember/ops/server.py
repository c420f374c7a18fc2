"""`ember server`: the long-running control-plane processes."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ember.ops.context import OpsContext, pass_ops
from ember.store import migrations

if TYPE_CHECKING:
    from ember.core.edge import EdgeSnapshot


@click.group()
def server() -> None:
    """Run a control-plane process in the foreground."""


@server.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="EMBER_API_HOST")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=7070,
    show_default=True,
    envvar="EMBER_API_PORT",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@pass_ops
def api(ops: OpsContext, host: str, port: int, workers: int) -> None:
    """The control-plane HTTP API (uvicorn). Applies migrations first."""
    import logging

    import uvicorn

    from ember.api.app import ApiSettings, create_app

    url = ops.database_url
    migrations.migrate(url)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import os

    from ember.core.routes import load_routing_config

    registry = os.environ.get("EMBER_REGISTRY_URL") or None
    routing = load_routing_config(os.environ)
    app = create_app(ApiSettings(database_url=url, registry_url=registry, routing=routing))
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level="warning",
        # Long-polls (the edge's feed, agents' watches, `ember logs -f`) hold connections
        # for up to 30 s; on SIGTERM they are cut after this, and their clients re-poll.
        timeout_graceful_shutdown=2,
    )


@server.command()
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(0.5, 600),
    default=10.0,
    show_default=True,
    envvar="EMBER_CONTROLLER_LEASE_TTL",
    help="seconds a leader may stay silent before a standby takes over",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 60),
    default=0.5,
    show_default=True,
    envvar="EMBER_CONTROLLER_INTERVAL",
    help="seconds between passes",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    envvar="EMBER_HEARTBEAT_TIMEOUT",
    help="seconds without a heartbeat before a host is marked down",
)
@click.option(
    "--rollout-deadline",
    type=click.FloatRange(1, 86400),
    default=300.0,
    show_default=True,
    envvar="EMBER_ROLLOUT_DEADLINE",
    help="seconds a rollout's new instances have to become healthy",
)
@click.option(
    "--cpu-oversubscription",
    type=click.FloatRange(0.1, 64),
    default=4.0,
    show_default=True,
    envvar="EMBER_CPU_OVERSUBSCRIPTION",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    envvar="EMBER_CONTROLLER_METRICS_PORT",
    help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)",
)
@pass_ops
def controller(
    ops: OpsContext,
    batch_size: int,
    lease_ttl: float,
    interval: float,
    heartbeat_timeout: float,
    rollout_deadline: float,
    cpu_oversubscription: float,
    metrics_port: int,
) -> None:
    """Projectors, scheduler and reconcilers, while this process holds the controller
    lease (others stand by). Stops cleanly on SIGTERM, handing the lease over."""
    import logging

    from prometheus_client import start_http_server

    from ember.control.controller import Controller, ControllerConfig, Metrics
    from ember.core.placement import PlacementConfig
    from ember.core.reconcile import ReconcileConfig

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    migrations.migrate(ops.database_url)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    config = ControllerConfig(
        lease_ttl_s=lease_ttl,
        interval_s=interval,
        heartbeat_timeout_s=heartbeat_timeout,
        placement=PlacementConfig(cpu_oversubscription=cpu_oversubscription),
        reconcile=ReconcileConfig(rollout_deadline_s=rollout_deadline),
    )
    metrics = Metrics()
    if metrics_port:
        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
    ctl = Controller(ops.event_log(), ops.projections(), config, metrics=metrics)
    click.echo(f"controller {ctl.holder}: standing by for the lease", err=True)
    ctl.run(stopping.is_set, batch_size=batch_size)


@server.command()
@click.option(
    "--api-url",
    default="http://127.0.0.1:7070",
    show_default=True,
    envvar="EMBER_API_URL",
    help="the control-plane API to list and watch routes from",
)
@click.option(
    "--token",
    envvar=["EMBER_EDGE_TOKEN", "EMBER_API_TOKEN"],
    required=True,
    help="an operator token (edge node identities come later) [env: EMBER_EDGE_TOKEN]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EMBER_EDGE_DIR",
    help="HAProxy's configuration and sockets [default: $EMBER_HOME/edge]",
)
@click.option("--wait", type=click.FloatRange(0.1, 30), default=25.0, show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    envvar="EMBER_EDGE_METRICS_PORT",
    help="serve Prometheus metrics on 127.0.0.1:PORT (0: off)",
)
@pass_ops
def edge(
    ops: OpsContext,
    api_url: str,
    token: str,
    data_dir: Path | None,
    wait: float,
    metrics_port: int,
) -> None:
    """The edge: keeps a local HAProxy serving the control plane's routes (SNI
    passthrough, raw TCP, PROXY v2). Stops on SIGTERM; HAProxy keeps serving until then."""
    import logging

    from prometheus_client import start_http_server

    from ember.client import Client
    from ember.edge.controller import EdgeController, EdgeMetrics
    from ember.edge.haproxy import HAProxy

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    stopping = threading.Event()

    def stop_now(*_: object) -> None:
        # Interrupt a long-poll in flight too: HAProxy must be stopped before the
        # supervisor's grace period ends, or it would outlive the edge.
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_now)
    root = data_dir or ops.settings.home / "edge"
    root.mkdir(parents=True, exist_ok=True)
    metrics = EdgeMetrics()
    if metrics_port:
        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
    with Client(api_url, token, timeout=wait + 10) as client:
        haproxy = HAProxy(root)

        def source(after: str | None, wait_s: float) -> EdgeSnapshot:
            return client.edge_snapshot(after=after, wait=wait_s).to_core()

        controller = EdgeController(source, haproxy, metrics, wait_s=wait)
        click.echo(f"edge: serving routes from {api_url} with HAProxy in {root}", err=True)
        try:
            controller.run(stopping.is_set)
        except KeyboardInterrupt:
            pass
        finally:
            haproxy.stop(grace_s=2.0)


def _default_guest_dir(home: Path) -> Path:
    checkout = Path(__file__).resolve().parents[3] / "guest" / "build"
    return checkout if (checkout / "vmlinux").exists() else home / "guest"


def _machine_capacity(reserve_vcpus: int = 1, reserve_mb: int = 1024) -> tuple[int, int]:
    import os

    cpus = os.cpu_count() or 1
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    return max(1, cpus - reserve_vcpus), max(256, mem_mb - reserve_mb)


@server.command()
@click.option(
    "--api-url",
    default="http://127.0.0.1:7070",
    show_default=True,
    envvar="EMBER_API_URL",
    help="the control-plane API",
)
@click.option(
    "--enroll-token",
    envvar="EMBER_AGENT_ENROLL_TOKEN",
    help="one-time enrolment token (first start only) [env: EMBER_AGENT_ENROLL_TOKEN]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="EMBER_AGENT_DIR",
    help="node key, state, images, VMs [default: $EMBER_HOME/agent]",
)
@click.option("--host-id", help="the host's id when enrolling [default: the hostname]")
@click.option("--vcpus", type=click.IntRange(1), help="[default: the machine's CPUs less 1]")
@click.option("--memory-mb", type=click.IntRange(128), help="[default: the machine's less 1 GiB]")
@click.option(
    "--guest-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="vmlinux and initrd.gz [default: guest/build of the checkout, else $EMBER_HOME/guest]",
)
@click.option("--image-budget-mb", type=click.IntRange(64), default=20_480, show_default=True)
@click.option(
    "--poll",
    type=click.FloatRange(0.1, 30),
    default=1.0,
    show_default=True,
    help="seconds between passes that observe the VMs and run health checks (a change of "
    "allocations, watched, starts a pass at once)",
)
@click.option("--heartbeat", type=click.FloatRange(0.5, 300), default=5.0, show_default=True)
@pass_ops
def agent(
    ops: OpsContext,
    api_url: str,
    enroll_token: str | None,
    data_dir: Path | None,
    host_id: str | None,
    vcpus: int | None,
    memory_mb: int | None,
    guest_dir: Path | None,
    image_budget_mb: int,
    poll: float,
    heartbeat: float,
) -> None:
    """The host agent: enrolls once, heartbeats, watches its allocations and runs them as
    QEMU microVMs. Stops on SIGTERM; the VMs keep running and are adopted on restart."""
    import logging
    import socket

    from ember.agent.daemon import (
        Agent,
        AgentConfig,
        ClientControlPlane,
        NoRegistry,
        TapHostNetwork,
        ensure_enrolled,
    )
    from ember.agent.net.addressing import AddressPlan, HostLocalAllocator
    from ember.agent.net.firewall import Firewall
    from ember.agent.net.store import LeaseStore
    from ember.agent.net.taps import TapNetwork
    from ember.agent.oci.store import ImageStore
    from ember.agent.state import StateStore
    from ember.agent.vmm.qemu import KERNEL_ARGS, QemuConfig, QemuDriver
    from ember.client import Client
    from ember.client.node_auth import NodeAuth
    from ember.client.oci.registry import RegistryClient

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    root = data_dir or ops.settings.home / "agent"
    root.mkdir(parents=True, exist_ok=True)
    default_vcpus, default_mb = _machine_capacity()
    vcpus = vcpus or default_vcpus
    memory_mb = memory_mb or default_mb
    guest_dir = guest_dir or _default_guest_dir(ops.settings.home)
    store = StateStore(root)
    hid, identity = ensure_enrolled(
        store,
        api_url=api_url,
        host_id=host_id or socket.gethostname().split(".")[0],
        enroll_token=enroll_token,
        vcpus=vcpus,
        memory_mb=memory_mb,
    )
    with Client(api_url, None, auth=NodeAuth(identity, hid)) as client:
        registry_url = client.platform().registry_url
        if not registry_url:
            raise NoRegistry(
                "the control plane has no image registry configured",
                hint="set EMBER_REGISTRY_URL for 'ember server api' ('ember dev up' does)",
            )
        plan = AddressPlan.for_host(hid)
        leases = LeaseStore(store.leases_path)
        allocator = HostLocalAllocator(leases.load(plan), on_change=leases.save)
        taps = TapNetwork()
        taps.prepare_host(plan)
        network = TapHostNetwork(allocator, taps, Firewall())
        with RegistryClient(registry_url) as registry:
            images = ImageStore(root / "images", registry, image_budget_mb << 20)
            initrd = guest_dir / "initrd.gz"
            config = AgentConfig(
                host_id=hid,
                kernel=guest_dir / "vmlinux",
                initrd=initrd if initrd.exists() else None,
                kernel_args=KERNEL_ARGS,
                vcpus=vcpus,
                memory_mb=memory_mb,
                heartbeat_s=heartbeat,
                poll_s=poll,
            )
            driver = QemuDriver(QemuConfig(state_dir=root / "qemu"))
            daemon = Agent(
                config,
                control=ClientControlPlane(client),
                store=store,
                driver=driver,
                images=images,
                network=network,
            )
            click.echo(f"agent {hid}: converging allocations from {api_url}", err=True)
            try:
                daemon.run(stopping.is_set)
            finally:
                daemon.close()
