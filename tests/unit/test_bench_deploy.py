"""The deploy benchmark's fixed parts: its figures, the manifests it deploys, the stack's
environment, the instance phases and the rollout client's tally (against a real local
HTTP server)."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.bench import deploy
from ember.bench.boot import SAMPLE_DIR, instance_spec
from ember.bench.deploy import (
    GOAL_RATIO,
    BenchFailed,
    Outcome,
    RolloutClient,
    Samples,
    deploy_phases,
    listening,
    report,
    request,
    sample_manifest,
    stack_env,
    tally,
)
from ember.core.manifest import normalize, parse_manifest
from ember.core.workloads import LiveRelease, WorkloadState, desired_processes
from ember.dev.examples import versioned_hello_http_manifest

DIGEST = "sha256:" + "d" * 64


def _rollout(failed: int = 0, requests: int = 700, last: str | None = "v2") -> dict[str, object]:
    return {
        "requests": requests,
        "failed": failed,
        "versions": {"v1": 500, "v2": 200 - failed},
        "last_version": last,
        "first_failures": ["ConnectionResetError: reset"] * min(failed, 5),
        "instances": 3,
        "seconds": 25.0,
    }


def _samples(deploy_s: list[float], bare_s: list[float], **rollout: object) -> Samples:
    return Samples(
        deploy=deploy_s,
        bare=bare_s,
        cli_returned=[0.7] * len(deploy_s),
        phases=[
            {"cli_returned": 0.7, "instance_created": 1.4, "served_through_edge": d}
            for d in deploy_s
        ],
        first=["deploy", "bare", "deploy"][: len(deploy_s)],
        rollout=_rollout(**rollout),  # type: ignore[arg-type]
    )


# -- the figures -------------------------------------------------------------------------------


def test_the_headline_figures_are_medians_and_their_ratio() -> None:
    result = report(_samples([4.0, 4.6, 4.2], [3.0, 3.2, 2.9]), {"accel": "tcg"})
    assert result["deploy_to_serving_s"] == 4.2
    assert result["bare_boot_to_serving_s"] == 3.0
    assert result["deploy_overhead_ratio"] == 1.4
    assert result["deploy_overhead_s"] == 1.2
    assert GOAL_RATIO == 1.5 and result["goal_deploy_overhead_ratio"] == 1.5
    assert result["deploy_cli_returned_s"] == 0.7
    assert result["deploy_phases_s"] == {
        "cli_returned": 0.7,
        "instance_created": 1.4,
        "served_through_edge": 4.2,
    }
    assert list(result["deploy_phases_s"]) == [
        "cli_returned",
        "instance_created",
        "served_through_edge",
    ]
    assert result["rollout_failed_requests"] == 0 and result["rollout_requests"] == 700
    assert result["rollout_instances"] == 3
    assert result["runs"] == 3
    assert result["goals"] == {
        "deploy_overhead_ratio<=1.5": True,
        "rollout_failed_requests==0": True,
        "rollout_served_v1_then_v2": True,
        "every_round_measured_both": True,
    }


def test_the_raw_samples_and_the_run_config_are_kept() -> None:
    result = report(_samples([4.0, 6.0], [2.0, 4.0]), {"accel": "tcg"})
    config = result["config"]
    assert config["accel"] == "tcg"
    samples = config["samples"]
    assert samples["deploy_s"] == [4.0, 6.0] and samples["bare_s"] == [2.0, 4.0]
    assert samples["ratios_per_round"] == [2.0, 1.5]
    assert samples["first_per_round"] == ["deploy", "bare"]
    assert len(samples["deploy_phases_s"]) == 2
    assert result["stats_s"]["deploy"] == {"n": 2, "p50": 5.0, "p90": 6.0, "min": 4.0, "max": 6.0}
    json.dumps(result)  # the result file is JSON


def test_a_slow_deploy_a_failed_request_or_no_v2_miss_their_goals() -> None:
    slow = report(_samples([4.6], [3.0]), {})
    assert slow["deploy_overhead_ratio"] == 1.533
    assert slow["goals"]["deploy_overhead_ratio<=1.5"] is False
    failing = report(_samples([4.0], [3.0], failed=2), {})
    assert failing["rollout_failed_requests"] == 2
    assert failing["goals"]["rollout_failed_requests==0"] is False
    assert (
        failing["config"]["samples"]["rollout_first_failures"]
        == ["ConnectionResetError: reset"] * 2
    )
    stuck = report(_samples([4.0], [3.0], last="v1"), {})
    assert stuck["goals"]["rollout_served_v1_then_v2"] is False
    silent = report(_samples([4.0], [3.0], requests=0), {})
    assert silent["goals"]["rollout_failed_requests==0"] is False  # nothing was asked
    empty = report(Samples(), {})
    assert empty["deploy_overhead_ratio"] is None
    assert empty["rollout_failed_requests"] is None
    assert not any(empty["goals"].values())


def test_phases_are_the_first_events_of_their_kind_after_the_launch_in_time_order() -> None:
    launched = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

    def at(seconds: float) -> dt.datetime:
        return launched + dt.timedelta(seconds=seconds)

    events = [
        ("instance.healthy", at(4.5)),
        ("release.created", at(0.5)),
        ("release.promoted", at(0.625)),
        ("instance.created", at(1.25)),
        ("instance.assigned", at(1.375)),
        ("instance.starting", at(2.0)),
        ("instance.unhealthy", at(6.0)),
        ("instance.healthy", at(7.0)),  # again, later: the first one counts
    ]
    phases = deploy_phases(launched.timestamp(), events, cli_returned=0.75, served=4.625)
    assert phases == {
        "release_promoted": 0.625,
        "cli_returned": 0.75,
        "instance_created": 1.25,
        "instance_assigned": 1.375,
        "starting_reported": 2.0,
        "healthy_reported": 4.5,
        "served_through_edge": 4.625,
    }
    assert list(phases) == sorted(phases, key=phases.__getitem__)
    # A CLI still running when the page came, and no events read: what is known.
    assert deploy_phases(launched.timestamp(), [], cli_returned=None, served=5.0) == {
        "served_through_edge": 5.0
    }


# -- what it deploys and how it runs the CLI ---------------------------------------------------


def _spec(manifest_text: str) -> object:
    manifest = normalize(parse_manifest(manifest_text))
    release = LiveRelease(1, "local/bench", DIGEST, manifest)
    return desired_processes(release, WorkloadState())["web"].spec


def test_the_deployed_sample_is_the_vm_the_bare_boots_run() -> None:
    text = sample_manifest((SAMPLE_DIR / "ember.toml").read_text(), "bench")
    assert parse_manifest(text).app == "bench"
    deployed, bare = _spec(text), instance_spec(DIGEST)
    for field in ("cpus", "memory_mb", "command", "services"):
        assert getattr(deployed, field) == getattr(bare, field), field


def test_a_manifest_without_exactly_one_app_line_is_refused() -> None:
    with pytest.raises(BenchFailed, match=r"0 'app = \.\.\.' lines"):
        sample_manifest("schema_version = 1\n", "bench")
    with pytest.raises(BenchFailed, match=r"2 'app = \.\.\.' lines"):
        sample_manifest('app = "a"\napp = "b"\n', "bench")


@pytest.mark.parametrize("version", [1, 2])
def test_the_rollout_manifest_is_valid_and_rolls_one_at_a_time(version: int) -> None:
    manifest = parse_manifest(versioned_hello_http_manifest("bench", version))
    data = normalize(manifest)
    assert data["app"] == "bench" and data["env"] == {"VERSION": str(version)}
    assert data["deploy"]["strategy"] == "rolling"
    assert (data["deploy"]["max_surge"], data["deploy"]["max_unavailable"]) == (1, 0)
    (check,) = data["services"][0]["checks"]
    assert (check["type"], check["path"]) == ("http", "/version")
    assert "echo v$VERSION > /tmp/www/version" in data["processes"]["web"][2]


def test_the_stack_env_is_private_and_drops_the_callers_ember_settings(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "EMBER_API_URL": "http://elsewhere", "EMBER_DEV_AGENT": "0"}
    env = stack_env(base, tmp_path, api_port=7171, registry_port=5151)
    assert env == {
        "PATH": "/usr/bin",
        "EMBER_HOME": str(tmp_path),
        "EMBER_CONFIG": str(tmp_path / "cli.toml"),
        "EMBER_API_PORT": "7171",
        "EMBER_REGISTRY_PORT": "5151",
        "EMBER_DEV_AGENT": "1",
    }


def test_without_root_it_says_so_and_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["ember.bench.deploy", "--quick"])
    with pytest.raises(SystemExit) as exc:
        deploy.main()
    assert "needs root" in str(exc.value.code)


# -- the rollout client, against a real HTTP server --------------------------------------------


class _Site(http.server.BaseHTTPRequestHandler):
    """``/version`` answers what the test sets; ``/broken`` a 503."""

    answer = b"v1\n"

    def do_GET(self) -> None:
        status, body = (503, b"no") if self.path == "/broken" else (200, type(self).answer)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _site() -> Iterator[int]:
    _Site.answer = b"v1\n"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens once the socket is closed


def test_a_request_says_what_came_back_or_what_went_wrong() -> None:
    with _site() as port:
        assert listening(port)
        assert request(port, "/version") == Outcome(200, b"v1\n")
        assert request(port, "/version").ok
        broken = request(port, "/broken")
        assert (broken.status, broken.ok) == (503, False)
    refused = request(_closed_port(), "/version")
    assert refused.status is None and not refused.ok
    assert "ConnectionRefusedError" in refused.error
    assert not listening(_closed_port())


def test_a_200_with_another_body_is_a_failure() -> None:
    assert not Outcome(200, b"<html>default page</html>").ok
    assert Outcome(200, b"v2\n").ok


def test_the_client_counts_every_request_through_a_version_change() -> None:
    with _site() as port, RolloutClient(port) as client:
        deadline = time.monotonic() + 10
        while len(client.outcomes) < 5:
            assert time.monotonic() < deadline, "the client sent nothing"
            time.sleep(0.01)
        _Site.answer = b"v2\n"
        while not client.served(b"v2\n"):
            assert time.monotonic() < deadline, "the client never saw v2"
            time.sleep(0.01)
    counted = tally(client.outcomes)
    assert counted["failed"] == 0 and counted["requests"] == len(client.outcomes) >= 6
    assert set(counted["versions"]) == {"v1", "v2"} and counted["last_version"] == "v2"
    assert sum(counted["versions"].values()) == counted["requests"]


def test_the_tally_counts_errors_bad_statuses_and_bodies() -> None:
    outcomes = [
        Outcome(200, b"v1\n"),
        Outcome(None, error="ConnectionResetError: [Errno 104] reset"),
        Outcome(502, b"bad gateway"),
        Outcome(200, b""),
        Outcome(200, b"v2\n"),
    ]
    counted = tally(outcomes)
    assert counted["requests"] == 5 and counted["failed"] == 3
    assert counted["versions"] == {"v1": 1, "v2": 1}
    assert counted["last_version"] == "v2"
    assert counted["first_failures"] == [
        "ConnectionResetError: [Errno 104] reset",
        "HTTP 502: 'bad gateway'",
        "HTTP 200: ''",
    ]
    assert tally([])["last_version"] is None
    assert tally([Outcome(None, error="x")])["last_version"] is None
