"""A private dev stack with a real host agent running QEMU microVMs, for the end-to-end
tests of ``tests/e2e/test_agent_*.py``. Needs root (taps, nftables, cgroups).

:class:`AgentStack` runs `ember dev up` in a temporary ``EMBER_HOME`` (with
``EMBER_DEV_AGENT=0``: the stack starts no agent of its own) and `ember server agent` as a
subprocess, enrolled under a host id unique to the run, its data dir in that home. Its
helpers look at what the agent puts on the machine:

- QEMU processes and their per-VM shims: their command lines name the agent's data dir,
  and QEMU's ``-name ember:<instance id>`` says whose VM it is;
- taps: those holding an address of the host's IPv6 prefix (derived from the host id),
  or named in the agent's lease file, so another stack's taps on the machine never count;
- the ``inet ember`` nftables table and the prefix's ``unreachable`` route.

:meth:`AgentStack.close` stops the agent, then removes all of that (SIGKILL for VMs still
running), stops the stack and deletes the home, even after a failed test, and reports
what it had to remove (:class:`Leftovers`), so a test can assert that nothing leaked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ember.agent.net.addressing import AddressPlan
from ember.agent.net.store import LeaseStore
from ember.agent.state import StateStore
from tests.support.stack import stack_env

EMBER = str(Path(sys.executable).parent / "ember")
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "hello-http"
SAMPLE_PAGE = (SAMPLE / "rootfs" / "www" / "index.html").read_bytes()
_QEMU_NAME = re.compile(r"-name ember:(\S+)")

T = TypeVar("T")

__all__ = [
    "EMBER",
    "SAMPLE",
    "SAMPLE_PAGE",
    "AgentStack",
    "Leftovers",
    "fetch_page",
    "hello_http_image",
    "nft_table_exists",
    "wait_for",
]


# -- waiting and looking -------------------------------------------------------------------


def wait_for(
    what: str,
    cond: Callable[[], T | None],
    timeout_s: float,
    *,
    interval_s: float = 0.5,
    describe: Callable[[], object] | None = None,
) -> T:
    """Poll ``cond`` until it returns something truthy (returned); fail naming ``what``
    (and ``describe()``: the status, a log) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            more = f"\n{describe()}" if describe is not None else ""
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}{more}")
        time.sleep(interval_s)


def fetch_page(address: str, port: int = 8080, timeout_s: float = 10.0) -> bytes:
    host = f"[{address}]" if ":" in address else address
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=timeout_s) as response:
        body: bytes = response.read()
    return body


def nft_table_exists() -> bool:
    return (
        subprocess.run(
            ["nft", "list", "table", "inet", "ember"], capture_output=True, check=False
        ).returncode
        == 0
    )


def _table_in_use() -> bool:
    """Does the ``inet ember`` table name a tap that exists (another agent's, on a machine
    running several test stacks at once)? Then it is not ours to delete."""
    ruleset = subprocess.run(
        ["nft", "list", "table", "inet", "ember"], capture_output=True, text=True, check=False
    ).stdout
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    existing = set(re.findall(r"^\d+: (em-[^:@]+)", links, re.M))
    return bool(existing & set(re.findall(r'"(em-[^"*]+)"', ruleset)))


def _cmdlines() -> Iterator[tuple[int, str]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                raw = (proc / "cmdline").read_bytes()
                yield int(proc.name), raw.replace(b"\0", b" ").decode(errors="replace")


@pytest.fixture(scope="module")
def hello_http_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hello-http sample as an OCI layout (`python -m ember.dev.examples build`; the
    .deb cache makes a rebuild quick)."""
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


# -- the stack -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leftovers:
    """What :meth:`AgentStack.close` found and had to remove."""

    qemus: tuple[int, ...]
    shims: tuple[int, ...]
    taps: tuple[str, ...]
    agent_exit: int | None
    """The agent's exit status on SIGTERM (None: it was not running)."""

    @property
    def clean(self) -> bool:
        return not (self.qemus or self.shims or self.taps) and self.agent_exit in (0, None)


class AgentStack:
    """`ember dev up` + one real `ember server agent` (see the module docstring)."""

    def __init__(
        self, home: Path, guest_dir: Path, *, vcpus: int = 2, memory_mb: int = 2048
    ) -> None:
        self.home = home
        self.guest_dir = guest_dir
        self.vcpus = vcpus
        self.memory_mb = memory_mb
        self.host_id = f"t-{secrets.token_hex(4)}"
        self.data_dir = home / "agent-data"
        self.log_path = home / "agent.log"
        self.plan = AddressPlan.for_host(self.host_id)
        self.env = {**stack_env(home), "EMBER_DEV_AGENT": "0"}
        self.agent: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.starts = 0
        self._had_table = nft_table_exists()

    # -- the CLI ----------------------------------------------------------------------------

    def run(
        self, *args: str, cwd: Path | None = None, expect: int | None = 0, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`ember ARGS` against this stack; its exit status must be ``expect`` (unless
        None) and a user error never shows a traceback."""
        proc = subprocess.run(
            [EMBER, *args],
            env=self.env,
            cwd=cwd or self.home,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, cwd: Path | None = None) -> Any:
        return json.loads(self.run(*args, "--json", cwd=cwd).stdout)

    def up(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.json("dev", "up")
        self.api_url = tomllib.loads((self.home / "cli.toml").read_text())["api_url"]

    def create_app(self, app: str, manifest: str, env: str = "prod") -> Path:
        """The app, its env and a project directory holding ``manifest`` as ember.toml."""
        project = self.home / "projects" / app
        project.mkdir(parents=True)
        (project / "ember.toml").write_text(manifest)
        self.run("apps", "create", app)
        self.run("envs", "create", env, "--app", app)
        return project

    def deploy(
        self, project: Path, image: Path, *, expect: int = 0, timeout: str = "240s"
    ) -> subprocess.CompletedProcess[str]:
        """`ember deploy --json` from ``project``: it waits for the rollout."""
        return self.run(
            "deploy", "--image", str(image), "--timeout", timeout, "--json",
            cwd=project, expect=expect, timeout_s=600,
        )  # fmt: skip

    def status(self, app: str, env: str = "prod") -> Any:
        return self.json("status", "--app", app, "--env", env)

    def instances(self, app: str, env: str = "prod") -> dict[str, Any]:
        """The status's instances by id."""
        return {i["instance_id"]: i for i in self.status(app, env)["instances"]}

    def host(self) -> Any:
        return self.json("hosts", "show", self.host_id)

    # -- the agent ------------------------------------------------------------------------

    def start_agent(self) -> None:
        """Start `ember server agent`: enrolled with a one-time token the first time; later
        starts reuse the data dir (state, node key) and need none."""
        assert self.agent is None or self.agent.poll() is not None, "the agent runs already"
        args = [
            EMBER, "server", "agent",
            "--api-url", self.api_url,
            "--data-dir", str(self.data_dir),
            "--host-id", self.host_id,
            "--guest-dir", str(self.guest_dir),
            "--vcpus", str(self.vcpus),
            "--memory-mb", str(self.memory_mb),
            "--heartbeat", "1",
            "--poll", "0.5",
        ]  # fmt: skip
        if StateStore(self.data_dir).load().host_id is None:
            token = self.json("hosts", "enroll-token", "--host-id", self.host_id)["token"]
            args += ["--enroll-token", token]
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"--- agent start {self.starts} ---\n".encode())
            out.flush()
            self.agent = subprocess.Popen(
                args, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def agent_alive(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def wait_enrolled(self, timeout_s: float = 60) -> None:
        def enrolled() -> bool:
            assert self.agent_alive(), f"the agent exited:\n{self.agent_log()}"
            hosts = self.json("hosts", "list")
            items = hosts["items"] if isinstance(hosts, dict) else hosts
            return any(self.host_id == h.get("id") for h in items)

        wait_for("the agent to enrol", enrolled, timeout_s, describe=self.agent_log)

    def kill_agent(self) -> None:
        """``kill -9`` of the agent's own process (its VMs' shims live on: own sessions)."""
        assert self.agent is not None and self.agent_alive()
        os.kill(self.agent.pid, signal.SIGKILL)
        self.agent.wait(timeout=30)

    def stop_agent(self, timeout_s: float = 30) -> int | None:
        """SIGTERM; its exit status (None when it was not running)."""
        if self.agent is None or self.agent.poll() is not None:
            return None
        self.agent.send_signal(signal.SIGTERM)
        try:
            return self.agent.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
            return -signal.SIGKILL

    def agent_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- what runs on the machine ---------------------------------------------------------

    def qemus(self) -> dict[int, str]:
        """This agent's QEMU processes: pid -> instance id."""
        marker = str(self.data_dir)
        out = {}
        for pid, cmd in _cmdlines():
            if "qemu-system" in cmd and marker in cmd:
                m = _QEMU_NAME.search(cmd)
                out[pid] = m.group(1) if m else ""
        return out

    def shims(self) -> list[int]:
        marker = str(self.data_dir)
        return [pid for pid, cmd in _cmdlines() if "qemu_shim" in cmd and marker in cmd]

    def taps(self) -> set[str]:
        """This agent's taps: holding an address of its prefix, or named in its leases."""
        found = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        links = json.loads(found or "[]")
        names = {link["ifname"] for link in links}
        ours = {
            link["ifname"]
            for link in links
            for addr in link.get("addr_info", [])
            if addr.get("family") == "inet6" and ip_address(addr["local"]) in self.plan.ipv6_prefix
        }
        store = StateStore(self.data_dir)
        if store.leases_path.exists():
            ours |= {
                lease.tap for lease in LeaseStore(store.leases_path).load(self.plan).leases.values()
            }
        return {name for name in ours if name in names and name.startswith("em-")}

    # -- cleanup --------------------------------------------------------------------------

    def kill_vms(self) -> list[int]:
        """SIGKILL every QEMU of this agent and wait (briefly) for their shims, which
        record the exit and follow; returns the QEMU pids that were running."""
        qemus = sorted(self.qemus())
        for pid in qemus:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.shims() and time.monotonic() < deadline:
            time.sleep(0.1)
        return qemus

    def close(self) -> Leftovers:
        """Stop the agent, then remove what it left on the machine (see the module
        docstring) and stop the stack; idempotent. Never fails: it reports."""
        agent_exit = self.stop_agent()
        qemus = self.kill_vms()
        shims = sorted(self.shims())
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        taps = sorted(self.taps())
        for tap in taps:
            subprocess.run(["ip", "link", "delete", tap], capture_output=True, check=False)
        subprocess.run(
            ["ip", "-6", "route", "del", "unreachable", str(self.plan.ipv6_prefix)],
            capture_output=True,
            check=False,
        )
        if not self._had_table and not _table_in_use():
            subprocess.run(
                ["nft", "delete", "table", "inet", "ember"], capture_output=True, check=False
            )
        subprocess.run([EMBER, "dev", "down"], env=self.env, capture_output=True, check=False)
        return Leftovers(tuple(qemus), tuple(shims), tuple(taps), agent_exit)

    def remove_home(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
