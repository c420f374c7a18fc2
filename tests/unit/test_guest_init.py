"""The platform init compiles cleanly with the flags of the guest build, and its config
reader accepts what the agent writes (compiled into a test program, no VM needed)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from ember.agent.guest_config import MAGIC, GuestCheck, GuestConfig, _Reader, render

ROOT = Path(__file__).resolve().parents[2]


def _build_cflags() -> list[str]:
    """The flags guest/build.py really compiles the init with (not a copy of them)."""
    spec = importlib.util.spec_from_file_location("guest_build", ROOT / "guest/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flags: list[str] = list(module.CFLAGS)
    return flags


def test_init_compiles_static_with_all_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "init"
    cflags = _build_cflags()
    assert {"-static", "-Wall", "-Wextra", "-Werror"} <= set(cflags)
    proc = subprocess.run(
        ["gcc", *cflags, "-o", str(out), str(ROOT / "guest/init/init.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # Static: the initramfs has no dynamic loader or libc.
    assert b"/lib64/ld-linux" not in out.read_bytes()


def test_the_build_uses_the_same_flags() -> None:
    # The build's own flags are what the compile test above uses; they must keep the
    # warnings fatal and the binary static.
    assert _build_cflags()[:5] == ["-static", "-O2", "-Wall", "-Wextra", "-Werror"]


# -- the init's config reader, against drives the agent writes ----------------------------------

HARNESS = r"""
/* The init's own parser, compiled into a program that prints what it read.  reboot()
 * is replaced (fail() ends in power_off()): this must never power off the host. */
#define reboot fake_reboot
#define main init_main
#include INIT_C
#undef main
#undef reboot
int fake_reboot(int how)
{
	(void)how;
	_exit(3);
}
int main(int argc, char **argv)
{
	static char text[1 << 20];
	FILE *f = argc == 2 ? fopen(argv[1], "rb") : NULL;
	if (!f)
		return 2;
	text[fread(text, 1, sizeof text - 1, f)] = '\0';
	fclose(f);
	struct config c;
	parse_config(&c, text);
	printf("token %s\n", c.check_token ? c.check_token : "-");
	for (size_t i = 0; i < c.nchecks; i++) {
		printf("check %ld %ld", c.checks[i].interval_ms, c.checks[i].timeout_ms);
		for (char **a = c.checks[i].argv; *a; a++)
			printf(" [%s]", *a);
		printf("\n");
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def init_parser(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("init-parser")
    (out / "harness.c").write_text(HARNESS)
    flags = [f for f in _build_cflags() if f not in ("-static", "-s")]
    exe = out / "parse"
    proc = subprocess.run(
        [
            "gcc",
            *flags,
            f'-DINIT_C="{ROOT / "guest/init/init.c"}"',
            "-o",
            str(exe),
            str(out / "harness.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"reboot" not in subprocess.run(
        ["nm", str(exe)], capture_output=True, check=True
    ).stdout.replace(b"fake_reboot", b"")
    return exe


def _run_parser(exe: Path, drive: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.img"
    path.write_bytes(drive)

    return subprocess.run(
        [str(exe), str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        preexec_fn=_without_reboot,
    )


def _without_reboot() -> None:
    """Belt and braces: reboot(2) needs CAP_SYS_BOOT, gone from the harness's bounding
    set (prctl PR_CAPBSET_DROP), so not even a mistake in it can power off the host."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 22, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT)")


def test_the_init_reads_the_checks_the_agent_writes(init_parser: Path, tmp_path: Path) -> None:
    config = GuestConfig(
        argv=("httpd",),
        checks=(
            GuestCheck(("test", "-f", "/tmp/ok"), interval_s=1, timeout_s=0.5),
            GuestCheck(("sh", "-c", "echo 'a b' %20 | grep -q b", ""), 30, 30),
        ),
        check_token="Ab0_-" * 4,
    )
    proc = _run_parser(init_parser, render(config), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "token Ab0_-Ab0_-Ab0_-Ab0_-",
        "check 1000 500 [test] [-f] [/tmp/ok]",
        "check 30000 30000 [sh] [-c] [echo 'a b' %20 | grep -q b] []",
    ]
    plain = _run_parser(init_parser, render(GuestConfig(argv=("true",))), tmp_path)
    assert plain.stdout.splitlines() == ["token -"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (b"check-token short\n", "bad check-token"),
        (b"check-token " + b"a" * 15 + b"%21\n", "bad check-token"),
        (b"check 1000 500 true%00\n", "'check' lines need a 'check-token'"),
        (b"check-token " + b"a" * 16 + b"\ncheck 1000 500 true\n", "ended by %00"),
        (b"check-token " + b"a" * 16 + b"\ncheck 1000 2000 true%00\n", "bad check timeout"),
        (b"check-token " + b"a" * 16 + b"\ncheck 50 50 true%00\n", "bad check interval"),
        (b"check-token " + b"a" * 16 + b"\ncheck 1000 500 %00\n", "program is empty"),
        (b"check-token " + b"a" * 16 + b"\ncheck 1000 500\n", "takes 3 fields"),
    ],
)
def test_the_init_refuses_bad_check_lines(
    init_parser: Path, tmp_path: Path, lines: bytes, message: str
) -> None:
    drive = MAGIC + b"arg x\n" + lines + b"end\n"
    proc = _run_parser(init_parser, drive, tmp_path)
    assert proc.returncode == 3  # fail(): "boot failed", then (the fake) power off
    assert "ember-init: boot failed: " in proc.stderr
    assert message in proc.stderr


def test_the_init_knows_the_keys_the_agent_writes() -> None:
    """Every key of the config drive has a reader in the init (else the init skips it
    as an unknown key from a newer agent)."""
    source = (ROOT / "guest/init/init.c").read_text()
    keys = set(re.findall(r'!strcmp\(key, "([a-z0-9-]+)"\)', source))
    assert keys == set(_Reader.ARITY)
