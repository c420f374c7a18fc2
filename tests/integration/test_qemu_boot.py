"""Real microVMs under QEMU (TCG here): the guest build, the platform init, the qemu driver.

Each test boots the platform kernel + initramfs (built by a session fixture with
guest/build.py, cached) with a busybox root filesystem made by ``mkfs.ext4 -d``, and a
config drive from ember.agent.guest_config. Networking uses a tap per test on a random
ULA prefix and a random 10.x /31, with the host-network plan's shape (guest /128 with
gateway fe80::1; IPv4 /31); nothing is routed anywhere but the tap. Needs root (taps,
cgroups); CI runs as root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.agent.guest_config import (
    GuestConfig,
    Mount,
    Network,
    Secrets,
    device_for_drive,
    write_config_drive,
)
from ember.agent.vmm.base import Drive, NetDevice, VmHandle, VmSpec, VmState
from ember.agent.vmm.qemu import KERNEL_ARGS, QemuConfig, QemuDriver

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
PAGE = b"<h1>hello from an ember microvm</h1>\n"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest() -> dict[str, Path]:
    """The platform kernel and initramfs (``make guest``; instant when cached)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "guest/build.py"), "--out", str(ROOT / "guest/build")],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return {"kernel": ROOT / "guest/build/vmlinux", "initrd": ROOT / "guest/build/initrd.gz"}


@pytest.fixture(scope="session")
def rootfs_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox-static root filesystem tree with a web page and a nobody user."""
    root = tmp_path_factory.mktemp("rootfs")
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in applets:
        link = root / rel
        if "/" in rel and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (root / "www").mkdir()
    (root / "www/index.html").write_bytes(PAGE)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\nstaff:x:50:nobody\n")
    (root / "tmp").mkdir(mode=0o1777)
    return root


@pytest.fixture(scope="session")
def accel_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One KVM probe per session."""
    return tmp_path_factory.mktemp("qemu-state")


@dataclass(frozen=True)
class Tap:
    name: str
    mac: str
    host_ipv6: str
    guest_ipv6: str
    host_ipv4: str
    guest_ipv4: str

    def network(self) -> Network:
        return Network(
            ipv6=f"{self.guest_ipv6}/128",
            ipv6_gateway="fe80::1",
            ipv4=f"{self.guest_ipv4}/31",
            ipv4_gateway=self.host_ipv4,
            mtu=1500,
        )


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _free_ipv4_slot() -> tuple[str, str]:
    taken = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]")
        if r.get("dst") not in (None, "default")
    ]
    for _ in range(100):
        b, c, d = secrets.randbelow(56) + 200, secrets.randbelow(256), 2 * secrets.randbelow(128)
        net = ipaddress.ip_network(f"10.{b}.{c}.{d}/31")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return str(net[0]), str(net[1])
    raise AssertionError("no free 10.x /31 for the test tap")


@pytest.fixture
def tap() -> Iterator[Tap]:
    """A tap on the host with the host-network plan's addresses; guest side in the VM."""
    name = f"embt{secrets.token_hex(4)}"
    prefix = "fd" + secrets.token_hex(5)
    prefix = f"{prefix[:4]}:{prefix[4:8]}:{prefix[8:12]}"
    host6, guest6 = f"{prefix}::1", f"{prefix}::{secrets.token_hex(2)}:2"
    host4, guest4 = _free_ipv4_slot()
    mac = "02:" + ":".join(secrets.token_hex(1) for _ in range(5))
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        _ip("addr", "add", f"{host6}/128", "dev", name, "nodad")
        _ip("addr", "add", "fe80::1/64", "dev", name, "nodad")
        _ip("addr", "add", f"{host4}/31", "dev", name)
        _ip("link", "set", name, "up")
        _ip("-6", "route", "add", f"{guest6}/128", "dev", name, "src", host6)
        # The agent knows the guest's MAC: no neighbour discovery on the first packet.
        _ip("neigh", "replace", guest6, "lladdr", mac, "dev", name, "nud", "permanent")
        _ip("neigh", "replace", guest4, "lladdr", mac, "dev", name, "nud", "permanent")
        yield Tap(name, mac, host6, guest6, host4, guest4)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@dataclass
class Booter:
    guest: dict[str, Path]
    tree: Path
    tmp: Path
    state: Path
    drivers: list[tuple[QemuDriver, str]]

    def driver(self, **config: object) -> QemuDriver:
        return QemuDriver(QemuConfig(state_dir=self.state, **config))  # type: ignore[arg-type]

    def spec(
        self,
        vm_id: str,
        config: GuestConfig,
        tap: Tap | None = None,
        volumes: tuple[Path, ...] = (),
    ) -> VmSpec:
        vm_dir = self.tmp / vm_id
        vm_dir.mkdir()
        # Unique on the host: VM cgroups are named by VM id, and test runs may overlap.
        vm_id = f"{vm_id}-{secrets.token_hex(3)}"
        rootfs = vm_dir / "rootfs.ext4"
        subprocess.run(
            ["mkfs.ext4", "-q", "-d", str(self.tree), str(rootfs), "16M"],
            check=True,
            capture_output=True,
        )
        drive = write_config_drive(config, vm_dir / "config.img")
        return VmSpec(
            vm_id=vm_id,
            kernel=self.guest["kernel"],
            initrd=self.guest["initrd"],
            kernel_args=KERNEL_ARGS,
            vcpus=1,
            memory_mb=128,
            drives=(
                Drive("root", rootfs),
                Drive("config", drive, read_only=True),
                *(Drive(f"vol{i}", path) for i, path in enumerate(volumes)),
            ),
            nets=(NetDevice("eth0", tap.name, tap.mac),) if tap else (),
            console_log=vm_dir / "console.log",
            workdir=vm_dir / "run",
        )

    def start(self, driver: QemuDriver, spec: VmSpec) -> VmHandle:
        self.drivers.append((driver, spec.vm_id))
        return driver.start(spec)


@pytest.fixture
def booter(
    guest: dict[str, Path], rootfs_tree: Path, tmp_path: Path, accel_state: Path
) -> Iterator[Booter]:
    b = Booter(guest, rootfs_tree, tmp_path, accel_state, [])
    yield b
    for driver, vm_id in b.drivers:  # never leave a VM behind, whatever failed
        with contextlib.suppress(Exception):
            driver.stop(vm_id, timeout_s=0)


def wait_until(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_exited(driver: QemuDriver, vm_id: str, timeout_s: float = 60) -> VmHandle:
    def exited() -> VmHandle | None:
        handle = driver.status(vm_id)
        return handle if handle.state is VmState.EXITED else None

    return wait_until(exited, timeout_s, f"VM {vm_id} to exit")  # type: ignore[return-value]


def fetch(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return bytes(resp.read())
    except OSError:
        return None


def console(spec: VmSpec) -> str:
    assert spec.console_log is not None
    return spec.console_log.read_text(errors="replace")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- tests ---------------------------------------------------------------------------------


def test_httpd_serves_over_the_tap_is_adopted_and_stops_on_sigterm(
    booter: Booter, tap: Tap, record_property: Callable[[str, object], None]
) -> None:
    config = GuestConfig(
        argv=("httpd", "-f", "-v", "-p", "8080", "-h", "/www"),
        hostname="web-1",
        user="65534:65534",
        workdir="/www",
        network=tap.network(),
        kill_timeout_s=10,
    )
    spec = booter.spec("web-1", config, tap)
    driver = booter.driver()
    started = time.monotonic()
    handle = booter.start(driver, spec)
    assert handle.state is VmState.RUNNING and alive(handle.pid)

    url6 = f"http://[{tap.guest_ipv6}]:8080/"
    assert wait_until(lambda: fetch(url6), 60, "the page over IPv6") == PAGE
    serving_s = time.monotonic() - started
    record_property("boot_to_serving_s", round(serving_s, 3))
    print(f"boot to serving: {serving_s:.2f} s ({driver.accel_note})")
    assert fetch(f"http://{tap.guest_ipv4}:8080/") == PAGE
    assert driver.start(spec).pid == handle.pid  # start is idempotent while it runs

    launch = json.loads((spec.workdir / "launch.json").read_text())
    if launch["cgroup"]:  # the VMM's memory is capped: guest + overhead
        group = Path(launch["cgroup"])
        assert str(handle.pid) in (group / "cgroup.procs").read_text().split()
        limit_file = "memory.max" if (group / "memory.max").exists() else "memory.limit_in_bytes"
        assert int((group / limit_file).read_text()) == (128 + 256) << 20
    else:
        assert driver.cgroup_note.startswith("VMs run without a cgroup")

    # The agent restarts: a new driver object finds the same QEMU, and stops it.
    del driver
    again = booter.driver()
    booter.drivers.append((again, spec.vm_id))
    adopted = again.adopt(spec)
    assert adopted == VmHandle(spec.vm_id, handle.pid, VmState.RUNNING)
    stopped = again.stop(spec.vm_id, timeout_s=15)
    assert stopped == VmHandle(spec.vm_id, handle.pid, VmState.EXITED, 143)  # SIGTERM
    assert not alive(handle.pid)
    text = console(spec)
    assert "response:200" in text  # the workload's own output (httpd -v)
    assert "ember-init: exit status 143 (signal 15)" in text
    if launch["cgroup"]:
        assert not Path(launch["cgroup"]).exists()
    assert again.adopt(spec) is None  # nothing left to adopt
    assert again.status(spec.vm_id).exit_code == 143


def test_a_crashing_command_reports_its_exit_code_and_sees_its_config(
    booter: Booter, tmp_path: Path
) -> None:
    script = (
        'echo "who=$(id -u):$(id -g):$(id -G) pwd=$(pwd) host=$(hostname) '
        'greeting=$GREETING home=$HOME path=$PATH"; '
        'echo "args=$#:$1:$2:"; ls -ln /run/secrets; cat /run/secrets/env; '
        "cat /data/hello.txt; grep -E ' /(data|scratch) ' /proc/mounts; exit 3"
    )
    content = tmp_path / "volume"
    content.mkdir()
    (content / "hello.txt").write_text("from the volume\n")
    volume = tmp_path / "volume.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-d", str(content), str(volume), "4M"], check=True, capture_output=True
    )
    config = GuestConfig(
        argv=("sh", "-c", script, "sh", "a b", ""),
        env=GuestConfig.env_from({"GREETING": "hello world"}),
        hostname="crash-1",
        user="nobody",
        workdir="/work/dir",
        secrets=Secrets("/run/secrets/env", b"TOKEN=s3cret\n"),
        mounts=(
            Mount(device_for_drive(2), "/data", "ext4", "rw,noatime"),
            Mount("tmpfs", "/scratch", "tmpfs", "size=1m,mode=1777"),
        ),
    )
    spec = booter.spec("crash-1", config, volumes=(volume,))
    driver = booter.driver()
    booter.start(driver, spec)
    handle = wait_exited(driver, spec.vm_id)
    text = console(spec)
    assert handle.exit_code == 3, text
    assert "who=65534:65534:65534 50 pwd=/work/dir host=crash-1 greeting=hello world" in text
    assert "home=/nonexistent path=/usr/local/sbin:/usr/local/bin:/usr/sbin:" in text
    assert "args=2:a b::" in text
    assert "-r--------    1 65534    65534" in text  # 0400, owned by the workload
    assert "TOKEN=s3cret" in text
    assert "from the volume" in text
    assert "/dev/vdc /data ext4 rw,noatime" in text
    assert "tmpfs /scratch tmpfs rw,relatime,size=1024k" in text
    assert "ember-init: exit status 3" in text


def test_a_command_ignoring_sigterm_is_killed_after_the_kill_timeout(booter: Booter) -> None:
    config = GuestConfig(
        argv=("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"),
        kill_timeout_s=1,
    )
    spec = booter.spec("stubborn", config)
    driver = booter.driver()
    booter.start(driver, spec)
    wait_until(lambda: "ready" in console(spec), 60, "the command to start")
    asked = time.monotonic()
    handle = driver.stop(spec.vm_id, timeout_s=30)
    took = time.monotonic() - asked
    assert handle.exit_code == 137  # SIGKILL
    assert 1.0 <= took < 30, took
    assert "ember-init: kill timeout: sending SIGKILL" in console(spec)


def test_a_stop_while_the_kernel_boots_still_reaches_the_command(booter: Booter) -> None:
    spec = booter.spec("early", GuestConfig(argv=("sleep", "1000")))
    driver = booter.driver()
    booter.start(driver, spec)
    # The first power-button press comes before the init listens; a later one lands.
    handle = driver.stop(spec.vm_id, timeout_s=60)
    assert handle.exit_code == 143, console(spec)


def test_a_boot_failure_is_reported_without_an_exit_status(booter: Booter) -> None:
    config = GuestConfig(argv=("true",), root=Mount("/dev/vdz", "/", "ext4", "rw"))
    spec = booter.spec("broken", config)
    driver = booter.driver()
    booter.start(driver, spec)
    handle = wait_exited(driver, spec.vm_id)
    assert handle.exit_code is None
    exit_record = json.loads((spec.workdir / "exit.json").read_text())
    assert exit_record["boot_failure"].startswith("mount /dev/vdz on / (ext4, rw)")
    assert "ember-init: boot failed: mount /dev/vdz" in console(spec)


def test_a_noisy_guest_cannot_grow_its_console_log_past_the_cap(booter: Booter) -> None:
    config = GuestConfig(argv=("sh", "-c", "yes 0123456789abcdef | head -c 160000; echo done"))
    spec = booter.spec("noisy", config)
    driver = booter.driver(console_cap_bytes=32 << 10)
    booter.start(driver, spec)
    handle = wait_exited(driver, spec.vm_id, timeout_s=120)
    assert handle.exit_code == 0
    assert spec.console_log is not None
    rotated = spec.console_log.with_name("console.log.1")
    assert spec.console_log.stat().st_size <= 32 << 10
    assert rotated.stat().st_size == 32 << 10
    assert "ember-init: exit status 0" in console(spec)


def test_the_kvm_verdict_is_probed_once_and_cached(
    booter: Booter, guest: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = booter.driver().accel(guest["kernel"], guest["initrd"])
    cached = json.loads((booter.state / "accel.json").read_text())
    assert cached["accel"] == first in ("kvm", "tcg")
    assert cached["reason"]

    def no_probe(*_: object) -> tuple[str, str]:
        raise AssertionError("probed again")

    monkeypatch.setattr(QemuDriver, "_probe", no_probe)
    assert booter.driver().accel(guest["kernel"], guest["initrd"]) == first
