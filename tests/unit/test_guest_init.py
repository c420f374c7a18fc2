"""The platform init compiles cleanly with the flags of the guest build."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

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
