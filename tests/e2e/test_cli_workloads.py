"""`ember scale`, `ember status`, `ember restart`, `ember deploy promote|abort` with the
real executable against a real API server (`ember server api`, no controller) on a real
Postgres. The release is created through the client library (no registry needed)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ApiServer, Cli, User, concurrently

DIGEST = "sha256:" + "1" * 64


@pytest.fixture(scope="module")
def carol(api_server: ApiServer) -> User:
    user = api_server.create_user("carol@example.com", "initech")
    with api_server.client(user) as api:
        api.create_app(user.org, "shop")
        api.create_env(user.org, "shop", "prod")
        manifest = (
            'schema_version = 1\napp = "shop"\n[processes]\n'
            'web = "httpd -f -p 8080"\nworker = "sleep infinity"\n'
        )
        api.deploy(
            user.org,
            "shop",
            "prod",
            repository=f"{user.org}/shop",
            digest=DIGEST,
            manifest=manifest,
        )
    return user


def test_scale_restart_and_status(cli: Cli, carol: User) -> None:
    cli.use(carol, app="shop")
    scaled = cli.ok("scale", "web=2", "worker=0")
    assert scaled["changed"] is True
    assert scaled["processes"] == {
        "web": {"count": 2, "memory_mb": 256},
        "worker": {"count": 0, "memory_mb": 256},
    }
    again = cli("scale", "web=2")
    assert again.returncode == 0 and "already at that scale; nothing to do" in again.stdout
    memory = cli.ok("scale", "--memory", "512M", "worker")
    assert memory["processes"]["worker"] == {"count": 0, "memory_mb": 512}

    restarted = cli.ok("restart", "web")
    assert restarted == {"app": "shop", "env": "prod", "processes": ["web"], "release_version": 1}

    status, human = concurrently(lambda: cli.ok("status"), lambda: cli("status"))
    assert status["release"]["version"] == 1 and status["rollout"] is None
    assert [(p["name"], p["desired"], p["running"]) for p in status["processes"]] == [
        ("web", 2, 0),
        ("worker", 0, 0),
    ]
    assert status["converged"] is False
    assert status["problems"][0].startswith("waiting for the controller to start the rollout")
    assert human.returncode == 0
    assert "PROCESS" in human.stdout and "Not converging:" in human.stdout
    assert "is the controller running?" in human.stdout


def test_bad_input_exits_2_or_3_and_changes_nothing(cli: Cli, carol: User) -> None:
    cli.use(carol, app="shop")
    before = cli.ok("status")
    bad, missing, limit, unknown_restart = concurrently(
        lambda: cli.fails(2, "scale", "web=x"),
        lambda: cli.fails(3, "scale", "db=1"),
        lambda: cli.fails(2, "scale", "web=101"),
        lambda: cli.fails(3, "restart", "db"),
    )
    assert bad["code"] == "cli.invalid_argument" and bad["detail"]["argument"] == "web=x"
    assert missing["code"] == "process.not_found"
    assert missing["detail"]["field"] == "processes.db"
    assert limit["code"] == "scale.invalid"
    assert limit["detail"]["field"] == "processes.web.count"
    assert unknown_restart["code"] == "process.not_found"
    assert cli.ok("status") == before


def test_promote_and_abort_without_a_rollout_exit_3(cli: Cli, carol: User) -> None:
    cli.use(carol, app="shop")
    promote, abort, usage = concurrently(
        lambda: cli.fails(3, "deploy", "promote"),
        lambda: cli.fails(3, "deploy", "abort"),
        lambda: cli("deploy", "--detach", "abort"),
    )
    assert promote["code"] == abort["code"] == "rollout.not_found"
    assert usage.returncode == 2 and "cannot go before 'abort'" in usage.stderr
