"""The real host agent with a real microVM (QEMU) on a private dev stack: `ember deploy` of
the hello-http sample ends with a VM serving its page, `ember status` shows it healthy with
an address, and `ember scale web=0` stops it. Needs root (taps, nftables, cgroups)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli_deploy import EMBER, Stack
from tests.integration.test_qemu_boot import guest  # noqa: F401  (the session fixture)
from tests.support.stack import stack_env

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "hello-http"
HOST = "test-host"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]


def _taps() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    return set(re.findall(r"^\d+: (em-[^:@]+)", out, re.M))


def _nft_table() -> bool:
    return (
        subprocess.run(
            ["nft", "list", "table", "inet", "ember"], capture_output=True, check=False
        ).returncode
        == 0
    )


def _qemus(marker: str) -> list[int]:
    """The qemu processes whose command line mentions ``marker`` (this test's data dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "qemu-system" in cmd and marker in cmd:
                pids.append(int(proc.name))
    return pids


def _status(stack: Stack) -> Any:
    return stack.json("status", "--env", "prod")


def _wait(what: str, cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hello-http-oci")
    proc = subprocess.run(
        [sys.executable, "-m", "ember.dev.examples", "build", "hello-http", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_agent_runs_hello_http_in_a_microvm(
    guest: dict[str, Path],  # noqa: F811
    sample_image: Path,
) -> None:
    home = Path(tempfile.mkdtemp(prefix="ember-agent-e2e-"))
    data_dir = home / "agent-data"
    stack = Stack(home)
    env = stack_env(home)
    agent: subprocess.Popen[bytes] | None = None
    taps_before = _taps()
    had_table = _nft_table()
    agent_code: int | None = None
    agent_log = home / "agent.log"
    try:
        stack.json("dev", "up")
        api_url = tomllib.loads((home / "cli.toml").read_text())["api_url"]
        token = stack.json("hosts", "enroll-token", "--host-id", HOST)["token"]  # type: ignore[index]
        with agent_log.open("wb") as out:
            agent = subprocess.Popen(
                [
                    EMBER,
                    "server",
                    "agent",
                    "--api-url",
                    api_url,
                    "--enroll-token",
                    token,
                    "--data-dir",
                    str(data_dir),
                    "--host-id",
                    HOST,
                    "--guest-dir",
                    str(guest["kernel"].parent),
                    "--vcpus",
                    "2",
                    "--memory-mb",
                    "2048",
                    "--heartbeat",
                    "1",
                    "--poll",
                    "0.5",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def enrolled() -> bool:
            assert agent is not None and agent.poll() is None, agent_log.read_text()
            hosts = stack.json("hosts", "list")
            items = hosts["items"] if isinstance(hosts, dict) else hosts  # type: ignore[index]
            return any(HOST in (h.get("id"), h.get("host_id")) for h in items)

        _wait("the agent to enrol", enrolled, 30)

        project = home / "project"
        shutil.copy(SAMPLE / "ember.toml", project / "ember.toml")
        stack("apps", "create", "hello-http")
        stack("envs", "create", "prod", "--app", "hello-http")
        started = time.monotonic()
        deploy = subprocess.run(
            [EMBER, "deploy", "--image", str(sample_image), "--env", "prod", "--timeout", "180s"],
            env=env,
            cwd=project,
            capture_output=True,
            text=True,
            timeout=240,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        deploy_s = time.monotonic() - started
        assert deploy.returncode == 0, (deploy.stdout, deploy.stderr, _status(stack))
        print(f"deploy to healthy: {deploy_s:.1f}s")
        status: Any = stack.json("status", "--env", "prod")
        live = [i for i in status["instances"] if i["state"] == "healthy"]
        assert len(live) == 1, (deploy.stdout, status)
        instance = live[0]
        assert instance["host_id"] == HOST and instance["address"], instance
        address = instance["address"]
        host = f"[{address}]" if ":" in address else address
        page = urllib.request.urlopen(f"http://{host}:8080/", timeout=10).read()
        assert page == (SAMPLE / "rootfs/www/index.html").read_bytes()
        assert _qemus(str(data_dir)), "no qemu process for the instance"

        stack("scale", "web=0", "--env", "prod")

        def stopped() -> Any:
            s: Any = stack.json("status", "--env", "prod")
            states = {i["instance_id"]: i["state"] for i in s["instances"]}
            return states.get(instance["instance_id"]) == "stopped" and not _qemus(str(data_dir))

        _wait("the VM to stop", stopped, 60)
    finally:
        subprocess.run([EMBER, "dev", "down"], env=env, capture_output=True, check=False)
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent_code = agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        leftover = _qemus(str(data_dir))
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        new_taps = _taps() - taps_before
        for tap in new_taps:
            subprocess.run(["ip", "link", "delete", tap], capture_output=True, check=False)
        if not had_table:
            subprocess.run(
                ["nft", "delete", "table", "inet", "ember"], capture_output=True, check=False
            )
        if agent_log.exists():
            print(agent_log.read_text())  # shown when the test fails
        shutil.rmtree(home, ignore_errors=True)
    assert agent_code == 0, f"the agent did not exit cleanly on SIGTERM: {agent_code}"
    assert not leftover, f"qemu processes left running: {leftover}"
    assert not new_taps, f"taps left behind: {new_taps}"
