"""With the real executables on a dev stack (API, controller, edge, Postgres, registry)
and two simulated hosts: `ember deploy` of the hello-http sample's manifest waits for and
reaches its desired instances, `ember scale` spreads them, `ember status` answers what is
desired, what runs and why it does not converge; and a route made with `ember routes
create` carries traffic through the edge (HAProxy) to the instances' endpoint."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_cli_deploy import EMBER, Stack, image
from tests.support.simagent import HttpTransport, SimAgent
from tests.support.stack import stack_env

SAMPLE = Path(__file__).parents[2] / "examples" / "hello-http" / "ember.toml"
BACKEND = ("127.0.0.2", 8080)  # a registered test endpoint standing in for the instances


class Backend:
    """A TCP server at BACKEND answering every connection with a greeting."""

    def __init__(self) -> None:
        self.server = socket.create_server(BACKEND)
        self.server.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"hello from the instance\n")

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.server.close()


class Agents:
    """Simulated hosts stepping in a background thread, as agents would."""

    def __init__(self, api_url: str, token: str, hosts: list[str]) -> None:
        self.client = httpx.Client(base_url=api_url, timeout=10)
        transport = HttpTransport(self.client, token)
        for host in hosts:
            body = {"vcpus": 4, "memory_mb": 4096, "disk_mb": 20_000, "region": "local"}
            response = self.client.put(f"/v1/hosts/{host}", json=body, headers=transport.headers)
            assert response.status_code in (200, 201), response.text
        # Every instance answers at the test endpoint (no microVMs here): BACKEND.
        self.agents = [
            SimAgent(transport, h, health_delay=1, address=lambda _iid: BACKEND[0]) for h in hosts
        ]
        self.stopping = threading.Event()
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(0.2):
            try:
                for agent in self.agents:
                    agent.step()
            except (AssertionError, httpx.HTTPError) as exc:  # surfaced by close()
                self.errors.append(exc)
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.client.close()
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="ember-converge-"))
    s = Stack(home)
    try:
        s.json("dev", "up")
        s("apps", "create", "hello-http")
        s("envs", "create", "prod", "--app", "hello-http")
        yield s
    finally:
        subprocess.run(
            [EMBER, "dev", "down"], env=stack_env(home), capture_output=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def agents(stack: Stack) -> Iterator[Agents]:
    config = tomllib.loads((stack.home / "cli.toml").read_text())
    a = Agents(config["api_url"], config["token"], ["sim-1", "sim-2"])
    yield a
    a.close()


def test_deploy_scale_and_status_converge(stack: Stack, agents: Agents, tmp_path: Path) -> None:
    shutil.copy(SAMPLE, stack.project / "ember.toml")
    # Before the first deploy there is nothing to run and nothing wrong.
    quiet = stack.json("status", "--env", "prod")
    assert quiet["release"] is None and quiet["problems"] == []  # type: ignore[index]

    # `ember deploy` waits for the rollout (the default) and returns once it converged.
    v1 = stack(
        "deploy", "--image", str(image(tmp_path, "one")), "--env", "prod", "--timeout", "90s"
    )
    status = stack.json("status", "--env", "prod")
    assert status["converged"] is True, (v1.stdout, status)  # type: ignore[index]
    assert status["rollout"]["phase"] == "completed"  # type: ignore[index]
    web = {p["name"]: p for p in status["processes"]}["web"]  # type: ignore[index]
    assert (web["desired"], web["running"], web["healthy"]) == (1, 1, 1)

    scaled = stack.json("scale", "web=3", "--env", "prod")
    assert scaled["processes"]["web"]["count"] == 3  # type: ignore[index]
    status = _wait_converged(stack)
    live = [i for i in status["instances"] if i["state"] == "healthy"]
    assert len(live) == 3
    assert {i["host_id"] for i in live} == {"sim-1", "sim-2"}  # spread over both hosts
    assert {i["release_version"] for i in live} == {1}

    # More than the hosts can hold: status says why it cannot converge.
    stack("scale", "web=40", "--env", "prod")
    status = _wait(stack, lambda s: any("cannot be placed" in p for p in s["problems"]))
    assert not status["converged"]
    text = stack("status", "--env", "prod").stdout
    assert "Not converging" in text and "memory" in text
    stack("scale", "web=2", "--env", "prod")
    status = _wait_converged(stack)
    assert sum(i["state"] == "healthy" for i in status["instances"]) == 2


def _wait(
    stack: Stack, cond: Callable[[dict[str, Any]], bool], timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = stack.json("status", "--env", "prod")  # type: ignore[assignment]
        if cond(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)


def _wait_converged(stack: Stack) -> dict[str, Any]:
    return _wait(stack, lambda s: bool(s["converged"]))


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def test_a_cli_route_carries_traffic_through_the_edge(
    stack: Stack, agents: Agents, backend: Backend
) -> None:
    status = _wait_converged(stack)
    assert status["release"] is not None  # deployed by the test above
    route = stack.json(
        "routes",
        "create",
        "--tcp",
        "--port",
        "auto",
        "--process",
        "web",
        "--backend-port",
        str(BACKEND[1]),
        "--env",
        "prod",
    )
    port = int(route["port"])  # type: ignore[index]
    assert 10000 <= port <= 10999

    def greeting() -> bytes | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                return conn.recv(100)
        except OSError:
            return None

    deadline = time.monotonic() + 30
    while (answer := greeting()) != b"hello from the instance\n":
        assert time.monotonic() < deadline, f"the edge never routed port {port}: {answer!r}"
        time.sleep(0.2)
    # Deleting the route closes the port to new connections.
    stack("routes", "delete", route["id"], "--env", "prod", "--yes")  # type: ignore[index]
    deadline = time.monotonic() + 30
    while greeting() is not None:
        assert time.monotonic() < deadline, "the deleted route still answers"
        time.sleep(0.2)
