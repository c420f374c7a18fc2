"""Every request the firecracker driver builds conforms to Firecracker's API contract.

The contract is ``firecracker.yaml`` from ../shared/reference/firecracker/ (or
``EMBER_FIRECRACKER_SPEC``), never a copy in this repository. For each request: the path
matches a path template of the file and the method is an operation of it; the body
validates against the operation's body schema with every ``$ref`` resolved, required
fields present, types, enums and bounds respected, and no field the schema does not
declare (Firecracker denies unknown fields); a path id equals the body's id. The negative
tests prove the check fails on the mistakes it is meant to catch.

The jailer half (its flags, the cgroup values, the uid allocator) is pure too and is
checked here against the real jailer's documented flags.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.agent.vmm import jailer
from ember.agent.vmm.base import Drive, NetDevice, VmmError, VmSpec
from ember.agent.vmm.firecracker import (
    ApiCall,
    VmSpecInvalid,
    boot_calls,
    check_spec,
    stop_calls,
)
from ember.agent.vmm.jailer import IdRange, JailerConfig, JailLayout, JailPaths
from tests.support.fake_firecracker import (
    SPEC_ENV,
    ApiContract,
    JailerUsage,
    SpecMissing,
    load_contract,
    parse_jailer_args,
    spec_path,
)


@pytest.fixture(scope="module")
def contract() -> ApiContract:
    try:
        return load_contract()
    except SpecMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def make_spec(**changes: object) -> VmSpec:
    spec = VmSpec(
        vm_id="ins_01jd0000000000000000000000",
        kernel=Path("/var/lib/ember/kernel/vmlinux"),
        initrd=Path("/var/lib/ember/kernel/initrd.img"),
        kernel_args="console=ttyS0 reboot=k panic=1 quiet",
        vcpus=2,
        memory_mb=512,
        drives=(
            Drive("root", Path("/var/lib/ember/vms/a/rootfs.ext4")),
            Drive("config", Path("/var/lib/ember/vms/a/config.img"), read_only=True),
        ),
        nets=(NetDevice("eth0", "emb0a1b2c3", "02:fc:00:00:00:01"),),
        console_log=Path("/var/log/ember/a.console"),
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


SPECS = {
    "typical": make_spec(),
    "minimal": make_spec(initrd=None, drives=(), nets=(), vcpus=1, memory_mb=128),
    "initrd-only": make_spec(drives=(), nets=()),
    "read-only-root": make_spec(drives=(Drive("root", Path("/x/root.ext4"), read_only=True),)),
    "many-devices": make_spec(
        vcpus=32,
        memory_mb=65536,
        drives=(
            Drive("root", Path("/x/root.ext4")),
            Drive("config", Path("/x/config.img"), read_only=True),
            Drive("vol_data", Path("/x/vol1.img")),
            Drive("vol-logs", Path("/x/vol2.img")),
        ),
        nets=(
            NetDevice("eth0", "emb0", "02:00:00:00:00:01"),
            NetDevice("eth1", "emb1", "AA:BB:CC:DD:EE:FF"),
        ),
    ),
    "empty-args": make_spec(kernel_args=""),
}
OPTIONS = {
    "default": {},
    "no-logger": {"log_level": None},
    "metrics": {"metrics": True, "log_level": "Debug"},
    # PyYAML alone would read the enum's unquoted Off as False (YAML 1.1).
    "logger-off": {"log_level": "Off"},
}


def calls_for(spec: VmSpec, **options: object) -> list[ApiCall]:
    return boot_calls(spec, JailPaths.of(spec), **options)  # type: ignore[arg-type]


def assert_conforms(contract: ApiContract, calls: list[ApiCall]) -> None:
    for call in calls:
        body = dict(call.body) if call.body is not None else None
        assert contract.check(call.method, call.path, body) == [], call


# --- the contract holds -------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_request_conforms(contract: ApiContract, spec: VmSpec, options: dict) -> None:
    assert_conforms(contract, calls_for(spec, **options) + stop_calls())


vm_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
device_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b)
)
drives = st.lists(st.tuples(device_ids, st.booleans()), max_size=6, unique_by=lambda d: d[0]).map(
    lambda ds: tuple(Drive(i, Path(f"/img/{n}.img"), ro) for n, (i, ro) in enumerate(ds))
)
nets = st.lists(
    st.tuples(device_ids, st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True), macs),
    max_size=4,
    unique_by=lambda n: n[0],
).map(lambda ns: tuple(NetDevice(i, tap, mac) for i, tap, mac in ns))
specs = st.builds(
    VmSpec,
    vm_id=vm_ids,
    kernel=st.just(Path("/k/vmlinux")),
    initrd=st.one_of(st.none(), st.just(Path("/k/initrd"))),
    kernel_args=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    vcpus=st.integers(1, 32),
    memory_mb=st.integers(1, 1 << 20),
    drives=drives,
    nets=nets,
)


@settings(max_examples=150, deadline=None)
@given(
    spec=specs,
    log_level=st.sampled_from([None, "Error", "Warning", "Info", "Debug", "Trace", "Off"]),
    metrics=st.booleans(),
)
def test_any_valid_spec_conforms(
    contract: ApiContract, spec: VmSpec, log_level: str | None, metrics: bool
) -> None:
    calls = calls_for(spec, log_level=log_level, metrics=metrics)
    assert_conforms(contract, calls)
    # Exactly one root device (the first drive), and InstanceStart is the last call.
    roots = [
        c.body["drive_id"]
        for c in calls
        if c.path.startswith("/drives/") and c.body and c.body["is_root_device"]
    ]
    assert roots == [d.drive_id for d in spec.drives[:1]]
    assert calls[-1] == ApiCall("PUT", "/actions", {"action_type": "InstanceStart"})


def test_order_and_contents() -> None:
    spec = SPECS["typical"]
    calls = calls_for(spec, metrics=True)
    assert [(c.method, c.path) for c in calls] == [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/root"),
        ("PUT", "/drives/config"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/machine-config"),
        ("PUT", "/actions"),
    ]
    bodies = {c.path: c.body for c in calls}
    assert bodies["/boot-source"] == {
        "kernel_image_path": "/vmlinux",
        "initrd_path": "/initrd",
        "boot_args": spec.kernel_args,
    }
    assert bodies["/drives/root"] == {
        "drive_id": "root",
        "path_on_host": "/drives/root",
        "is_root_device": True,
        "is_read_only": False,
    }
    assert bodies["/drives/config"] == {
        "drive_id": "config",
        "path_on_host": "/drives/config",
        "is_root_device": False,
        "is_read_only": True,
    }
    assert bodies["/network-interfaces/eth0"] == {
        "iface_id": "eth0",
        "host_dev_name": "emb0a1b2c3",
        "guest_mac": "02:fc:00:00:00:01",
    }
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    assert stop_calls() == [ApiCall("PUT", "/actions", {"action_type": "SendCtrlAltDel"})]


def test_bodies_name_paths_inside_the_jail_only() -> None:
    """Firecracker runs chrooted: no host path of the spec may reach the API."""
    spec = SPECS["many-devices"]
    host_paths = {str(spec.kernel), str(spec.initrd), *(str(d.path) for d in spec.drives)}
    for call in calls_for(spec, metrics=True):
        for key, value in (call.body or {}).items():
            if key.endswith("_path") or key == "path_on_host":
                assert value.startswith("/") and value not in host_paths, (call, key)
                # and the host side of it is under the jail's root
                layout = JailLayout.of(JailerConfig(), spec.vm_id)
                assert layout.host(value).is_relative_to(layout.root)


# --- the check can fail -------------------------------------------------------------------

BAD_CALLS = {
    "vcpu-count-as-string": ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 256}),
    "vcpu-count-above-32": ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 256}),
    "memory-missing": ("PUT", "/machine-config", {"vcpu_count": 1}),
    "unknown-action": ("PUT", "/actions", {"action_type": "Reboot"}),
    "unknown-field": ("PUT", "/boot-source", {"kernel_image_path": "/k", "kernel_args": "x"}),
    "nested-unknown-field": (
        "PUT",
        "/drives/root",
        {
            "drive_id": "root",
            "is_root_device": True,
            "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "burst": 2}},
        },
    ),
    "drive-without-root-flag": ("PUT", "/drives/root", {"drive_id": "root", "path_on_host": "/r"}),
    "path-id-differs": (
        "PUT",
        "/drives/root",
        {"drive_id": "data", "is_root_device": False, "path_on_host": "/d"},
    ),
    "bool-as-string": (
        "PUT",
        "/drives/root",
        {"drive_id": "root", "is_root_device": "true", "path_on_host": "/r"},
    ),
    "no-such-path": ("PUT", "/drive/root", {"drive_id": "root", "is_root_device": True}),
    "wrong-method": ("POST", "/actions", {"action_type": "InstanceStart"}),
    "missing-body": ("PUT", "/actions", None),
    "body-on-get": ("GET", "/", {"x": 1}),
    "net-without-tap": ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0"}),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_contract_rejects(contract: ApiContract, call: tuple[str, str, object]) -> None:
    method, path, body = call
    assert contract.check(method, path, body) != []


def test_a_broken_builder_would_be_caught(contract: ApiContract) -> None:
    calls = calls_for(SPECS["typical"])
    machine = next(c for c in calls if c.path == "/machine-config")
    broken = {**dict(machine.body or {}), "vcpu_count": "2"}
    problems = contract.check("PUT", "/machine-config", broken)
    assert problems == ["vcpu_count: '2' is not of type 'integer'"]


def test_missing_spec_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(SpecMissing, match=SPEC_ENV) as caught:
        load_contract(tmp_path / "nowhere" / "firecracker.yaml")
    assert "never copied" in str(caught.value)


def test_spec_location_can_be_overridden(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, contract: ApiContract
) -> None:
    assert contract.source is not None
    elsewhere = tmp_path / "fc.yaml"
    elsewhere.write_text(contract.source.read_text())
    monkeypatch.setenv(SPEC_ENV, str(elsewhere))
    assert spec_path() == elsewhere
    assert load_contract().version == contract.version


# --- what the builder refuses ---------------------------------------------------------------

INVALID = {
    "no-vcpus": {"vcpus": 0},
    "too-many-vcpus": {"vcpus": 33},
    "no-memory": {"memory_mb": 0},
    "bad-mac": {"nets": (NetDevice("eth0", "tap0", "02-00-00-00-00-01"),)},
    "long-tap": {"nets": (NetDevice("eth0", "a-tap-name-too-long", "02:00:00:00:00:01"),)},
    "duplicate-drives": {"drives": (Drive("root", Path("/a")), Drive("root", Path("/b")))},
    "drive-id-with-slash": {"drives": (Drive("../etc", Path("/a")),)},
}


@pytest.mark.parametrize("changes", INVALID.values(), ids=INVALID.keys())
def test_builder_refuses_what_firecracker_would(changes: dict) -> None:
    with pytest.raises(VmSpecInvalid) as caught:
        check_spec(make_spec(**changes))
    assert caught.value.detail["problems"]


@pytest.mark.parametrize("vm_id", ["", "a/b", "x" * 65, "ins.1"])
def test_vm_ids_the_jailer_cannot_take(vm_id: str) -> None:
    with pytest.raises(VmmError):
        calls_for(make_spec(vm_id=vm_id))


def test_unknown_log_level_is_refused() -> None:
    with pytest.raises(VmSpecInvalid):
        calls_for(make_spec(), log_level="Verbose")


# --- the jailer -----------------------------------------------------------------------------


def test_jailer_argv() -> None:
    config = JailerConfig(
        jailer_bin=Path("/opt/fc/jailer"),
        firecracker_bin=Path("/opt/fc/firecracker"),
        chroot_base=Path("/srv/jailer"),
        netns="ember-{jail_id}",
        resource_limits=("no-file=4096",),
        extra_cgroups=("pids.max=128",),
    )
    spec = make_spec(vcpus=2, memory_mb=512)
    assert jailer.jailer_argv(config, spec, uid=10_000_003, gid=10_000_003) == [
        "/opt/fc/jailer",
        "--id", "ins-01jd0000000000000000000000",
        "--exec-file", "/opt/fc/firecracker",
        "--uid", "10000003",
        "--gid", "10000003",
        "--chroot-base-dir", "/srv/jailer",
        "--cgroup-version", "2",
        "--cgroup", f"memory.max={(512 + 128) * 1024 * 1024}",
        "--cgroup", "memory.swap.max=0",
        "--cgroup", "cpu.max=200000 100000",
        "--cgroup", "pids.max=128",
        "--netns", "/var/run/netns/ember-ins-01jd0000000000000000000000",
        "--resource-limit", "no-file=4096",
        "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        JailerConfig(),
        JailerConfig(parent_cgroup="ember/vms", swap_max_zero=False, netns="vm-{vm_id}"),
        JailerConfig(resource_limits=("fsize=1073741824", "no-file=2048")),
    ],
)
def test_jailer_flags_are_the_real_jailers(config: JailerConfig, tmp_path: Path) -> None:
    """Parsed by the fake jailer's reading of src/jailer/src/main.rs + docs/jailer.md."""
    fc = tmp_path / "firecracker"
    fc.write_text("")
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    config = dataclasses.replace(config, firecracker_bin=fc, netns_dir=netns_dir)
    spec = make_spec()
    if config.netns:
        (
            netns_dir / config.netns.format(vm_id=spec.vm_id, jail_id=jailer.jail_id(spec.vm_id))
        ).touch()
    argv = jailer.jailer_argv(config, spec, uid=7, gid=7)
    options, extra = parse_jailer_args(argv[1:])
    assert options["id"] == "ins-01jd0000000000000000000000"
    assert options["cgroup-version"] == "2"
    assert extra == ["--api-sock", "/run/firecracker.socket"]
    assert "daemonize" not in options and "new-pid-ns" not in options


def test_fake_jailer_refuses_bad_flags(tmp_path: Path) -> None:
    fc = tmp_path / "firecracker"
    fc.write_text("")
    base = ["--id", "vm-1", "--exec-file", str(fc), "--uid", "1", "--gid", "1"]
    parse_jailer_args(base)
    for bad in (
        ["--id", "vm_1", "--exec-file", str(fc), "--uid", "1", "--gid", "1"],
        [*base, "--cgroup", "memorymax=1"],
        [*base, "--cgroup-version", "3"],
        [*base, "--parent-cgroup", "/abs"],
        [*base, "--api-sock", "/x"],
        base[:-2],
    ):
        with pytest.raises(JailerUsage):
            parse_jailer_args(bad)


def test_cgroup_values_follow_the_spec() -> None:
    config = JailerConfig(memory_overhead_mib=64, cpu_period_us=50_000)
    values = jailer.cgroup_values(config, make_spec(vcpus=3, memory_mb=1024))
    assert values == (
        f"memory.max={(1024 + 64) << 20}",
        "memory.swap.max=0",
        "cpu.max=150000 50000",
    )


def test_layout_and_jail_id() -> None:
    config = JailerConfig(chroot_base=Path("/srv/jailer"))
    layout = JailLayout.of(config, "ins_01abc")
    assert layout.jail_id == "ins-01abc"
    assert layout.root == Path("/srv/jailer/firecracker/ins-01abc/root")
    assert layout.socket == layout.root / "run/firecracker.socket"
    assert layout.state_file.parent == layout.jail_dir != layout.root
    assert jailer.cgroup_dir(config, "ins_01abc") == Path("/sys/fs/cgroup/firecracker/ins-01abc")


@settings(max_examples=200, deadline=None)
@given(
    first=st.integers(1, 10_000),
    count=st.integers(1, 50),
    taken=st.sets(st.integers(0, 10_100)),
)
def test_allocator_gives_the_lowest_free_id(first: int, count: int, taken: set[int]) -> None:
    ids = IdRange(first, count)
    free = [i for i in range(first, first + count) if i not in taken]
    if not free:
        with pytest.raises(VmmError, match="in use"):
            jailer.allocate_id(ids, taken)
        return
    got = jailer.allocate_id(ids, taken)
    assert got == free[0]
    assert got in ids and got not in taken


def test_allocated_ids_are_unique_until_released() -> None:
    ids = IdRange(500, 3)
    taken: set[int] = set()
    for _ in range(3):
        taken.add(jailer.allocate_id(ids, taken))
    assert taken == {500, 501, 502}
    with pytest.raises(VmmError):
        jailer.allocate_id(ids, taken)
    taken.discard(501)
    assert jailer.allocate_id(ids, taken) == 501


@pytest.mark.parametrize("first,count", [(0, 10), (5, 0), (2**32 - 5, 10)])
def test_id_range_refuses_root_and_overflow(first: int, count: int) -> None:
    with pytest.raises(ValueError):
        IdRange(first, count)
