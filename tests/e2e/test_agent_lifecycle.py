"""An instance's life on a real host agent with real microVMs (QEMU, TCG here), end to end
through the `ember` CLI: a stop delivers the kill signal and the exit code is recorded; a
crashing workload fails with its exit code, is replaced per its restart policy and halts
the deploy; a restarted agent adopts its running VMs; a corrupted image blob is refused.

One dev stack and one agent serve the module (booting them costs more than a test); each
test has an app of its own and ends with none of its VMs left (the ``apps`` fixture
scales them to zero and waits for their VMs and taps to go, even when the test failed).
Needs root (taps, nftables, cgroups).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.client.oci import ImageConfig, OciLayout, RegistryClient, build_image
from tests.integration.test_qemu_boot import guest  # noqa: F401  (the session fixture)
from tests.support.agentstack import (
    SAMPLE,
    SAMPLE_PAGE,
    AgentStack,
    fetch_page,
    hello_http_image,  # noqa: F401  (the module fixture)
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]

ENDED = ("stopped", "failed", "lost")

CRASHING = """schema_version = 1
app = "{app}"

[processes]
web = ["/bin/sh", "-c", "echo crashing; sleep 1; exit 3"]

# Nothing listens, so the check never passes: the instance never becomes healthy and its
# crash fails the rollout (a healthy instance crashing later is a steady-state restart).
[[services]]
process = "web"
internal_port = 8080
protocol = "tcp"

  [[services.checks]]
  type = "tcp"

[[vm]]
processes = ["web"]
memory_mb = 256

[restart]
policy = "on-failure"
max_retries = 2
"""


def hello(app: str, *, deploy: str = "", tail: str = "") -> str:
    """The hello-http sample's manifest for ``app``: ``deploy`` lines added to its
    ``[deploy]`` table, ``tail`` (more tables) appended."""
    text = (SAMPLE / "ember.toml").read_text()
    assert text.count('app = "hello-http"') == 1 and text.count("[deploy]\n") == 1
    text = text.replace('app = "hello-http"', f'app = "{app}"')
    return text.replace("[deploy]\n", f"[deploy]\n{deploy}") + tail


def healthy(stack: AgentStack, app: str) -> list[Any]:
    return [i for i in stack.status(app)["instances"] if i["state"] == "healthy"]


def ended(stack: AgentStack, app: str, instance_id: str) -> Any:
    """The instance once it has ended, else None."""
    inst = stack.instances(app).get(instance_id)
    return inst if inst is not None and inst["state"] in ENDED else None


class Apps:
    """The apps a test creates; :meth:`stop_all` leaves none of their VMs running."""

    def __init__(self, stack: AgentStack) -> None:
        self.stack = stack
        self.names: list[str] = []

    def create(self, app: str, manifest: str) -> Path:
        self.names.append(app)
        return self.stack.create_app(app, manifest)

    def stop_all(self) -> None:
        stack = self.stack
        if not stack.agent_alive():  # a test that failed while the agent was down
            stack.start_agent()
        for app in self.names:
            stack.run("scale", "web=0", "--app", app, "--env", "prod", expect=None)

        def gone() -> bool:
            return not stack.qemus() and not stack.taps()

        try:
            wait_for("the test's VMs and taps to go", gone, 120, describe=stack.agent_log)
        finally:
            if stack.qemus():  # a halted rollout keeps what runs: not ours to keep
                stack.kill_vms()
                wait_for("the agent to forget the killed VMs", gone, 60)


@pytest.fixture(scope="module")
def stack(guest: dict[str, Path]) -> Iterator[AgentStack]:  # noqa: F811
    s = AgentStack(
        Path(tempfile.mkdtemp(prefix="ember-lifecycle-")),
        guest["kernel"].parent,
        vcpus=2,
        memory_mb=4096,  # three 256 MB VMs and room for a surge
    )
    try:
        s.up()
        s.start_agent()
        s.wait_enrolled()
        yield s
    finally:
        left = s.close()
        print(s.agent_log())  # shown when something failed
        s.remove_home()
    assert left.clean, f"left behind: {left}"


@pytest.fixture
def apps(stack: AgentStack) -> Iterator[Apps]:
    created = Apps(stack)
    try:
        yield created
    finally:
        created.stop_all()


# -- 1. a stop: the kill signal, power-off, the exit code --------------------------------


def test_a_stop_sends_the_kill_signal_and_records_the_exit_code(
    stack: AgentStack,
    apps: Apps,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "signals"
    # v1 is stopped with SIGUSR1: busybox httpd dies of it (128 + 10). A VM that did not
    # power off within kill_timeout would end 137 (the init's SIGKILL) or with no status
    # at all (the agent's SIGKILL of QEMU).
    project = apps.create(app, hello(app, deploy='kill_signal = "SIGUSR1"\nkill_timeout = "60s"\n'))
    stack.deploy(project, hello_http_image)
    (first,) = healthy(stack, app)
    assert fetch_page(first["address"]) == SAMPLE_PAGE

    # v2 (the default kill signal, SIGTERM) replaces it, rolling.
    (project / "ember.toml").write_text(hello(app, tail='[env]\nRELEASE = "2"\n'))
    stack.deploy(project, hello_http_image)
    old = wait_for(
        "v1's instance to end",
        lambda: ended(stack, app, first["instance_id"]),
        120,
        describe=stack.agent_log,
    )
    assert (old["state"], old["exit_code"]) == ("stopped", 128 + signal.SIGUSR1), old
    (second,) = healthy(stack, app)
    assert second["release_version"] == 2
    assert fetch_page(second["address"]) == SAMPLE_PAGE
    assert set(stack.qemus().values()) == {second["instance_id"]}

    # Scaled to zero: SIGTERM (128 + 15), and the VM is gone.
    stack.run("scale", "web=0", "--app", app, "--env", "prod")
    last = wait_for(
        "v2's instance to end",
        lambda: ended(stack, app, second["instance_id"]),
        120,
        describe=stack.agent_log,
    )
    assert (last["state"], last["exit_code"]) == ("stopped", 128 + signal.SIGTERM), last
    wait_for("the VM to go", lambda: not stack.qemus(), 30)
    text = stack.run("status", "--app", app, "--env", "prod").stdout
    assert f"stopped ({128 + signal.SIGTERM})" in text, text


# -- 2. a crashing workload: failed with its exit code, restarted, the deploy halts --------


def test_a_crashing_workload_is_restarted_per_its_policy_then_the_deploy_halts(
    stack: AgentStack,
    apps: Apps,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "crashing"
    project = apps.create(app, CRASHING.format(app=app))
    deploy = stack.deploy(project, hello_http_image, expect=6)
    error = json.loads(deploy.stderr)["error"]
    assert error["code"] == "cli.rollout_failed", error
    assert error["detail"]["phase"] == "halted", error

    status = stack.status(app)
    instances = status["instances"]
    # The first instance and its max_retries = 2 replacements, each failed with exit 3.
    assert len(instances) == 3, instances
    for inst in instances:
        assert (inst["state"], inst["exit_code"]) == ("failed", 3), inst
        assert inst["reason"] == "exited with code 3", inst
        assert inst["host_id"] == stack.host_id
    assert status["rollout"]["phase"] == "halted"
    assert status["rollout"]["reason"].startswith("3 new instances failed"), status["rollout"]
    assert not status["converged"]
    assert any(
        p.startswith("rollout of v1 halted: 3 new instances failed") for p in status["problems"]
    ), status["problems"]
    assert not stack.qemus()
    # `ember status` says why, for people too.
    text = stack.run("status", "--app", app, "--env", "prod").stdout
    assert "halted: 3 new instances failed" in text and "exited with code 3" in text, text
    assert "failed (3)" in text, text


# -- 3. agent restart: its VMs are adopted, not restarted nor leaked ----------------------


def test_a_restarted_agent_adopts_its_running_vms(
    stack: AgentStack,
    apps: Apps,
    hello_http_image: Path,  # noqa: F811
) -> None:
    app = "adopted"
    project = apps.create(app, hello(app))
    stack.deploy(project, hello_http_image)
    stack.run("scale", "web=3", "--app", app, "--env", "prod")

    def three_healthy() -> list[Any] | None:
        live = healthy(stack, app)
        return live if len(live) == 3 else None

    running = wait_for("3 healthy instances", three_healthy, 300, describe=stack.agent_log)
    ids = {i["instance_id"] for i in running}
    vms = stack.qemus()
    assert sorted(vms.values()) == sorted(ids), vms  # one VM per instance, no other
    shims = sorted(stack.shims())
    assert len(shims) == 3

    stack.kill_agent()  # kill -9 of the agent's process alone
    assert stack.qemus() == vms  # the VMs outlive it
    before = stack.host()["last_seen"]
    stack.start_agent()
    wait_for(
        "the restarted agent to adopt the VMs",
        lambda: "adopted 3 running VM(s)" in stack.agent_log().rsplit("--- agent start", 1)[-1],
        60,
        describe=stack.agent_log,
    )
    # Converged: several heartbeats of the restarted agent, each sent after a full step.
    beats: set[str] = set()

    def heartbeats() -> bool:
        seen = stack.host()["last_seen"]
        if seen != before:
            beats.add(seen)
        return len(beats) >= 3

    wait_for("3 heartbeats of the restarted agent", heartbeats, 60, interval_s=0.3)

    status = stack.status(app)
    assert status["converged"], status["problems"]
    assert {i["instance_id"] for i in status["instances"]} == ids  # none replaced
    assert all(i["state"] == "healthy" for i in status["instances"]), status["instances"]
    assert stack.qemus() == vms  # the very same processes: nothing new, nothing orphaned
    assert sorted(stack.shims()) == shims
    for inst in running:
        assert fetch_page(inst["address"]) == SAMPLE_PAGE

    # The adopted VMs stay reachable when the restarted agent changes the host's network
    # (a fourth instance: a new tap and a new firewall ruleset).
    stack.run("scale", "web=4", "--app", app, "--env", "prod")

    def four_healthy() -> list[Any] | None:
        live = healthy(stack, app)
        return live if len(live) == 4 else None

    now = wait_for("4 healthy instances", four_healthy, 300, describe=stack.agent_log)
    assert ids < {i["instance_id"] for i in now}
    for inst in now:
        assert fetch_page(inst["address"]) == SAMPLE_PAGE, inst


# -- 4. a corrupted blob: refused, no VM ------------------------------------------------


def test_a_corrupted_image_layer_is_refused_and_no_vm_starts(
    stack: AgentStack, apps: Apps, tmp_path: Path
) -> None:
    app = "tampered"
    project = apps.create(app, hello(app, tail='[restart]\npolicy = "no"\n'))
    # An image of its own, so its layer is in no cache yet (neither the agent's nor the
    # registry's): a page nobody else has.
    tree = tmp_path / "rootfs"
    (tree / "www").mkdir(parents=True)
    (tree / "www" / "index.html").write_text(secrets.token_hex(32))
    layout_dir = tmp_path / "image"
    root = build_image(layout_dir, [tree], ImageConfig(cmd=["httpd", "-f", "-p", "8080"]))
    layout = OciLayout.open(layout_dir)
    (layer,) = layout.manifest(root)["layers"]
    layer_hex = layer["digest"].removeprefix("sha256:")

    # Pushed intact, then one byte of the layer flipped in the registry's storage (the
    # size stays: only the digest tells).
    registry_url = stack.json("dev", "status")["registry_url"]
    with RegistryClient(registry_url) as registry:
        registry.push(layout, f"local/{app}")
    blob = (
        stack.home / "registry/data/docker/registry/v2/blobs/sha256"
        / layer_hex[:2] / layer_hex / "data"
    )  # fmt: skip
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    # Every VM seen while the deploy runs (there must be none).
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(stack.qemus().values())
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deploy = stack.deploy(project, layout_dir, expect=6)  # the blobs are there: no upload
    finally:
        done.set()
        watcher.join()
    error = json.loads(deploy.stderr)["error"]
    assert error["code"] == "cli.rollout_failed", error
    assert error["detail"]["phase"] == "halted", error

    status = stack.status(app)
    (inst,) = status["instances"]  # restart policy "no": not replaced
    assert (inst["state"], inst["exit_code"]) == ("failed", None), inst
    assert inst["reason"].startswith("start failed (oci.digest_mismatch): "), inst
    assert layer["digest"] in inst["reason"] and "corrupt or tampered" in inst["reason"], inst
    assert f"web: instance {inst['instance_id']} failed: start failed (oci.digest_mismatch)" in (
        "\n".join(status["problems"])
    ), status["problems"]
    assert not seen, f"a VM was started: {seen}"
    # Nothing of the bad blob is kept, and no root filesystem was built from it.
    images = stack.data_dir / "images"
    assert not (images / "cache/blobs/sha256" / layer_hex).exists()
    assert not (images / "rootfs" / f"{root.digest.removeprefix('sha256:')}.ext4").exists()
