"""`ember hosts` and the operator commands of `ember admin`, with the real executables
against `ember server api`; `ember dev up` making its local admin an operator; and an
agent's enrolment and signed requests through the client library."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ember.client import ApiForbidden, ApiNotFound, ApiUnauthorized, Client
from ember.client.node_auth import NodeAuth, NodeIdentity
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


def test_enroll_token_and_an_agent_signing_its_requests(
    cli: Cli, api_server: ApiServer, operator: User, tmp_path: Path
) -> None:
    """`ember hosts enroll-token`, then the client library as an agent would use it, over
    real HTTP: enrol once (a retry is harmless), then sign every request."""
    cli.use(operator)
    made = cli.ok("hosts", "enroll-token", "--host-id", "agent-1", "--expires", "10m")
    assert made["token"].startswith("ember_agt_") and made["host_id"] == "agent-1"
    people = cli("hosts", "enroll-token")
    assert people.returncode == 0 and "ember_agt_" in people.stdout and "any host" in people.stdout
    assert cli.fails(2, "hosts", "enroll-token", "--expires", "8d")["detail"] == {
        "field": "--expires"
    }
    assert cli.fails(2, "hosts", "enroll-token", "--host-id", "Bad_Id")["detail"] == {
        "field": "--host-id"
    }
    cli.use(api_server.create_user("notops@example.com", "notops"))
    assert cli.fails(5, "hosts", "enroll-token")["code"] == "auth.forbidden"

    identity = NodeIdentity.load_or_create(tmp_path / "agent" / "node.key")
    with Client(api_server.url, None) as anonymous:
        facts = {"vcpus": 2, "memory_mb": 2048, "region": "fra"}
        first = anonymous.enroll(
            made["token"], host_id="agent-1", public_key=identity.public_key_b64, **facts
        )
        assert (first.item.host_id, first.created) == ("agent-1", True)
        again = anonymous.enroll(
            made["token"], host_id="agent-1", public_key=identity.public_key_b64, **facts
        )
        assert again.created is False
        with pytest.raises(ApiUnauthorized):
            anonymous.enroll(made["token"], host_id="agent-2", public_key="A" * 43, **facts)

    node = NodeAuth(NodeIdentity.load(tmp_path / "agent" / "node.key"), "agent-1")
    with Client(api_server.url, operator.token, auth=node) as agent:  # auth wins
        agent.heartbeat("agent-1", {"vms": 0})
        assert agent.host_allocations("agent-1").items == []
        assert agent.register_host("agent-1", vcpus=4, memory_mb=2048, region="fra").item.vcpus == 4
        # A percent-encoded path is signed as the server decodes it: the signature holds,
        # and the answer is about the instance.
        with pytest.raises(ApiNotFound) as missing:
            agent.report_instance("ins é", host_id="agent-1", state="healthy")
        assert missing.value.code == "instance.not_found"
        with pytest.raises(ApiForbidden):
            agent.heartbeat("web-2")
        with pytest.raises(ApiForbidden):
            agent.list_hosts()
    cli.use(operator)
    shown = cli.ok("hosts", "show", "agent-1")
    assert (shown["public_key"], shown["vcpus"]) == (identity.public_key_b64, 4)
    assert identity.public_key_b64 in cli("hosts", "show", "agent-1").stdout
