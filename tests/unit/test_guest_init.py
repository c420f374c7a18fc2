"""The platform init compiles cleanly with the flags of the guest build."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_init_compiles_static_with_all_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "init"
    proc = subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(ROOT / "guest/init/init.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # Static: the initramfs has no dynamic loader or libc.
    assert b"/lib64/ld-linux" not in out.read_bytes()


def test_the_build_uses_the_same_flags() -> None:
    source = (ROOT / "guest/build.py").read_text()
    assert '"-static", "-O2", "-Wall", "-Wextra", "-Werror"' in source
