"""The whole platform on one machine, as a user meets it: `ember dev up` (PostgreSQL,
registry, API, controller, edge, host agent), real QEMU microVMs, HAProxy in front.

One stack for the module (booting it is most of the cost); every test uses an app of its
own and scales it to zero at the end, so tests do not lean on each other's instances. The
last test stops and restarts the whole stack. Needs root (taps, nftables, cgroups).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.dev.examples import versioned_hello_http_manifest
from ember.dev.processes import Supervisor
from tests.integration.test_qemu_boot import guest  # noqa: F401  (the session fixture)
from tests.support.agentstack import (
    SAMPLE,
    SAMPLE_PAGE,
    AgentStack,
    Leftovers,
    hello_http_image,  # noqa: F401  (a module fixture)
    nft_table_exists,
    wait_for,
)
from tests.support.stack import stack_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]

ROOT = Path(__file__).resolve().parents[2]


def site(app: str, version: int) -> str:
    """hello-http whose instances serve /who (their hostname) and /version."""
    return versioned_hello_http_manifest(app, version)


class Platform(AgentStack):
    """The dev stack's own agent (started by `ember dev up`), not one of the test's."""

    def __init__(self, home: Path, guest_dir: Path) -> None:
        super().__init__(home, guest_dir)
        self.data_dir = home / "agent"
        self.log_path = home / "logs" / "agent.log"
        self.env = stack_env(home, agent=True)

    def up(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        info = self.json("dev", "up", "--host-id", self.host_id)
        assert info["agent"].startswith(("started", "running")), info
        self.api_url = info["api_url"]

    def agent_pid(self) -> int | None:
        """The agent `ember dev up` runs, as `ember dev` itself finds it."""
        return Supervisor(self.home).pid("agent")

    def agent_alive(self) -> bool:
        return self.agent_pid() is not None

    def kill_agent(self) -> None:
        pid = self.agent_pid()
        assert pid is not None, "the agent is not running"
        os.kill(pid, signal.SIGKILL)
        wait_for("the agent to die", lambda: not Path(f"/proc/{pid}/cmdline").exists(), 30)

    def start_agent(self) -> None:
        self.up()  # idempotent: starts what is not running

    def edge_get(self, port: int, path: str = "/", timeout_s: float = 5.0) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            body: bytes = r.read()
        return body

    def tcp_route(self, app: str, process: str = "web", backend_port: int = 8080) -> int:
        out = self.json(
            "routes", "create", "--tcp", "--port", "auto", "--process", process,
            "--backend-port", str(backend_port), "--app", app,
        )  # fmt: skip
        port = int(out["port"])
        wait_for(f"the edge to serve {app} on :{port}", lambda: self._serves(port), 30)
        return port

    def _serves(self, port: int) -> bool:
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.edge_get(port, timeout_s=2)
            return True
        return False

    def healthy(self, app: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``app`` runs exactly ``count`` healthy instances and nothing else
        live; return them."""

        def ready() -> list[dict[str, Any]] | None:
            status = self.status(app)
            live = [i for i in status["instances"] if i["state"] not in TERMINAL]
            healthy = [i for i in live if i["state"] == "healthy"]
            return healthy if len(healthy) == count == len(live) else None

        return wait_for(f"{app}: {count} healthy", ready, 180, describe=lambda: self.status(app))

    def vm_instances(self) -> set[str]:
        return set(self.qemus().values())


TERMINAL = {"stopped", "failed", "lost"}


def pool_port() -> int:
    """A free port of the edge's port pool (10000-10999), from the top: `--port auto`
    routes take theirs from the bottom."""
    for port in range(10999, 9999, -1):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise AssertionError("no free port in the edge's pool")


def hostname_of(instance_id: str) -> str:
    """The guest hostname the agent gives an instance of process ``web``."""
    return re.sub(r"[^a-z0-9-]+", "-", f"web-{instance_id}".lower())[:63].strip("-")


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory,
    guest: dict[str, Path],  # noqa: F811
) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("platform"), guest["kernel"].parent)
    try:
        p.up()
        yield p
    finally:
        p.run("dev", "down", expect=None)
        leftovers: Leftovers = p.close()
        print(p.agent_log()[-5000:])
        p.remove_home()
    assert leftovers.clean, leftovers


def test_hello_http_is_served_through_the_edge(
    platform: Platform,
    hello_http_image: Path,  # noqa: F811
) -> None:
    project = platform.create_app("hello-http", (SAMPLE / "ember.toml").read_text())
    platform.deploy(project, hello_http_image)
    (instance,) = platform.healthy("hello-http", 1)
    assert instance["instance_id"] in platform.vm_instances()
    port = platform.tcp_route("hello-http")
    assert platform.edge_get(port) == SAMPLE_PAGE
    text = platform.run("status", "--app", "hello-http").stdout
    assert "healthy" in text and "Converged" in text

    # The VM's console reaches `ember logs`: httpd -v logs each request it answered.
    def request_logged() -> bool:
        out = platform.run("logs", "--app", "hello-http", "--json").stdout
        lines = [json.loads(line) for line in out.splitlines()]
        return any(
            ln["instance_id"] == instance["instance_id"] and "response:200" in ln["line"]
            for ln in lines
        )

    wait_for("the request in ember logs", request_logged, 30)
    platform.run("scale", "web=0", "--app", "hello-http")


def test_scale_rolling_deploy_and_rollback(
    platform: Platform,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "site"
    project = platform.create_app(app, site(app, 1))
    platform.deploy(project, hello_http_image)
    port = platform.tcp_route(app)
    assert platform.edge_get(port, "/version") == b"v1\n"

    # Three microVMs, and the edge spreads connections over all of them.
    platform.run("scale", "web=3", "--app", app)
    three = platform.healthy(app, 3)
    ids = {i["instance_id"] for i in three}
    assert ids <= platform.vm_instances()
    answers = Counter(platform.edge_get(port, "/who").decode().strip() for _ in range(30))
    assert set(answers) == {hostname_of(i) for i in ids}, answers

    # v2 rolls out while a client keeps requesting through the edge: no request fails.
    results: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(platform.edge_get(port, "/version").decode().strip())
            except (OSError, urllib.error.URLError) as exc:
                failures.append(repr(exc))
            time.sleep(0.02)

    (project / "ember.toml").write_text(site(app, 2))
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        platform.deploy(project, hello_http_image)
        platform.healthy(app, 3)
        time.sleep(1)  # a few more requests against the new instances only
    finally:
        stop.set()
        thread.join(10)
    assert not failures, (len(failures), failures[:5], len(results))
    assert "v1" in results and results[-1] == "v2", Counter(results)
    assert platform.edge_get(port, "/version") == b"v2\n"

    # `ember rollback` brings v1's contents back.
    platform.run("rollback", "--app", app)
    wait_for(
        "the rollback to serve v1 everywhere",
        lambda: (
            all(platform.edge_get(port, "/version") == b"v1\n" for _ in range(6))
            and len(platform.healthy(app, 3)) == 3
        ),
        180,
        describe=lambda: platform.status(app),
    )
    platform.run("scale", "web=0", "--app", app)


def test_failing_image_halts_the_deploy_and_status_says_why(
    platform: Platform,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "broken"
    manifest = (
        (SAMPLE / "ember.toml")
        .read_text()
        .replace('web = "httpd -f -v -p 8080 -h /www"', 'web = "/no/such/server"')
    )
    manifest += '\n[restart]\npolicy = "on-failure"\nmax_retries = 1\n'
    project = platform.create_app(app, manifest.replace('app = "hello-http"', f'app = "{app}"'))
    deploy = platform.deploy(project, hello_http_image, expect=6, timeout="180s")
    assert "halt" in (deploy.stdout + deploy.stderr).lower(), deploy
    status = platform.status(app)
    assert status["rollout"]["phase"] == "halted", status["rollout"]
    failed = [i for i in status["instances"] if i["state"] == "failed"]
    assert failed and all(i.get("exit_code") == 127 for i in failed), status["instances"]
    text = platform.run("status", "--app", app).stdout
    assert "127" in text, text
    assert not {i["instance_id"] for i in status["instances"]} & platform.vm_instances()


def test_agent_killed_during_a_rollout_converges_after_restart(
    platform: Platform,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "churn"
    project = platform.create_app(app, site(app, 1))
    platform.deploy(project, hello_http_image)
    platform.run("scale", "web=2", "--app", app)
    platform.healthy(app, 2)

    (project / "ember.toml").write_text(site(app, 2))
    platform.run("deploy", "--image", str(hello_http_image), "--detach", "--json", cwd=project)
    wait_for(
        "the rollout to start an instance of v2",
        lambda: any(
            i["release_version"] == 2 and i["state"] not in ("pending", *TERMINAL)
            for i in platform.status(app)["instances"]
        ),
        120,
        interval_s=0.2,
        describe=lambda: platform.status(app),
    )
    platform.kill_agent()
    time.sleep(2)  # the rollout stalls meanwhile; the VMs keep running
    platform.start_agent()

    done = platform.healthy(app, 2)
    assert {i["release_version"] for i in done} == {2}
    status = platform.status(app)
    assert status["rollout"]["phase"] == "completed", status["rollout"]
    live_ids = {i["instance_id"] for i in done}
    app_ids = {i["instance_id"] for i in status["instances"]}
    # Exactly the live instances have VMs: none duplicated, none orphaned.
    vms = Counter(iid for iid in platform.qemus().values() if iid in app_ids)
    assert set(vms) == live_ids and set(vms.values()) == {1}, vms
    platform.run("scale", "web=0", "--app", app)


def test_tls_route_with_proxy_v2_gives_the_app_the_real_client_address(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = tmp_path_factory.mktemp("hello-tls-oci")
    subprocess.run(
        [sys.executable, "-m", "ember.dev.examples", "build", "hello-tls", "--out", str(image)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    sample = ROOT / "examples" / "hello-tls"
    project = platform.create_app("hello-tls", (sample / "ember.toml").read_text())
    platform.deploy(project, image)
    platform.healthy("hello-tls", 1)
    port = pool_port()
    platform.run(
        "routes", "create", "--hostname", "hello-tls.test", "--port", str(port),
        "--process", "web", "--backend-port", "8443", "--proxy-protocol", "v2",
        "--app", "hello-tls",
    )  # fmt: skip

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def ask() -> tuple[str, int] | None:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ):
            local_port = raw.getsockname()[1]
            with ctx.wrap_socket(raw, server_hostname="hello-tls.test") as tls:
                return tls.recv(4096).decode(), local_port
        return None

    reply, local_port = wait_for("the TLS route to answer", ask, 60)
    assert f"you are 127.0.0.1 port {local_port}" in reply, reply
    platform.run("scale", "web=0", "--app", "hello-tls")


def test_stack_restart_keeps_state_and_brings_instances_back(
    platform: Platform,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "keep"
    project = platform.create_app(app, site(app, 1))
    platform.deploy(project, hello_http_image)
    port = platform.tcp_route(app)
    releases = platform.json("releases", "--app", app)
    had_table = platform._had_table

    down = platform.json("dev", "down")
    assert down["stopped"] is True and down["services_stopped"]["agent"] is True, down
    assert down["vms_stopped"], down
    # Nothing is left behind: processes, VMs, taps, routes, the nftables table.
    assert not platform.qemus() and not platform.shims(), platform.qemus()
    assert not platform.taps()
    assert had_table or not nft_table_exists()
    routes = subprocess.run(
        ["ip", "-6", "route"], capture_output=True, text=True, check=True
    ).stdout
    assert str(platform.plan.ipv6_prefix) not in routes
    assert not [
        pid for pid in (platform.home / "run").glob("*.pid")
        if Path(f"/proc/{pid.read_text().strip()}").exists()
    ]  # fmt: skip

    platform.up()
    assert platform.json("releases", "--app", app) == releases
    platform.healthy(app, 1)
    wait_for("the page through the edge again", lambda: platform._serves(port), 60)
    assert platform.edge_get(port, "/version") == b"v1\n"
