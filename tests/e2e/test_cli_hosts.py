"""`ember hosts` and the operator commands of `ember admin`, with the real executables
against `ember server api`; and `ember dev up` making its local admin an operator."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import EMBER, ApiServer, Cli, User
from tests.support.stack import stack_env


@pytest.fixture(scope="module")
def operator(api_server: ApiServer) -> User:
    made = api_server.admin(
        "create-user", "--email", "ops@example.com", "--org", "ops", "--operator"
    )
    assert made["operator"] is True
    token = api_server.admin("create-token", "--email", "ops@example.com", "--name", "ops")
    return User("ops@example.com", made["user_id"], "ops", token["token"], token["id"])


def test_hosts_list_show_cordon(cli: Cli, api_server: ApiServer, operator: User) -> None:
    with api_server.client(operator) as api:
        assert api.register_host("web-1", vcpus=8, memory_mb=16384, region="fra").created
        assert not api.register_host("web-1", vcpus=8, memory_mb=16384, region="fra").created
        api.register_host("web-2", vcpus=4, memory_mb=8192)
        api.heartbeat("web-2", {"agent": "test"})
    cli.use(operator)

    listed = cli.ok("hosts", "list")
    assert [(h["id"], h["state"], h["usage"]["instances"]) for h in listed] == [
        ("web-1", "ready", 0),
        ("web-2", "ready", 0),
    ]
    table = cli("hosts", "list")
    assert table.returncode == 0
    assert "HOST" in table.stdout and "web-1" in table.stdout and "0/16384 MiB" in table.stdout

    cordoned = cli.ok("hosts", "cordon", "web-1")
    assert (cordoned["id"], cordoned["state"]) == ("web-1", "cordoned")
    again = cli("hosts", "cordon", "web-1")  # idempotent, and says so for people
    assert again.returncode == 0 and "web-1 is cordoned" in again.stdout
    assert cli.ok("hosts", "drain", "web-1")["state"] == "draining"
    shown = cli.ok("hosts", "show", "web-1")
    assert shown["state"] == "draining" and shown["instances"] == []
    assert "draining" in cli("hosts", "show", "web-1").stdout
    assert cli.ok("hosts", "uncordon", "web-1")["state"] == "ready"

    assert cli.fails(3, "hosts", "show", "nope")["code"] == "host.not_found"
    assert cli.fails(3, "hosts", "cordon", "nope")["code"] == "host.not_found"
    bad = cli.fails(2, "hosts", "cordon", "Not_A_Host")
    assert bad["detail"] == {"field": "host"}


def test_hosts_need_a_platform_operator(cli: Cli, api_server: ApiServer) -> None:
    someone = api_server.create_user("dev@example.com", "devs")
    cli.use(someone)
    err = cli.fails(5, "hosts", "list")
    assert err["code"] == "auth.forbidden"
    assert "grant-operator" in err["hint"]

    granted = api_server.admin("grant-operator", "dev@example.com")
    assert granted == {
        "user_id": someone.user_id,
        "email": "dev@example.com",
        "operator": True,
        "changed": True,
    }
    assert api_server.admin("grant-operator", "dev@example.com")["changed"] is False
    assert isinstance(cli.ok("hosts", "list"), list)  # the same token works now
    revoked = api_server.admin("grant-operator", "dev@example.com", "--revoke")
    assert (revoked["operator"], revoked["changed"]) == (False, True)
    assert cli.fails(5, "hosts", "cordon", "web-1")["code"] == "auth.forbidden"


def test_grant_operator_to_an_unknown_user_exits_3(api_server: ApiServer) -> None:
    proc = subprocess.run(
        [EMBER, "admin", "grant-operator", "nobody@example.com", "--json"],
        env={**stack_env(api_server.home), "EMBER_DATABASE_URL": api_server.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stderr)["error"]["code"] == "user.not_found"


def test_dev_up_makes_the_local_admin_an_operator(database_url: str, tmp_path: Path) -> None:
    """Also on a stack whose admin predates operators (here: had the role revoked)."""
    env = {**stack_env(tmp_path), "EMBER_DATABASE_URL": database_url}

    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [EMBER, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    try:
        assert ember("dev", "up").returncode == 0
        assert ember("hosts", "list", "--json").stdout.strip() == "[]"
        ember("admin", "grant-operator", "admin@localhost", "--revoke")
        assert ember("hosts", "list", "--json").returncode == 5
        assert ember("dev", "up").returncode == 0
        assert ember("hosts", "list", "--json").returncode == 0
    finally:
        ember("dev", "down")
