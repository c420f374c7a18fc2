"""The firecracker driver end to end against the fake jailer + Firecracker.

The driver code is the real one (staging, jailer command line, process handling, the
HTTP client over the Unix socket, adoption, stop); only the two binaries are fakes, and
the fake Firecracker validates every request against firecracker.yaml
(tests/support/fake_firecracker.py). Needs root: the driver chowns jail files to the VM's
uid, as in production (CI runs as root).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.agent.vmm import jailer
from ember.agent.vmm.base import Drive, NetDevice, VmmError, VmmUnavailable, VmNotFound, VmSpec
from ember.agent.vmm.base import VmState as S
from ember.agent.vmm.firecracker import (
    FirecrackerConfig,
    FirecrackerDriver,
    JailPaths,
    boot_calls,
    is_vmm_process,
    process_start_ticks,
    stop_calls,
)
from ember.agent.vmm.jailer import IdRange, JailerConfig, JailLayout
from tests.support.fake_firecracker import (
    FakeFirecracker,
    SpecMissing,
    install_fake,
    load_contract,
    spec_path,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the driver chowns jail files to VM uids: run as root"
)
FIRST_UID = 3_000_000


@dataclasses.dataclass
class Env:
    base: Path
    fake: FakeFirecracker
    config: FirecrackerConfig

    def driver(self) -> FirecrackerDriver:
        return FirecrackerDriver(self.config)

    def spec(self, vm_id: str, **changes: object) -> VmSpec:
        images = self.base / "images"
        vm = self.base / "vms" / vm_id
        vm.mkdir(parents=True)
        (vm / "rootfs.ext4").write_bytes(b"\0" * 4096)
        (vm / "config.img").write_bytes(b"\0" * 1024)
        spec = VmSpec(
            vm_id=vm_id,
            kernel=images / "vmlinux",
            initrd=images / "initrd.img",
            kernel_args="console=ttyS0 reboot=k panic=1",
            vcpus=2,
            memory_mb=256,
            drives=(
                Drive("root", vm / "rootfs.ext4"),
                Drive("config", vm / "config.img", read_only=True),
            ),
            nets=(NetDevice("eth0", "emb0", "02:fc:00:00:00:01"),),
            console_log=vm / "console.log",
            workdir=vm,
        )
        return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]

    def layout(self, vm_id: str) -> JailLayout:
        return JailLayout.of(self.config.jailer, vm_id)

    def requests(self, vm_id: str) -> list[dict]:
        return self.fake.requests(self.layout(vm_id).jail_dir)


@pytest.fixture
def env() -> Iterator[Env]:
    try:
        load_contract()
    except SpecMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="emberfc-"))
    images = base / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\x7fELF kernel")
    (images / "vmlinux").chmod(0o644)  # world-readable: hard-linked into each jail
    (images / "initrd.img").write_bytes(b"070701 initrd")
    (images / "initrd.img").chmod(0o600)  # not: copied and given to the VM
    fake = install_fake(base / "bin", spec=spec_path(), cgroup_root=base / "cgroup")
    (base / "netns").mkdir()
    config = FirecrackerConfig(
        jailer=JailerConfig(
            jailer_bin=fake.jailer_bin,
            firecracker_bin=fake.firecracker_bin,
            chroot_base=base / "jails",
            ids=IdRange(FIRST_UID, 4),
            cgroup_root=base / "cgroup",
            netns_dir=base / "netns",
            own_taps=False,  # the specs name taps that do not exist; see the tap test
        ),
        socket_timeout_s=30.0,
        kvm_device=None,
    )
    yield Env(base, fake, config)
    for state in (base / "jails").glob("*/*/ember.json"):
        record = json.loads(state.read_text())
        pid, ticks = record.get("pid"), record.get("start_ticks")
        if pid and ticks and is_vmm_process(pid, ticks, record["jail_id"]):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def expected(env: Env, spec: VmSpec) -> list[tuple[str, str, object]]:
    calls = boot_calls(spec, JailPaths.of(spec), log_level=env.config.log_level)
    return [(c.method, c.path, dict(c.body) if c.body else None) for c in calls]


def seen(env: Env, vm_id: str) -> list[tuple[str, str, object]]:
    return [(r["method"], r["path"], r["body"]) for r in env.requests(vm_id)]


def test_start_sends_exactly_the_builders_calls_and_all_conform(env: Env) -> None:
    spec = env.spec("ins_01start")
    handle = env.driver().start(spec)
    assert handle.state is S.RUNNING

    records = env.requests(spec.vm_id)
    assert seen(env, spec.vm_id) == expected(env, spec)
    assert all(r["problems"] == [] and r["status"] == 204 for r in records), records

    layout = env.layout(spec.vm_id)
    invocation = env.fake.jailer_invocation(layout.jail_dir)
    uid = invocation["uid"]
    assert uid == FIRST_UID and invocation["gid"] == uid
    assert invocation["argv"] == jailer.jailer_argv(env.config.jailer, spec, uid=uid, gid=uid)[1:]
    # The jailer exec'd Firecracker in place: the pid we hold is the VMM's.
    assert (layout.root / "firecracker.pid").read_text() == str(handle.pid)
    cgroup = jailer.cgroup_dir(env.config.jailer, spec.vm_id)
    assert (cgroup / "memory.max").read_text() == f"{(256 + 128) << 20}\n"
    assert (cgroup / "cpu.max").read_text() == "200000 100000\n"

    # Drives are the agent's files themselves, handed to the VM's uid; the shared,
    # world-readable kernel is linked untouched; the private initrd was copied.
    root_link = layout.host("/drives/root")
    assert root_link.stat().st_ino == spec.drives[0].path.stat().st_ino
    assert (root_link.stat().st_uid, stat.S_IMODE(root_link.stat().st_mode)) == (uid, 0o600)
    assert stat.S_IMODE(layout.host("/drives/config").stat().st_mode) == 0o400
    assert layout.host("/vmlinux").stat().st_ino == spec.kernel.stat().st_ino
    assert spec.kernel.stat().st_uid == 0
    assert spec.initrd is not None
    initrd = layout.host("/initrd").stat()
    assert initrd.st_ino != spec.initrd.stat().st_ino and initrd.st_uid == uid

    assert spec.console_log is not None
    assert "fake firecracker: guest booted" in spec.console_log.read_text()

    gone = env.driver().stop(spec.vm_id, timeout_s=10)
    assert gone.state is S.EXITED and gone.exit_code == 0
    assert seen(env, spec.vm_id)[-1] == ("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert not layout.root.exists()
    assert spec.drives[0].path.exists()  # only the link went away


AGENT = """
import os, pickle, signal, sys
from ember.agent.vmm.firecracker import FirecrackerDriver
config, spec = pickle.loads(open(sys.argv[1], "rb").read())
print(FirecrackerDriver(config).start(spec).pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the agent dies hard with its VM running
"""


def test_a_restarted_agent_adopts_then_stops_the_vm(env: Env) -> None:
    spec = env.spec("ins_01adopt")
    job = env.base / "agent.pickle"
    job.write_bytes(pickle.dumps((env.config, spec)))
    agent = subprocess.run(
        [sys.executable, "-c", AGENT, str(job)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert agent.returncode == -signal.SIGKILL, agent.stderr
    pid = int(agent.stdout.split()[0])

    driver = env.driver()  # a new agent: nothing in memory
    adopted = driver.adopt(spec)
    assert adopted is not None
    assert (adopted.pid, adopted.state) == (pid, S.RUNNING)
    assert driver.status(spec.vm_id).state is S.RUNNING
    assert driver.adopt(env.spec("ins_01other")) is None

    stopped = driver.stop(spec.vm_id, timeout_s=10)
    assert stopped.state is S.EXITED
    assert stopped.exit_code is None  # not our child: only its parent saw the status
    records = seen(env, spec.vm_id)
    assert records[:-1] == expected(env, spec)
    assert records[-1] == ("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert not is_vmm_process(pid, process_start_ticks(pid) or 0, env.layout(spec.vm_id).jail_id)
    assert driver.adopt(spec) is None
    assert driver.status(spec.vm_id).state is S.EXITED


def test_stop_kills_a_guest_that_ignores_ctrl_alt_del(env: Env) -> None:
    env.fake.configure(on_ctrl_alt_del="ignore")
    spec = env.spec("ins_01stubborn")
    driver = env.driver()
    handle = driver.start(spec)
    stopped = driver.stop(spec.vm_id, timeout_s=0.5)
    assert stopped.exit_code == -signal.SIGKILL
    assert seen(env, spec.vm_id)[-1] == ("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert spec.console_log is not None
    assert "ignores Ctrl+Alt+Del" in spec.console_log.read_text()
    assert not os.path.exists(f"/proc/{handle.pid}")
    # Stopping again is harmless and answers the same.
    assert driver.stop(spec.vm_id, timeout_s=0.5) == stopped


def test_each_vm_gets_its_own_uid_and_a_freed_uid_is_reused(env: Env) -> None:
    driver = env.driver()
    specs = [env.spec(f"ins_01vm{i}") for i in range(3)]
    for spec in specs:
        driver.start(spec)
    uids = [env.fake.jailer_invocation(env.layout(s.vm_id).jail_dir)["uid"] for s in specs]
    assert uids == [FIRST_UID, FIRST_UID + 1, FIRST_UID + 2]
    driver.stop(specs[1].vm_id, timeout_s=5)
    late = env.spec("ins_01late")
    driver.start(late)
    assert env.fake.jailer_invocation(env.layout(late.vm_id).jail_dir)["uid"] == FIRST_UID + 1
    for spec in (specs[0], specs[2], late):
        driver.stop(spec.vm_id, timeout_s=5)


def test_a_jailer_failure_leaves_nothing_behind(env: Env) -> None:
    env.fake.configure(fail_jailer=True)
    spec = env.spec("ins_01broken")
    driver = env.driver()
    with pytest.raises(VmmError, match="exited with 1 before its API socket") as caught:
        driver.start(spec)
    assert "failing as configured" in caught.value.detail["console_tail"]
    assert not env.layout(spec.vm_id).root.exists()
    assert driver.status(spec.vm_id).state is S.EXITED
    env.fake.configure(fail_jailer=False)
    driver.start(spec)  # the same VM id starts cleanly afterwards, with the first uid
    assert env.fake.jailer_invocation(env.layout(spec.vm_id).jail_dir)["uid"] == FIRST_UID
    driver.stop(spec.vm_id, timeout_s=5)


def test_a_refused_call_aborts_the_start(env: Env) -> None:
    env.fake.configure(refuse=["/machine-config"])
    spec = env.spec("ins_01refused")
    driver = env.driver()
    with pytest.raises(VmmError, match="refused PUT /machine-config") as caught:
        driver.start(spec)
    assert caught.value.detail["status"] == 400
    assert "InstanceStart" not in str(seen(env, spec.vm_id))
    assert driver.status(spec.vm_id).exit_code == -signal.SIGKILL
    assert not env.layout(spec.vm_id).root.exists()


def test_a_vm_that_dies_is_reported_exited(env: Env) -> None:
    spec = env.spec("ins_01dies")
    driver = env.driver()
    handle = driver.start(spec)
    os.kill(handle.pid, signal.SIGTERM)
    for _ in range(500):
        status = driver.status(spec.vm_id)
        if status.state is S.EXITED:
            break
        time.sleep(0.02)
    assert status.state is S.EXITED and status.exit_code == -signal.SIGTERM
    assert not env.layout(spec.vm_id).root.exists()
    assert (env.layout(spec.vm_id).jail_dir / "firecracker.log").exists()


def test_starting_a_running_vm_is_refused(env: Env) -> None:
    spec = env.spec("ins_01twice")
    driver = env.driver()
    driver.start(spec)
    with pytest.raises(VmmError, match="already running"):
        env.driver().start(spec)
    driver.stop(spec.vm_id, timeout_s=5)


def test_a_long_jail_path_is_reached_through_proc(env: Env) -> None:
    vm_id = "ins_" + "x" * 60  # the socket path is longer than sun_path allows
    spec = env.spec(vm_id)
    assert len(os.fsencode(env.layout(vm_id).socket)) > 107
    driver = env.driver()
    driver.start(spec)
    assert seen(env, vm_id) == expected(env, spec)
    assert driver.stop(vm_id, timeout_s=5).exit_code == 0


def test_unknown_vms(env: Env) -> None:
    driver = env.driver()
    with pytest.raises(VmNotFound):
        driver.status("ins_01nobody")
    with pytest.raises(VmNotFound):
        driver.stop("ins_01nobody", timeout_s=1)
    assert driver.adopt(env.spec("ins_01nobody")) is None


def test_a_reused_pid_is_never_adopted_or_signalled(env: Env) -> None:
    spec = env.spec("ins_01ghost")
    layout = env.layout(spec.vm_id)
    layout.jail_dir.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        for ticks in (process_start_ticks(bystander.pid), 1):
            record = {
                "vm_id": spec.vm_id,
                "jail_id": layout.jail_id,
                "uid": FIRST_UID,
                "gid": FIRST_UID,
                "pid": bystander.pid,
                "start_ticks": ticks,
            }
            layout.state_file.write_text(json.dumps(record))
            driver = env.driver()
            assert driver.adopt(spec) is None
            assert driver.stop(spec.vm_id, timeout_s=0.1).state is S.EXITED
            assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_preflight_names_what_is_missing(env: Env) -> None:
    spec = env.spec("ins_01pre")
    netns = dataclasses.replace(env.config.jailer, netns="ember-{jail_id}")
    with pytest.raises(VmmUnavailable, match="network namespace"):
        FirecrackerDriver(dataclasses.replace(env.config, jailer=netns)).start(spec)
    no_binary = dataclasses.replace(env.config.jailer, jailer_bin=env.base / "nope")
    with pytest.raises(VmmUnavailable, match="nope is missing"):
        FirecrackerDriver(dataclasses.replace(env.config, jailer=no_binary)).start(spec)
    with pytest.raises(VmmUnavailable, match="KVM"):
        FirecrackerDriver(dataclasses.replace(env.config, kvm_device=env.base / "kvm")).start(spec)
    # With the namespace present, the jailer is told to join it.
    (env.base / "netns" / f"ember-{jailer.jail_id(spec.vm_id)}").touch()
    driver = FirecrackerDriver(dataclasses.replace(env.config, jailer=netns))
    driver.start(spec)
    argv = env.fake.jailer_invocation(env.layout(spec.vm_id).jail_dir)["argv"]
    assert argv[argv.index("--netns") + 1] == str(env.base / "netns" / "ember-ins-01pre")
    driver.stop(spec.vm_id, timeout_s=5)


def test_stop_calls_are_what_stop_sends() -> None:
    assert [c.body for c in stop_calls()] == [{"action_type": "SendCtrlAltDel"}]


def test_taps_are_handed_to_the_vm_uid() -> None:
    """Real tap devices, in a namespace of the test's own."""
    ns = f"emberfc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "fct0", "mode", "tap"], check=True)

        def hand(tap: str) -> subprocess.CompletedProcess[str]:
            code = (
                "from ember.agent.vmm.jailer import hand_tap_to\n"
                f"hand_tap_to({tap!r}, 3000001, 3000002)"
            )
            return subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=False,
            )

        assert hand("fct0").returncode == 0
        owner = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "cat",
                "/sys/class/net/fct0/owner",
                "/sys/class/net/fct0/group",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert owner == ["3000001", "3000002"]
        missing = hand("fct9")
        assert missing.returncode != 0 and "tap device fct9 does not exist" in missing.stderr
        links = subprocess.run(
            ["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True
        ).stdout
        assert "fct0" in links and "fct9" not in links  # still there; nothing created
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
