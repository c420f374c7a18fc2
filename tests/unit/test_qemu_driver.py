"""The qemu driver's pure parts: the command line, the TSC rate, the shim's log handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.agent.vmm.base import Drive, NetDevice, VmmError, VmSpec
from ember.agent.vmm.qemu import (
    KERNEL_ARGS,
    QemuDriver,
    check_spec,
    find_cgroup_parent,
    host_tsc_khz,
    qemu_argv,
)
from ember.agent.vmm.qemu_shim import CappedLog, ConsoleWatch


def spec(tmp: Path, **change: object) -> VmSpec:
    fields: dict[str, object] = {
        "vm_id": "i_abc",
        "kernel": tmp / "vmlinux",
        "initrd": tmp / "initrd.gz",
        "kernel_args": KERNEL_ARGS,
        "vcpus": 2,
        "memory_mb": 512,
        "drives": (
            Drive("root", tmp / "root.ext4"),
            Drive("config", tmp / "config,1.img", read_only=True),
        ),
        "nets": (NetDevice("eth0", "em-abc", "02:00:00:00:00:01"),),
        "workdir": tmp / "vm",
    }
    fields.update(change)
    return VmSpec(**fields)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_command_line_follows_the_measured_flags(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path), binary="qemu", accel="tcg", tb_size_mb=64, tsc_khz=2596140)
    assert argv[0] == "qemu"
    assert values(argv, "-M") == ["microvm,acpi=on"]
    assert values(argv, "-accel") == ["tcg,tb-size=64"]
    assert values(argv, "-cpu") == ["max"]
    assert values(argv, "-m") == ["512"]
    assert values(argv, "-smp") == ["2"]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    assert "-daemonize" not in argv  # supervised as a child (NOTES.md)
    assert values(argv, "-name") == ["ember:i_abc"]  # how adopt() recognises it
    assert values(argv, "-kernel") == [str(tmp_path / "vmlinux")]
    assert values(argv, "-initrd") == [str(tmp_path / "initrd.gz")]
    assert values(argv, "-append") == [f"{KERNEL_ARGS} tsc_early_khz=2596140"]
    assert values(argv, "-qmp") == [f"unix:{tmp_path}/vm/qmp.sock,server=on,wait=off"]
    # Root first, config second: the guest's vda and vdb. Commas in paths are doubled.
    assert values(argv, "-drive") == [
        f"id=drive0,file={tmp_path}/root.ext4,format=raw,if=none,readonly=off,discard=unmap",
        f"id=drive1,file={tmp_path}/config,,1.img,format=raw,if=none,readonly=on",
    ]
    assert values(argv, "-device") == [
        "virtio-blk-device,drive=drive0,serial=root",
        "virtio-blk-device,drive=drive1,serial=config",
        "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
    ]
    assert values(argv, "-netdev") == ["tap,id=net0,ifname=em-abc,script=no,downscript=no"]


def test_kvm_uses_the_host_cpu_and_no_tsc_hint(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path), binary="qemu", accel="kvm", tb_size_mb=64, tsc_khz=2596140)
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-cpu") == ["host"]
    assert values(argv, "-append") == [KERNEL_ARGS]


def test_an_explicit_tsc_rate_in_the_kernel_args_is_kept(tmp_path: Path) -> None:
    s = spec(tmp_path, kernel_args="console=ttyS0 tsc_early_khz=1000")
    argv = qemu_argv(s, binary="qemu", accel="tcg", tb_size_mb=64, tsc_khz=2596140)
    assert values(argv, "-append") == ["console=ttyS0 tsc_early_khz=1000"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"vm_id": "bad id"}, "vm_id"),
        ({"vm_id": "a,b"}, "vm_id"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_mb": 8}, "memory_mb"),
        ({"drives": ()}, "drives"),
        ({"nets": (NetDevice("eth0", "t", "nope"),)}, "net:eth0:mac"),
        ({"nets": (NetDevice("eth0", "x" * 16, "02:00:00:00:00:01"),)}, "net:eth0:tap"),
        ({"workdir": Path("/" + "d" * 120)}, "workdir"),
    ],
)
def test_specs_qemu_cannot_run_are_refused(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    with pytest.raises(VmmError) as err:
        check_spec(spec(tmp_path, **change))
    assert problem in err.value.detail["problems"]


CPUINFO = """processor\t: {n}
model name\t: AMD EPYC
cpu MHz\t\t: {mhz}
flags\t\t: fpu tsc {flags}

"""


def cpuinfo(*mhz: str, flags: str = "constant_tsc nonstop_tsc tsc_known_freq") -> str:
    return "".join(CPUINFO.format(n=i, mhz=m, flags=flags) for i, m in enumerate(mhz))


def test_the_host_tsc_rate_is_read_only_when_it_can_be_trusted() -> None:
    assert host_tsc_khz(cpuinfo("2596.140", "2596.140")) == 2596140
    assert host_tsc_khz(cpuinfo("800.000", "3400.123")) is None  # frequency scaling
    assert host_tsc_khz(cpuinfo("2596.140", flags="")) is None  # no invariant TSC
    assert host_tsc_khz("") is None


def test_a_configured_cgroup_parent_must_be_cgroup2(tmp_path: Path) -> None:
    plan, why = find_cgroup_parent(tmp_path)
    assert plan is None
    assert "not a cgroup v2" in why


def test_status_of_an_unknown_vm_is_not_found() -> None:
    with pytest.raises(VmmError) as err:
        QemuDriver().status("i_nope")
    assert err.value.code == "vmm.not_found"


def test_console_watch_finds_lines_split_across_reads() -> None:
    watch = ConsoleWatch()
    for chunk in (b"hello\r\nember-init: exit st", b"atus 3", b"\r\n[ 1.0] reboot: Power down\r\n"):
        watch.feed(chunk)
    assert watch.exit_code == 3
    watch.feed(b"ember-init: boot failed: no config drive\r\n")
    assert watch.boot_failure == "no config drive"
    watch.feed(b"ember-init: exit status 143 (signal 15)")  # no newline: flushed on close
    watch.close()
    assert watch.exit_code == 143


def test_console_watch_keeps_bounded_memory_on_endless_lines() -> None:
    watch = ConsoleWatch()
    for _ in range(100):
        watch.feed(b"x" * 65536)
    assert len(watch.partial) <= 4096


def test_the_console_log_never_exceeds_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = CappedLog(path, 8192)
    for i in range(100):
        log.write(f"line {i:04d} ".encode() * 50 + b"\n")
    log.close()
    old = path.with_name("console.log.1")
    assert path.stat().st_size <= 8192
    assert old.stat().st_size == 8192
    # Nothing lost at the seam: the two files are the newest bytes in order.
    tail = (old.read_bytes() + path.read_bytes()).decode()
    assert tail.endswith("line 0099 \n")
    assert "line 0098 " * 50 in tail


def test_the_console_log_appends_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"a" * 5000)
    log = CappedLog(path, 8192)
    log.write(b"b" * 5000)
    log.close()
    assert path.with_name("console.log.1").read_bytes() == b"a" * 5000 + b"b" * 3192
    assert path.read_bytes() == b"b" * 1808
