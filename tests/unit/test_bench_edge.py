"""The edge benchmark's fixed parts: what it sends and the configurations it compares."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ember.bench.edge import (
    DIRECT_CONFIG,
    FIRST_BYTES,
    HOSTNAME,
    Target,
    client_hello,
    edge_snapshot,
)
from ember.edge.haproxy_config import problems, render


def test_the_client_hello_is_one_tls_handshake_record_naming_the_host() -> None:
    hello = client_hello(HOSTNAME)
    assert hello[0] == 0x16 and hello[5] == 0x01  # handshake record, ClientHello
    assert len(hello) == 5 + int.from_bytes(hello[3:5], "big")  # the backend reads it whole
    assert HOSTNAME.encode() in hello
    assert FIRST_BYTES[:1] == b"\x16"


def test_both_configurations_are_valid_haproxy(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed: run make bootstrap"
    backend = Target("127.0.0.22", 9000)
    direct = tmp_path / "direct.cfg"
    direct.write_text(
        DIRECT_CONFIG.format(
            address="127.0.0.21", port=9001, hostname=HOSTNAME, backend="127.0.0.22:9000"
        )
    )
    snapshot = edge_snapshot(9002, backend)
    assert problems(snapshot) == ()
    managed = tmp_path / "managed.cfg"
    managed.write_text(render(snapshot, runtime_socket=str(tmp_path / "s"), map_dir=str(tmp_path)))
    (tmp_path / "fe_tls_127.0.0.20_9002.map").write_text(f"{HOSTNAME} be_r_bench\n")
    for config in (direct, managed):
        proc = subprocess.run(
            [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
