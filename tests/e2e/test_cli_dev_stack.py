"""The real `ember` executable against the real embedded stack: exit codes and --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import stack_env

EMBER = str(Path(sys.executable).parent / "ember")


def ember(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [EMBER, *args],
        env={**stack_env(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ember-home-"))
    yield path
    ember(path, "dev", "down")
    shutil.rmtree(path, ignore_errors=True)


def test_dev_up_creates_the_stack_once_and_is_idempotent(home: Path) -> None:
    first = ember(home, "dev", "up", "--json")
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout)
    assert info["postgres_created"] is True and info["postgres_started"] is True
    from ember.store import migrations

    assert info["migrations_applied"] == [
        f"{m.version:04d}_{m.name}" for m in migrations.available()
    ]
    assert (home / "postgres" / "data" / "PG_VERSION").exists()

    # The local admin's token is printed once and stored in the CLI config.
    assert info["admin_token"].startswith("ember_pat_")
    config = (home / "cli.toml").read_text()
    assert info["admin_token"] in config and 'org = "local"' in config
    assert info["services_started"] == {"api": True, "controller": True, "registry": True}
    assert info["edge"] == "started"
    assert info["agent"].startswith("not started")
    registry_url = info["registry_url"]
    assert registry_url == f"http://127.0.0.1:{stack_env(home)['EMBER_REGISTRY_PORT']}"

    again = json.loads(ember(home, "dev", "up", "--json").stdout)
    assert again["postgres_created"] is False and again["postgres_started"] is False
    assert again["migrations_applied"] == []
    assert again["admin_token"] is None
    assert again["services_started"] == {"api": False, "controller": False, "registry": False}
    assert again["edge"] == "running"
    status = json.loads(ember(home, "dev", "status", "--json").stdout)
    assert status["services"] == {
        "api": True,
        "controller": True,
        "registry": True,
        "edge": True,
        "agent": False,  # EMBER_DEV_AGENT=0 (tests.support.stack)
    }
    import httpx

    assert httpx.get(status["api_url"] + "/readyz").json() == {"status": "ready"}
    # The embedded registry answers the distribution API and stores under EMBER_HOME.
    assert httpx.get(registry_url + "/v2/").status_code == 200
    assert (home / "registry" / "config.yml").exists()
    assert (home / "registry" / "data").is_dir()

    events = [
        json.loads(line)
        for line in ember(
            home, "admin", "events", "list", "--stream", "stack-local", "--json"
        ).stdout.splitlines()
    ]
    assert [(e["stream_id"], e["stream_version"], e["type"]) for e in events] == [
        ("stack-local", 1, "stack.started"),
        ("stack-local", 2, "stack.started"),
    ]
    assert events[0]["metadata"] == {"actor": "ember dev up"}


def test_projections_status_and_rebuild(home: Path) -> None:
    status = json.loads(ember(home, "admin", "projections", "status", "--json").stdout)
    assert sorted(s["name"] for s in status) == [
        "releases",
        "routes",
        "scheduling",
        "streams",
        "tenancy",
    ]
    assert all(s["lag_events"] == 0 for s in status)
    first = json.loads(ember(home, "admin", "projections", "rebuild", "--json").stdout)
    second = json.loads(ember(home, "admin", "projections", "rebuild", "streams", "--json").stdout)
    assert first["streams"] == second["streams"] and first["streams"]["events"] >= 2
    streams = json.loads(
        ember(home, "admin", "events", "streams", "--kind", "stack", "--json").stdout
    )
    assert [(s["stream_id"], s["kind"], s["last_type"]) for s in streams] == [
        ("stack-local", "stack", "stack.started")
    ]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["admin", "events", "list", "--after", "bogus"], 2, "cursor"),
        (["admin", "events", "list", "--limit", "0"], 2, "--limit"),
        (["admin", "events", "list", "--stream", "Not Valid"], 2, "stream id"),
        (["admin", "projections", "rebuild", "nope"], 3, "no projection named 'nope'"),
        (["admin", "no-such-command"], 2, "No such command"),
    ],
)
def test_bad_input_exits_with_the_documented_code(
    home: Path, args: list[str], code: int, needle: str
) -> None:
    before = ember(home, "admin", "events", "list", "--json").stdout
    proc = ember(home, *args)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert ember(home, "admin", "events", "list", "--json").stdout == before, "changed nothing"


def test_json_errors_carry_the_envelope(home: Path) -> None:
    proc = ember(home, "admin", "events", "list", "--after", "x", "--json")
    assert proc.returncode == 2
    body = json.loads(proc.stderr)
    assert body["error"]["code"] == "validation.failed"
    assert body["error"]["detail"] == {"field": "cursor"}
    assert body["exit_code"] == 2


def test_tail_follows_new_events(home: Path) -> None:
    head = json.loads(ember(home, "dev", "status", "--json").stdout)["head"]
    tail = subprocess.Popen(
        [EMBER, "admin", "events", "tail", "--after", head],
        env=stack_env(home),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # 'dev up' appends a stack.started event; tail (started at the head) must print it.
        assert ember(home, "dev", "up").returncode == 0
        line = tail.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["type"] == "stack.started"
    finally:
        tail.kill()
        tail.wait()


def test_unreachable_database_exits_7_with_a_hint(home: Path) -> None:
    proc = ember(
        home, "admin", "migrate", env={"EMBER_DATABASE_URL": "host=/nonexistent port=9 dbname=x"}
    )
    assert proc.returncode == 7
    assert "Hint:" in proc.stderr and "EMBER_DATABASE_URL" in proc.stderr


def test_dev_down_stops_and_then_commands_say_what_to_do(home: Path) -> None:
    down = ember(home, "dev", "down", "--json")
    assert down.returncode == 0
    assert json.loads(down.stdout) == {
        "stopped": True,
        "services_stopped": {
            "api": True,
            "controller": True,
            "registry": True,
            "edge": True,
            "agent": False,  # never started here (EMBER_DEV_AGENT=0)
        },
    }
    assert json.loads(ember(home, "dev", "down", "--json").stdout)["stopped"] is False
    proc = ember(home, "admin", "events", "list")
    assert proc.returncode == 7
    assert "ember dev up" in proc.stderr
    status = json.loads(ember(home, "dev", "status", "--json").stdout)
    assert status["postgres_running"] is False
    # Data survives a restart.
    assert ember(home, "dev", "up").returncode == 0
    events = ember(home, "admin", "events", "list", "--json").stdout.splitlines()
    assert [json.loads(e)["type"] for e in events][-2:] == ["stack.stopped", "stack.started"]


def test_dev_up_uses_an_external_database_when_told(database_url: str, tmp_path: Path) -> None:
    proc = ember(tmp_path, "dev", "up", "--json", env={"EMBER_DATABASE_URL": database_url})
    ember(tmp_path, "dev", "down", env={"EMBER_DATABASE_URL": database_url})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["postgres"].startswith("external")
    assert not (tmp_path / "postgres").exists(), "no embedded cluster when a URL is given"
    listed = ember(
        tmp_path, "admin", "events", "list", "--json", env={"EMBER_DATABASE_URL": database_url}
    )
    assert json.loads(listed.stdout.splitlines()[0])["data"]["database"] == "external"


def test_server_controller_folds_new_events_and_stops_on_sigterm(
    database_url: str, tmp_path: Path
) -> None:
    import signal
    import time

    import psycopg

    from ember.core.catalog import REGISTRY as PLATFORM
    from ember.core.catalog import StackStarted, StackStopped
    from ember.core.events import NewEvent
    from ember.store.db import Database
    from ember.store.eventlog import EventLog

    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env = {**base, "EMBER_HOME": str(tmp_path), "EMBER_DATABASE_URL": database_url}
    controller = subprocess.Popen(
        [EMBER, "server", "controller"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        # Append directly (not through 'ember dev', which folds projections itself), so
        # only the controller can bring the view up to date.
        with Database(database_url) as db:
            log = EventLog(db, PLATFORM)
            log.append(
                "stack-x",
                0,
                [NewEvent.of(StackStarted(hostname="h", version="v", database="external"))],
            )
            log.append("stack-x", 1, [NewEvent.of(StackStopped(hostname="h"))])
        deadline = time.monotonic() + 20
        with psycopg.connect(database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT version, last_type FROM view_streams").fetchone()
                if row == (2, "stack.stopped"):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the controller never folded stack.stopped: {row}")
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(timeout=15) == 0
    finally:
        if controller.poll() is None:
            controller.kill()
    assert "Traceback" not in (controller.stderr.read() if controller.stderr else "")
