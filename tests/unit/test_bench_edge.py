"""The edge benchmark's fixed parts: what it sends and the configurations it compares."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from ember.bench.edge import (
    DIRECT_CONFIG,
    FIRST_BYTES,
    HOSTNAME,
    EdgeTimeline,
    Probe,
    Target,
    _phase_stats,
    client_hello,
    edge_snapshot,
    free_port,
    free_port_range,
    routed,
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


def test_a_probe_splits_its_propagation_into_the_steps_of_the_path() -> None:
    timeline = EdgeTimeline()
    timeline.received += [(10.001, frozenset({"rt_old"})), (10.020, frozenset({"rt_a", "rt_old"}))]
    timeline.applied += [(10.0215, frozenset({"rt_a", "rt_old"}), False, 0.0012)]
    probe = Probe("tls", "rt_a", sent=10.0, answered=10.015, routed=10.025, probes=4)
    assert probe.phases(timeline) == {
        "kind": "tls",
        "total_ms": 25.0,
        "api_answered_ms": 15.0,
        "edge_received_ms": 20.0,
        "haproxy_applied_ms": 21.5,
        "reloaded": False,
        "haproxy_apply_ms": 1.2,
        "probes": 4,
    }
    never = Probe("tcp", "rt_b", sent=10.0, answered=10.01, routed=None, probes=99)
    phases = never.phases(timeline)
    assert phases["total_ms"] is None and phases["edge_received_ms"] is None
    assert phases["reloaded"] is None


def test_phase_statistics_skip_missing_steps_and_count_reloads() -> None:
    samples = [
        {
            "total_ms": float(n),
            "api_answered_ms": 1.0,
            "edge_received_ms": None if n == 3 else 2.0,
            "haproxy_applied_ms": 3.0,
            "haproxy_apply_ms": 0.5,
            "reloaded": n == 2,
        }
        for n in (1, 2, 3)
    ]
    stats = _phase_stats(samples)
    assert stats["n"] == 3 and stats["reloads"] == 1
    assert stats["total_ms"] == {"p50": 2.0, "p99": 3.0}
    assert stats["edge_received_ms"] == {"p50": 2.0, "p99": 2.0}
    assert _phase_stats([])["total_ms"] == {}


def test_a_port_nobody_listens_on_is_not_routed() -> None:
    port = free_port("127.0.0.1")
    assert not routed("127.0.0.1", port, client_hello(HOSTNAME), timeout=0.5)


def test_the_tcp_port_pool_is_free() -> None:
    low, high = free_port_range("127.0.0.1", 4)
    assert high - low == 3
    for port in range(low, high + 1):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
