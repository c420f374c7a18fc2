"""`ember logs` with the real executables on a dev stack (API, controller, Postgres,
registry) and a simulated host: lines shipped for the app's instance through the agent
route (as the host's agent does) are printed for people and as NDJSON, filtered, and
followed with `-f` until Ctrl-C; a bad `--since` exits 2 naming the flag."""

from __future__ import annotations

import datetime as dt
import json
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from ember.client import Client
from ember.wire import logs as wl
from tests.e2e.test_cli_converge import SAMPLE, Agents
from tests.e2e.test_cli_deploy import EMBER, Stack, image
from tests.support.stack import stack_env


class World:
    def __init__(self, stack: Stack, api: Client, host: str, instance: str) -> None:
        self.stack = stack
        self.api = api
        self.host = host
        self.instance = instance

    def ship(
        self, *lines: str, ts: dt.datetime | None = None, stream: wl.LogStream = "app"
    ) -> None:
        at = ts or dt.datetime.now(dt.UTC)
        batch = [wl.LogShipLine(ts=at, stream=stream, line=t) for t in lines]
        assert self.api.ship_logs(self.host, self.instance, batch).accepted == len(lines)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = Path(tempfile.mkdtemp(prefix="ember-logs-"))
    stack = Stack(home)
    agents = None
    try:
        stack.json("dev", "up")
        stack("apps", "create", "hello-http")
        stack("envs", "create", "prod", "--app", "hello-http")
        config = tomllib.loads((home / "cli.toml").read_text())
        agents = Agents(config["api_url"], config["token"], ["sim-1"])
        shutil.copy(SAMPLE, stack.project / "ember.toml")
        stack("deploy", "--image", str(image(home, "one")), "--env", "prod", "--timeout", "90s")
        status: Any = stack.json("status", "--env", "prod")
        (instance,) = [i for i in status["instances"] if i["state"] == "healthy"]
        # The simulated host ships as the host's agent would (an operator may act for it).
        with Client(config["api_url"], config["token"]) as api:
            yield World(stack, api, instance["host_id"], instance["instance_id"])
    finally:
        if agents is not None:
            agents.close()
        subprocess.run(
            [EMBER, "dev", "down"], env=stack_env(home), capture_output=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)


def test_logs_prints_shipped_lines_for_people_and_as_ndjson(world: World) -> None:
    stack = world.stack
    empty = stack("logs", "--env", "prod")
    assert empty.stdout == "" and "No log lines" in empty.stderr

    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    world.ship("booting", ts=old)
    world.ship("[    0.5123] Linux version 6.1", stream="kernel")
    world.ship("listening on :8080", "GET / 200")

    out = stack("logs", "--env", "prod").stdout.splitlines()
    short = world.instance[-6:]
    assert [line.split(" ", 1)[1] for line in out] == [
        f"web[{short}] booting",
        f"web[{short}] [    0.5123] Linux version 6.1",
        f"web[{short}] listening on :8080",
        f"web[{short}] GET / 200",
    ]
    assert out[0].startswith(old.strftime("%Y-%m-%dT%H:%M:%SZ"))

    raw = stack("logs", "--env", "prod", "--json").stdout.splitlines()
    items = [json.loads(line) for line in raw]  # one JSON object per line
    assert [i["line"] for i in items] == [
        "booting",
        "[    0.5123] Linux version 6.1",
        "listening on :8080",
        "GET / 200",
    ]
    assert items[1]["stream"] == "kernel"
    assert {(i["process"], i["instance_id"]) for i in items} == {("web", world.instance)}
    ids = [i["id"] for i in items]
    assert ids == sorted(ids)

    newest = stack.json("logs", "--env", "prod", "--lines", "1")
    assert newest["line"] == "GET / 200"  # type: ignore[index]
    recent = stack("logs", "--env", "prod", "--since", "1h").stdout
    assert "booting" not in recent and "GET / 200" in recent
    assert stack("logs", "--env", "prod", "--process", "worker").stdout == ""
    mine = stack("logs", "--env", "prod", "--instance", world.instance, "--json").stdout
    assert len(mine.splitlines()) == 4


def _reader(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next(lines: queue.Queue[str], proc: subprocess.Popen[str]) -> str:
    try:
        return lines.get(timeout=60)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"ember logs -f printed nothing more: {proc.stderr!r}") from None


def test_follow_prints_lines_shipped_after_it_started_until_ctrl_c(world: World) -> None:
    world.ship("before the follow")
    proc = subprocess.Popen(
        [EMBER, "logs", "-f", "--lines", "1", "--env", "prod", "--json"],
        env=stack_env(world.stack.home),
        cwd=world.stack.project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = _reader(proc.stdout)
    try:
        assert json.loads(_next(lines, proc))["line"] == "before the follow"
        world.ship("after the follow started")
        world.ship("and one more")
        assert json.loads(_next(lines, proc))["line"] == "after the follow started"
        assert json.loads(_next(lines, proc))["line"] == "and one more"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 0, err
    assert "Traceback" not in err and "Aborted" not in err
    assert lines.empty(), "nothing printed twice"


def test_bad_arguments_exit_2_naming_the_flag(world: World) -> None:
    for since in ("yesterday", "10x", "2026-11-27T11:00:00"):
        bad = world.stack("logs", "--env", "prod", "--since", since, expect=2)
        assert "--since" in bad.stderr and bad.stdout == ""
    assert "--lines" in world.stack("logs", "--env", "prod", "--lines", "0", expect=2).stderr
    as_json = world.stack("logs", "--env", "prod", "--since", "soon", "--json", expect=2)
    err = json.loads(as_json.stderr)["error"]
    assert err["code"] == "cli.invalid_argument" and err["detail"]["field"] == "--since"
