"""The config drive format (docs/specs/guest-config.md): rendering, parsing, validation."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.agent.guest_config import (
    BLOCK_SIZE,
    MAGIC,
    CheckLine,
    ConsoleCursor,
    GuestCheck,
    GuestConfig,
    GuestConfigInvalid,
    Mount,
    Network,
    Secrets,
    device_for_drive,
    parse,
    parse_check_line,
    parse_console_status,
    read_console,
    render,
    write_config_drive,
)

FULL = GuestConfig(
    argv=("httpd", "-f", "-p", "8080", ""),
    env=(("PATH", "/usr/bin:/bin"), ("GREETING", "hello world"), ("EMPTY", "")),
    hostname="web-1",
    user="65534:65534",
    workdir="/www",
    kill_signal="SIGINT",
    kill_timeout_s=2.5,
    network=Network(
        ipv6="fd6c:3192:9e31::b147/128",
        ipv6_gateway="fe80::1",
        ipv4="10.200.44.15/31",
        ipv4_gateway="10.200.44.14",
        mtu=1420,
        nameservers=("fd6c:3192:9e31::1",),
    ),
    mounts=(Mount("/dev/vdc", "/data", "ext4", "rw,noatime"),),
    secrets=Secrets("/run/secrets/env", b"A=1\nB=%2\x00\xff\n"),
    checks=(
        GuestCheck(("pg_isready", "-h", "::1"), interval_s=10, timeout_s=2),
        GuestCheck(("sh", "-c", "test -f /tmp/ok", ""), interval_s=1.5, timeout_s=0.25),
    ),
    check_token="3f1c0a9e6b2d4c8f3f1c0a9e6b2d4c8f",
)
TOKEN = "3f1c0a9e6b2d4c8f3f1c0a9e6b2d4c8f"


def lines(config: GuestConfig) -> list[str]:
    return render(config).rstrip(b"\0").decode("ascii").splitlines()


def test_the_document_is_the_spec_s_example_shape() -> None:
    assert lines(FULL) == [
        "ember-guest-config 1",
        "hostname web-1",
        "root /dev/vda ext4 rw",
        "mount /dev/vdc /data ext4 rw,noatime",
        "mtu 1420",
        "ipv6 fd6c:3192:9e31::b147/128",
        "ipv6-gateway fe80::1",
        "ipv4 10.200.44.15/31",
        "ipv4-gateway 10.200.44.14",
        "nameserver fd6c:3192:9e31::1",
        "arg httpd",
        "arg -f",
        "arg -p",
        "arg 8080",
        "arg ",
        "env PATH=/usr/bin:/bin",
        "env GREETING=hello%20world",
        "env EMPTY=",
        "user 65534:65534",
        "workdir /www",
        "kill-signal 2",
        "kill-timeout-ms 2500",
        "secrets /run/secrets/env A=1%0AB=%252%00%FF%0A",
        "check-token 3f1c0a9e6b2d4c8f3f1c0a9e6b2d4c8f",
        "check 10000 2000 pg_isready%00-h%00::1%00",
        "check 1500 250 sh%00-c%00test%20-f%20/tmp/ok%00%00",
        "end",
    ]


def test_a_drive_is_zero_padded_to_whole_blocks_and_starts_with_the_magic() -> None:
    data = render(GuestConfig(argv=("true",)))
    assert data.startswith(MAGIC)
    assert len(data) % BLOCK_SIZE == 0
    assert data.rstrip(b"\0").endswith(b"\nend\n")


def test_minimal_config_gets_the_documented_defaults() -> None:
    assert lines(GuestConfig(argv=("true",)))[1:] == [
        "root /dev/vda ext4 rw",
        "arg true",
        "user ",
        "workdir /",
        "kill-signal 15",
        "kill-timeout-ms 10000",
        "end",
    ]


def test_parse_gives_back_what_render_wrote() -> None:
    assert parse(render(FULL)) == FULL
    assert parse(render(GuestConfig(argv=("true",)))) == GuestConfig(argv=("true",))


texts = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


@given(
    argv=st.lists(texts, min_size=1, max_size=5).filter(lambda a: a[0] != ""),
    env=st.dictionaries(texts.filter(lambda k: k != "" and "=" not in k), texts, max_size=5),
    secret=st.binary(max_size=200),
    user=texts,
    check=st.lists(texts, min_size=1, max_size=4).filter(lambda a: a[0] != ""),
)
def test_any_text_and_bytes_survive_the_round_trip(
    argv: list[str], env: dict[str, str], secret: bytes, user: str, check: list[str]
) -> None:
    config = GuestConfig(
        argv=tuple(argv),
        env=tuple(env.items()),
        user=user,
        secrets=Secrets("/run/s/f", secret),
        checks=(GuestCheck(tuple(check), 1, 1),),
        check_token="a" * 16,
    )
    data = render(config)
    body = data.rstrip(b"\0")
    assert b"\0" not in body  # a zero byte ends the document
    assert all(0x20 <= b < 0x7F or b == 0x0A for b in body)  # printable ASCII lines
    assert parse(data) == config


def test_env_from_accepts_mappings_and_oci_lists_later_keys_win() -> None:
    assert GuestConfig.env_from({"A": "1"}) == (("A", "1"),)
    assert GuestConfig.env_from(["A=1", "B=x=y", "A=2", "C"]) == (
        ("B", "x=y"),
        ("A", "2"),
        ("C", ""),
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"argv": ()}, "argv"),
        ({"argv": ("",)}, "argv"),
        ({"argv": ("a\0b",)}, "argv"),
        ({"hostname": "not a label"}, "hostname"),
        ({"hostname": "-x"}, "hostname"),
        ({"hostname": "a" * 64}, "hostname"),
        ({"env": (("", "x"),)}, "env"),
        ({"env": (("A=B", "x"),)}, "env"),
        ({"workdir": "relative"}, "workdir"),
        ({"workdir": "/a/../b"}, "workdir"),
        ({"kill_signal": "SIGNOPE"}, "kill_signal"),
        ({"kill_timeout_s": -1}, "kill_timeout_s"),
        ({"secrets": Secrets("/env", b"")}, "secrets.path"),
        ({"secrets": Secrets("run/x", b"")}, "secrets.path"),
        ({"mounts": (Mount("/dev/vdc", "/"),)}, "mounts"),
        ({"mounts": (Mount("/dev/vdc", "/d"), Mount("/dev/vdd", "/d"))}, "mounts"),
        ({"mounts": (Mount("/dev/vdc", "/d", "ext4", "rw bad"),)}, "mounts[0]"),
        ({"network": Network()}, "network"),
        ({"network": Network(ipv6="fd00::2")}, "network.ipv6"),
        ({"network": Network(ipv6="10.0.0.1/24")}, "network.ipv6"),
        ({"network": Network(ipv4="10.0.0.1/24", ipv4_gateway="fe80::1")}, "network.ipv4_gateway"),
        ({"network": Network(ipv6="fd00::2/64", mtu=1000)}, "network.mtu"),
        ({"network": Network(ipv4="10.0.0.2/24", mtu=70000)}, "network.mtu"),
        ({"network": Network(ipv4="10.0.0.2/24", nameservers=("dns",))}, "network.nameservers"),
        ({"checks": (GuestCheck(("true",)),)}, "check_token"),
        ({"check_token": "short"}, "check_token"),
        ({"check_token": "a" * 15 + " "}, "check_token"),
        ({"check_token": "a" * 129}, "check_token"),
        ({"check_token": "a" * 16 + "\n"}, "check_token"),
        ({"checks": (GuestCheck(()),), "check_token": TOKEN}, "checks[0]"),
        ({"checks": (GuestCheck(("",)),), "check_token": TOKEN}, "checks[0]"),
        ({"checks": (GuestCheck(("a\0b",)),), "check_token": TOKEN}, "checks[0]"),
        ({"checks": (GuestCheck(("x",), 1, 2),), "check_token": TOKEN}, "checks[0]"),
        ({"checks": (GuestCheck(("x",), 0.05, 0.05),), "check_token": TOKEN}, "checks[0]"),
        ({"checks": (GuestCheck(("x",), 1, 0),), "check_token": TOKEN}, "checks[0]"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    config = GuestConfig(**{"argv": ("true",), **change})  # type: ignore[arg-type]
    with pytest.raises(GuestConfigInvalid) as err:
        render(config)
    assert err.value.code == "guest_config.invalid"
    assert err.value.detail.get("field") == field


def test_ipv4_only_networks_may_use_small_mtus() -> None:
    render(GuestConfig(argv=("true",), network=Network(ipv4="10.0.0.2/30", mtu=576)))


def test_signals_by_name_short_name_or_number() -> None:
    for name in ("SIGKILL", "KILL", "kill", "9"):
        assert "kill-signal 9" in lines(GuestConfig(argv=("x",), kill_signal=name))


def test_a_config_drive_over_the_limit_is_refused() -> None:
    big = Secrets("/run/s/f", b"\n" * (6 << 20))  # 3 bytes each once encoded
    with pytest.raises(GuestConfigInvalid, match="at most"):
        render(GuestConfig(argv=("x",), secrets=big))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"something else\n", "magic"),
        (MAGIC + b"arg x\n", "end"),
        (MAGIC + b"arg x\narg y z\nend\n", "takes 1"),
        (MAGIC + b"arg %4\nend\n", "escape"),
        (MAGIC + b"arg %+1\nend\n", "escape"),
        (MAGIC + b"arg x\nmtu big\nend\n", "line 3"),
        (MAGIC + b"end\n", "command"),
        (MAGIC + b"arg x\ncheck 1000 500 true\nend\n", "NUL"),
        (MAGIC + b"arg x\ncheck 1000 true%00\nend\n", "takes 3"),
        (MAGIC + b"arg x\ncheck soon 500 true%00\nend\n", "line 3"),
    ],
)
def test_parse_refuses_what_the_init_refuses(data: bytes, message: str) -> None:
    with pytest.raises(GuestConfigInvalid, match=message):
        parse(data)


def test_parse_skips_unknown_keys_like_the_init() -> None:
    assert parse(MAGIC + b"arg x\nfuture-key 1 2 3\nend\n") == GuestConfig(argv=("x",))


def test_drive_devices_follow_the_kernel_s_naming() -> None:
    assert [device_for_drive(i) for i in (0, 1, 2, 25, 26, 27, 701, 702)] == [
        "/dev/vda",
        "/dev/vdb",
        "/dev/vdc",
        "/dev/vdz",
        "/dev/vdaa",
        "/dev/vdab",
        "/dev/vdzz",
        "/dev/vdaaa",
    ]


def test_console_status_is_the_last_init_line() -> None:
    console = (
        "[    0.3] PCI: Fatal: No config space access function found\r\n"
        "app says ember-init: exit status 0\r\n"
        "ember-init: stopping: sending signal 15, SIGKILL in 5000 ms\r\n"
        "ember-init: exit status 143 (signal 15)\r\n"
        "[    2.1] reboot: Power down\r\n"
    )
    assert parse_console_status(console) == (143, None)
    assert parse_console_status("ember-init: boot failed: no eth0\r\n") == (None, "no eth0")
    assert parse_console_status("still running\n") == (None, None)


def test_write_config_drive_is_private_and_atomic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "vm" / "config.img"
    assert write_config_drive(FULL, path) == path
    assert path.read_bytes() == render(FULL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the secrets
    assert [p.name for p in path.parent.iterdir()] == ["config.img"]

    with pytest.raises(GuestConfigInvalid):
        write_config_drive(GuestConfig(argv=()), path)
    assert path.read_bytes() == render(FULL)  # a refused config changes nothing


# -- exec check results on the console ---------------------------------------------------------


def test_check_lines_carry_the_boot_s_token() -> None:
    assert parse_check_line(f"ember-init: check {TOKEN} 0 ok\r", TOKEN) == CheckLine(0, True)
    assert parse_check_line(f"ember-init: check {TOKEN} 12 fail status 1\r", TOKEN) == CheckLine(
        12, False, "status 1"
    )
    assert parse_check_line(
        f"partial output ember-init: check {TOKEN} 1 fail timeout", TOKEN
    ) == CheckLine(1, False, "timeout")
    forged = [
        f"ember-init: check {'0' * 32} 0 ok",  # the workload guessing
        f"ember-init: check {TOKEN[:-1]} 0 ok",
        f"ember-init: check {TOKEN}x 0 ok",
        f"ember-init: check 0 ok {TOKEN}",
        f"ember-init: check {TOKEN} zero ok",
        "ember-init: exit status 0",
    ]
    assert [parse_check_line(line, TOKEN) for line in forged] == [None] * len(forged)
    assert parse_check_line("ember-init: check  0 ok", "") is None  # no token, no results
    # The workload's unfinished look-alike glued before the init's line hides nothing.
    glued = f"ember-init: check {'0' * 32} 0 fail xember-init: check {TOKEN} 1 fail status 3"
    assert parse_check_line(glued, TOKEN) == CheckLine(1, False, "status 3")
    assert parse_check_line(f"ember-init: check é{TOKEN} 0 ok", TOKEN) is None


def test_read_console_returns_whole_lines_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "console.log"
    assert read_console(log, ConsoleCursor()) == ([], ConsoleCursor())  # not there yet
    log.write_bytes(b"one\r\ntw")
    lines, cur = read_console(log, ConsoleCursor())
    assert lines == ["one"]
    assert read_console(log, cur) == ([], cur)  # nothing new
    with log.open("ab") as f:
        f.write(b"o\nthree\n")
    lines, cur = read_console(log, cur)
    assert lines == ["two", "three"]
    assert cur.offset == log.stat().st_size
    assert ConsoleCursor.at_end(log) == ConsoleCursor(log.stat().st_ino, log.stat().st_size)


def test_read_console_follows_a_rotation_and_starts_over_after_truncation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "console.log"
    log.write_bytes(b"a\nb")
    _, cur = read_console(log, ConsoleCursor())
    with log.open("ab") as f:
        f.write(b"c\nlost? no\n")
    log.rename(tmp_path / "console.log.1")  # what qemu_shim.CappedLog does at its cap
    log.write_bytes(b"new\n")
    lines, cur = read_console(log, cur)
    assert lines == ["bc", "lost? no", "new"]
    log.write_bytes(b"x\n")  # replaced by a shorter file with the same name and inode
    lines, cur = read_console(log, cur)
    assert lines == ["x"]


def test_read_console_reads_at_most_the_limit_per_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "console.log"
    log.write_bytes(b"0123456789\n" * 10)
    seen: list[str] = []
    cur = ConsoleCursor()
    for _ in range(20):
        lines, cur = read_console(log, cur, limit=25)
        seen += lines
    assert seen == ["0123456789"] * 10
