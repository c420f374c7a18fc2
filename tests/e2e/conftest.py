"""A real control-plane API for CLI tests: `ember server api` as a subprocess on a fresh
database, users and tokens bootstrapped with the real `ember admin` commands, and a
runner for the real `ember` executable with its own config file."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from ember.cli.config import CliConfig, save_file
from ember.client import Client
from ember.dev.postgres import LocalCluster
from tests.support import pg
from tests.support.net import free_port

EMBER = str(Path(sys.executable).parent / "ember")
T = TypeVar("T")


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Run independent, read-only CLI checks in parallel (each `ember` run spends ~0.4 s
    starting Python); results in call order, the first failure re-raised."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any EMBER_* setting, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    return {**base, **extra}


@dataclasses.dataclass(frozen=True)
class User:
    email: str
    user_id: str
    org: str
    token: str
    token_id: str


@dataclasses.dataclass
class ApiServer:
    url: str
    database_url: str
    home: Path
    process: subprocess.Popen[bytes]

    def admin(self, *args: str) -> Any:
        """Run `ember admin ... --json` against the server's database; return its JSON."""
        proc = subprocess.run(
            [EMBER, "admin", *args, "--json"],
            env=clean_env(EMBER_DATABASE_URL=self.database_url, EMBER_HOME=str(self.home)),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def create_user(self, email: str, org: str) -> User:
        """An operator creates a user owning ``org`` and issues them an unscoped token."""
        user = self.admin("create-user", "--email", email, "--org", org)
        token = self.admin("create-token", "--email", email, "--name", "t")
        return User(email, user["user_id"], org, token["token"], token["id"])

    def client(self, user: User) -> Client:
        """The real client library in-process: quick set-up without a subprocess."""
        return Client(self.url, user.token)


def _wait_ready(server: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"ember server api exited {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"ember server api not ready after {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def api_server(pg_cluster: LocalCluster) -> Iterator[ApiServer]:
    """`ember server api` on a fresh database, shared by one test module."""
    database_url = pg.fresh_database(pg_cluster)
    home = Path(tempfile.mkdtemp(prefix="ember-api-home-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [EMBER, "server", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=clean_env(EMBER_DATABASE_URL=database_url, EMBER_HOME=str(home)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, url, log, timeout=30)
        yield ApiServer(url, database_url, home, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        pg.drop_database(pg_cluster, database_url)
        shutil.rmtree(home, ignore_errors=True)


@dataclasses.dataclass
class Cli:
    """The real `ember` executable with its own config file and working directory."""

    config: Path
    cwd: Path
    api_url: str

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        input: str | None = None,
        tty_input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `ember ARGS`. stdin is empty and not a terminal, unless ``input`` (a pipe)
        or ``tty_input`` (typed into a pseudo-terminal) is given."""
        if tty_input is not None:
            return self._on_a_terminal(args, tty_input, env)
        proc = subprocess.run(
            [EMBER, *args],
            env=clean_env(**{"EMBER_CONFIG": str(self.config), **(env or {})}),
            cwd=cwd or self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def _on_a_terminal(
        self, args: tuple[str, ...], typed: str, env: dict[str, str] | None
    ) -> subprocess.CompletedProcess[str]:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, typed.encode())  # the line discipline holds it until read
            proc = subprocess.run(
                [EMBER, *args],
                env=clean_env(**{"EMBER_CONFIG": str(self.config), **(env or {})}),
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=terminal,
                check=False,
            )
        finally:
            os.close(terminal)
            os.close(controller)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str, **kwargs: Any) -> Any:
        """Run a --json command that must succeed; return its parsed stdout."""
        proc = self(*args, "--json", **kwargs)
        assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
        return json.loads(proc.stdout)

    def fails(self, code: int, *args: str, **kwargs: Any) -> dict[str, Any]:
        """Run a --json command that must exit ``code``; return the error envelope."""
        proc = self(*args, "--json", **kwargs)
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        assert proc.stdout == "", proc.stdout
        envelope: dict[str, Any] = json.loads(proc.stderr)
        assert envelope["exit_code"] == code
        return envelope["error"]

    def login(self, user: User) -> Any:
        return self.ok("login", "--token", user.token, "--api-url", self.api_url)

    def use(self, user: User, **context: str) -> None:
        """What 'ember login' stores, written directly (one subprocess less per test)."""
        save_file(
            self.config,
            CliConfig(api_url=self.api_url, token=user.token, org=user.org, **context),
        )


@pytest.fixture
def cli(api_server: ApiServer, tmp_path: Path) -> Cli:
    """A fresh config file (not logged in) and an empty working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return Cli(tmp_path / "config" / "config.toml", cwd, api_server.url)
