"""The real `ember` executable against a real API server (`ember server api`) on a real
Postgres: login, context resolution, apps, envs, tokens; exit codes and --json fields
(docs/specs/cli.md).

Each `ember` run is a new process (~0.4 s), so set-up that is not under test goes through
the client library in-process (``api_server.client``) against the same server.
"""

from __future__ import annotations

import stat
import tomllib
import uuid
from pathlib import Path

import psycopg
import pytest
import tomli_w

from ember.client import ApiConflict, ApiNotFound, ApiUnauthorized, Client
from ember.core import tokens
from ember.core.errors import Conflict
from tests.e2e.conftest import ApiServer, Cli, User, concurrently, free_port


@pytest.fixture(scope="module")
def alice(api_server: ApiServer) -> User:
    return api_server.create_user("alice@example.com", "acme")


@pytest.fixture(scope="module")
def bob(api_server: ApiServer) -> User:
    return api_server.create_user("bob@example.com", "globex")


def test_login_whoami_logout(cli: Cli, alice: User) -> None:
    out = cli.ok("login", "--api-url", cli.api_url, input=alice.token + "\n")  # from stdin
    assert out["email"] == "alice@example.com" and out["user_id"] == alice.user_id
    assert out["org"] == "acme" and out["api_url"] == cli.api_url
    assert out["config_file"] == str(cli.config)
    assert out["token"]["id"] == alice.token_id
    assert [o["name"] for o in out["orgs"]] == ["acme"]
    stored = tomllib.loads(cli.config.read_text())
    assert stored == {"api_url": cli.api_url, "token": alice.token, "org": "acme"}
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600

    me = cli.ok("whoami")
    assert set(me) == {"user_id", "email", "token", "orgs"}
    assert me["user_id"] == alice.user_id and me["email"] == alice.email
    assert me["token"]["id"] == alice.token_id
    assert me["token"]["scope"] == {"org": None, "app": None, "env": None}
    assert "token" not in me["token"]  # never the secret
    assert [(o["name"], o["role"]) for o in me["orgs"]] == [("acme", "owner")]
    human = cli("whoami")
    assert human.returncode == 0 and "alice@example.com" in human.stdout

    assert cli.ok("logout") == {"logged_out": True, "config_file": str(cli.config)}
    error = cli.fails(5, "whoami")
    assert error["code"] == "cli.not_logged_in" and "ember login" in error["hint"]
    assert cli.ok("logout")["logged_out"] is False


def test_bad_tokens_exit_5_and_are_not_stored(cli: Cli) -> None:
    unknown = tokens.generate()  # well-formed, checksum ok, never issued
    malformed, plain, by_env, empty = concurrently(
        lambda: cli.fails(5, "login", "--token", "not-a-token", "--api-url", cli.api_url),
        lambda: cli("login", "--token", unknown, "--api-url", cli.api_url),
        lambda: cli.fails(
            5, "whoami", env={"EMBER_API_TOKEN": unknown, "EMBER_API_URL": cli.api_url}
        ),
        lambda: cli.fails(2, "login", "--api-url", cli.api_url, input=""),
    )
    assert malformed["code"] == "auth.unauthorized" and malformed["hint"]
    assert plain.returncode == 5
    assert plain.stderr.startswith("Error: the API token is unknown or revoked\nHint: ")
    assert by_env["message"] == "the API token is unknown or revoked"
    assert empty["code"] == "cli.token_missing"
    assert not cli.config.exists()


def test_unreachable_api_exits_7_with_a_hint(cli: Cli, alice: User) -> None:
    env = {"EMBER_API_URL": f"http://127.0.0.1:{free_port()}", "EMBER_API_TOKEN": alice.token}
    error, plain, bad_url = concurrently(
        lambda: cli.fails(7, "apps", "list", "--org", "acme", env=env),
        lambda: cli("whoami", env=env),
        lambda: cli.fails(2, "whoami", env={**env, "EMBER_API_URL": "localhost:7070"}),
    )
    assert error["code"] == "api.unreachable"
    assert "ember dev up" in error["hint"] and "EMBER_API_URL" in error["hint"]
    assert plain.returncode == 7
    assert "Error: cannot reach the control plane" in plain.stderr
    assert "Hint: is the control plane running?" in plain.stderr
    assert bad_url["detail"]["field"] == "api_url"


def test_apps_create_list_show_delete(cli: Cli, alice: User, api_server: ApiServer) -> None:
    cli.use(alice)
    first = cli("apps", "create", "web")
    assert first.returncode == 0 and "Created app web" in first.stdout
    again = cli("apps", "create", "web")
    assert again.returncode == 0 and "App web already exists" in again.stdout
    app = cli.ok("apps", "create", "web")  # the same JSON whether created now or before
    assert set(app) == {"id", "org", "name", "envs", "created_at"}
    assert (app["org"], app["name"], app["envs"]) == ("acme", "web", [])
    assert app["id"].startswith("app_")
    assert cli.ok("apps", "show", "web") == app
    assert app in cli.ok("apps", "list")

    missing = cli.fails(3, "apps", "show", "nope")
    assert missing["code"] == "app.not_found" and missing["detail"] == {"app": "nope"}
    plain = cli("apps", "show", "nope")
    assert plain.returncode == 3
    assert plain.stderr == (
        "Error: no app 'nope' in org 'acme'\nHint: 'ember apps list' shows the apps you can see\n"
    )

    refused = cli.fails(2, "apps", "delete", "web")  # stdin is not a terminal
    assert refused["code"] == "cli.confirmation_required" and "--yes" in refused["message"]
    assert refused["hint"] == "pass --yes to confirm"
    with api_server.client(alice) as api:
        assert api.get_app("acme", "web").id == app["id"]  # nothing was deleted

    deleted = cli.ok("apps", "delete", "web", "--yes")
    assert deleted == {"org": "acme", "app": "web", "deleted": True}
    assert cli.fails(3, "apps", "show", "web")["code"] == "app.not_found"
    assert cli.fails(3, "apps", "delete", "web", "--yes")["code"] == "app.not_found"


def test_delete_asks_on_a_terminal(cli: Cli, alice: User, api_server: ApiServer) -> None:
    cli.use(alice)
    with api_server.client(alice) as api:
        api.create_app("acme", "asked")
        api.create_env("acme", "asked", "prod")
        declined = cli("apps", "delete", "asked", tty_input="n\n")
        assert declined.returncode == 1 and "Aborted." in declined.stderr
        assert "Delete app 'asked' in org 'acme' and its environments (prod)?" in (declined.stderr)
        assert api.get_app("acme", "asked").envs == ["prod"]
        accepted = cli("apps", "delete", "asked", tty_input="y\n")
        assert accepted.returncode == 0 and "Deleted app asked" in accepted.stdout
        with pytest.raises(ApiNotFound):
            api.get_app("acme", "asked")


def test_envs_create_list_delete(cli: Cli, alice: User, api_server: ApiServer) -> None:
    cli.use(alice, app="shop")
    with api_server.client(alice) as api:
        api.create_app("acme", "shop")
        api.create_env("acme", "shop", "prod")
    env = cli.ok("envs", "create", "staging")
    assert set(env) == {"app", "name", "created_at"}
    assert (env["app"], env["name"]) == ("shop", "staging")
    assert cli.ok("envs", "create", "staging") == env
    assert "already exists" in cli("envs", "create", "staging").stdout
    assert [e["name"] for e in cli.ok("envs", "list")] == ["prod", "staging"]

    refused = cli.fails(2, "envs", "delete", "staging")
    assert refused["detail"] == {"flag": "--yes"}
    with api_server.client(alice) as api:
        assert api.get_app("acme", "shop").envs == ["prod", "staging"]
    assert cli.ok("envs", "delete", "staging", "--yes") == {
        "org": "acme",
        "app": "shop",
        "env": "staging",
        "deleted": True,
    }
    assert [e["name"] for e in cli.ok("envs", "list", "--app", "shop")] == ["prod"]
    assert cli.fails(3, "envs", "delete", "staging", "--yes")["code"] == "env.not_found"
    assert cli.fails(3, "envs", "list", "--app", "nope")["code"] == "app.not_found"


def test_tokens_create_list_revoke(cli: Cli, alice: User, api_server: ApiServer) -> None:
    cli.use(alice)
    with api_server.client(alice) as api:
        api.create_app("acme", "api")
        api.create_app("acme", "other")
    created = cli.ok(
        "tokens",
        "create",
        "--name",
        "ci",
        "--org",
        "acme",
        "--app",
        "api",
        "--capability",
        "deploy",
        "--expires-in-days",
        "30",
    )
    assert tokens.looks_valid(created["token"])
    assert created["name"] == "ci" and created["kind"] == "pat"
    assert created["scope"] == {"org": "acme", "app": "api", "env": None}
    assert created["capabilities"] == ["deploy", "read"]
    assert created["hint"] == created["token"][-4:]
    assert created["expires_at"] is not None and created["revoked_at"] is None

    listed = {t["id"]: t for t in cli.ok("tokens", "list")}
    assert {alice.token_id, created["id"]} <= set(listed)
    assert listed[created["id"]] == {k: v for k, v in created.items() if k != "token"}

    as_ci = {"EMBER_API_TOKEN": created["token"]}
    assert cli.ok("apps", "show", "api", env=as_ci)["name"] == "api"
    # The app-scoped token sees its org but none of the org's other apps ...
    assert cli.fails(3, "apps", "show", "other", env=as_ci)["code"] == "app.not_found"
    # ... and cannot make a token wider than itself.
    error = cli.fails(5, "tokens", "create", "--name", "wider", env=as_ci)
    assert error["code"] == "auth.forbidden"

    plain = cli("tokens", "create", "--name", "once")
    assert plain.returncode == 0 and tokens.looks_valid(plain.stdout.strip())
    assert "shown once" in plain.stderr

    refused = cli.fails(2, "tokens", "revoke", created["id"])
    assert refused["code"] == "cli.confirmation_required"
    assert cli.ok("whoami", env=as_ci)["token"]["id"] == created["id"]  # still works
    revoked = cli.ok("tokens", "revoke", created["id"], "--yes")
    assert revoked == {"id": created["id"], "revoked": True}
    assert cli.ok("tokens", "revoke", created["id"], "--yes") == revoked  # idempotent
    assert cli.fails(5, "whoami", env=as_ci)["code"] == "auth.unauthorized"
    listed = {t["id"]: t for t in cli.ok("tokens", "list")}
    assert listed[created["id"]]["revoked_at"] is not None
    assert cli.fails(3, "tokens", "revoke", "tok_nope", "--yes")["code"] == "token.not_found"


def test_bad_input_exits_2_naming_the_field(cli: Cli, alice: User) -> None:
    cli.use(alice)
    # No org anywhere: a token and URL from the environment, and no config file.
    no_org = {
        "EMBER_API_TOKEN": alice.token,
        "EMBER_API_URL": cli.api_url,
        "EMBER_CONFIG": str(cli.cwd / "absent.toml"),
    }
    (
        bad_app,
        plain,
        long_env,
        bad_flag,
        bad_var,
        scope,
        long_token_name,
        usage,
        no_context,
        no_context_plain,
        no_app,
    ) = concurrently(
        lambda: cli.fails(2, "apps", "create", "Bad_Name"),
        lambda: cli("apps", "create", "Bad_Name"),
        lambda: cli.fails(2, "envs", "create", "a" * 21, "--app", "x"),
        lambda: cli.fails(2, "apps", "list", "--org", "Not An Org"),
        lambda: cli.fails(2, "apps", "list", env={"EMBER_ORG": "-x"}),
        # Checked by the server: a token scoped to an app needs its org.
        lambda: cli.fails(2, "tokens", "create", "--name", "t", "--app", "api"),
        lambda: cli.fails(2, "tokens", "create", "--name", "x" * 101),
        lambda: cli("apps", "create"),
        lambda: cli.fails(2, "apps", "list", env=no_org),
        lambda: cli("apps", "create", "x", env=no_org),
        lambda: cli.fails(2, "envs", "list", "--org", "acme", env=no_org),
    )
    assert bad_app["message"] == "invalid app name 'Bad_Name'"
    assert bad_app["detail"] == {"field": "name"} and "lowercase" in bad_app["hint"]
    assert plain.returncode == 2
    assert plain.stderr.startswith("Error: invalid app name 'Bad_Name'\nHint: use 1-40 characters")
    assert long_env["detail"] == {"field": "name"} and "env name" in long_env["message"]
    assert bad_flag["detail"] == {"field": "org", "source": "--org"}
    assert bad_var["detail"] == {"field": "org", "source": "EMBER_ORG"}
    assert scope["code"] == "validation.failed" and scope["detail"] == {"field": "scope"}
    assert long_token_name["detail"] == {"field": "name"}
    assert usage.returncode == 2 and "Missing argument 'NAME'" in usage.stderr

    assert no_context["code"] == "cli.context_missing"
    assert no_context["detail"]["field"] == "org"
    assert "--org" in no_context["hint"] and "EMBER_ORG" in no_context["hint"]
    assert no_context_plain.returncode == 2
    assert "Error: no organisation given" in no_context_plain.stderr
    assert "--org" in no_context_plain.stderr
    assert no_app["detail"]["field"] == "app" and "EMBER_APP" in no_app["hint"]


def test_context_precedence_flag_env_project_config(
    cli: Cli, alice: User, bob: User, api_server: ApiServer, tmp_path: Path
) -> None:
    with api_server.client(alice) as api:
        for name in ("p-flag", "p-env", "p-toml", "p-conf"):
            api.create_app("acme", name)
    cli.use(alice)
    stored = tomllib.loads(cli.config.read_text())
    cli.config.write_text(tomli_w.dumps({**stored, "app": "p-conf"}))
    project = tmp_path / "project"
    project.mkdir()
    (project / "ember.toml").write_text('app = "p-toml"\n')

    def shown(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        name: str = cli.ok("apps", "show", *args, env=env, cwd=cwd)["name"]
        return name

    assert concurrently(
        shown,
        lambda: shown(cwd=project),
        lambda: shown(cwd=project, env={"EMBER_APP": "p-env"}),
        lambda: shown("--app", "p-flag", cwd=project, env={"EMBER_APP": "p-env"}),
    ) == ["p-conf", "p-toml", "p-env", "p-flag"]

    globex = tmp_path / "globex"
    globex.mkdir()
    (globex / "ember.toml").write_text('org = "globex"\n')
    closed = {"EMBER_API_URL": f"http://127.0.0.1:{free_port()}"}
    by_var, by_flag, by_project, by_token, by_url = concurrently(
        # The org: EMBER_ORG beats the config file; --org beats EMBER_ORG; ember.toml
        # beats the config file.
        lambda: cli.fails(3, "apps", "list", env={"EMBER_ORG": "nope"}),
        lambda: cli.ok("apps", "list", "--org", "acme", env={"EMBER_ORG": "nope"}),
        lambda: cli.fails(3, "apps", "list", cwd=globex),
        # EMBER_API_TOKEN beats the stored login; EMBER_API_URL beats the stored URL.
        lambda: cli.ok("whoami", env={"EMBER_API_TOKEN": bob.token}),
        lambda: cli.fails(7, "whoami", env=closed),
    )
    assert by_var["detail"] == {"org": "nope"}
    assert {a["name"] for a in by_flag} >= {"p-flag", "p-env", "p-toml", "p-conf"}
    assert by_project["detail"] == {"org": "globex"}
    assert by_token["email"] == bob.email
    assert by_url["code"] == "api.unreachable"


def test_another_tenants_objects_are_not_found(
    cli: Cli, alice: User, bob: User, api_server: ApiServer
) -> None:
    with api_server.client(bob) as api:
        api.create_app("globex", "secret-app")
    cli.use(alice)
    shown, listed, deleted, env, taken = concurrently(
        lambda: cli.fails(3, "apps", "show", "secret-app", "--org", "globex"),
        lambda: cli.fails(3, "apps", "list", "--org", "globex"),
        lambda: cli.fails(3, "apps", "delete", "secret-app", "--org", "globex", "--yes"),
        lambda: cli.fails(3, "envs", "create", "prod", "--org", "globex", "--app", "secret-app"),
        # Taken by another user: creating it "again" is a conflict, not success.
        lambda: cli.fails(4, "orgs", "create", "globex"),
    )
    # Exactly as if globex did not exist: nothing says that it does.
    for error in (shown, listed, deleted, env):
        assert error.pop("request_id")
    assert shown == listed == deleted == env
    assert shown["code"] == "org.not_found" and shown["detail"] == {"org": "globex"}
    assert taken["code"] == "name.taken"
    with api_server.client(bob) as api:
        assert api.get_app("globex", "secret-app").envs == []


def test_orgs_list_and_create(cli: Cli, bob: User) -> None:
    cli.use(bob)
    orgs = cli.ok("orgs")
    assert [(o["name"], o["role"]) for o in orgs] == [("globex", "owner")]
    assert set(orgs[0]) == {"id", "name", "role", "created_at"}
    made = cli("orgs", "create", "initech")
    assert made.returncode == 0 and "Created org initech" in made.stdout
    again = cli("orgs", "create", "initech")
    assert again.returncode == 0 and "Org initech already exists" in again.stdout
    org = cli.ok("orgs", "create", "initech")
    assert (org["name"], org["role"]) == ("initech", "owner")
    assert [o["name"] for o in cli.ok("orgs", "list")] == ["globex", "initech"]

    # Two orgs now: a fresh login stores no default org, and says how to pick one.
    cli.config.unlink()
    human = cli("login", "--token", bob.token, "--api-url", cli.api_url)
    assert human.returncode == 0 and "--org" in human.stdout
    assert "org" not in tomllib.loads(cli.config.read_text())
    assert cli.fails(2, "apps", "list")["code"] == "cli.context_missing"


def test_human_output_is_a_table_and_help_lists_the_commands(cli: Cli, alice: User) -> None:
    cli.use(alice)
    listed = cli("tokens", "list")
    assert listed.returncode == 0 and "NAME" in listed.stdout and "..." in listed.stdout
    assert alice.token not in listed.stdout
    assert alice.token_id in listed.stdout  # whole, even when piped: scripts need the id
    top = cli("--help")
    for command in ("login", "logout", "whoami", "orgs", "apps", "envs", "tokens"):
        assert f"  {command} " in top.stdout


# -- the client library underneath, against the same real server ----------------------


def test_client_pages_members_and_typed_errors(
    api_server: ApiServer, alice: User, bob: User
) -> None:
    dave = api_server.admin("create-user", "--email", "dave@example.com")
    names = [f"pg-{i}" for i in range(5)]
    with api_server.client(alice) as api:
        made = [api.create_app("acme", n) for n in names]
        assert all(m.created for m in made)
        again = api.create_app("acme", "pg-0")
        assert not again.created and again.item == made[0].item

        everything = api.list_apps("acme")
        assert {a.name for a in everything} >= set(names)
        with Client(api_server.url, alice.token, page_size=2) as paged:
            assert paged.list_apps("acme") == everything  # followed next_cursor
            assert [o.name for o in paged.iter_orgs()] == ["acme"]

        member = api.set_member("acme", "dave@example.com", "viewer")
        assert (member.user_id, member.email, member.role) == (
            dave["user_id"],
            "dave@example.com",
            "viewer",
        )
        assert api.set_member("acme", "dave@example.com", "viewer") == member  # idempotent
        assert {m.email for m in api.list_members("acme")} == {alice.email, "dave@example.com"}
        api.remove_member("acme", dave["user_id"])
        assert [m.email for m in api.list_members("acme")] == [alice.email]

        with pytest.raises(ApiConflict) as taken:
            api.create_org("globex")
        assert isinstance(taken.value, Conflict) and taken.value.code == "name.taken"
        with pytest.raises(ApiNotFound) as missing:
            api.get_env("acme", "pg-1", "nope")
        assert missing.value.code == "env.not_found" and missing.value.request_id
        with pytest.raises(ApiUnauthorized):
            Client(api_server.url, tokens.generate()).whoami()

    # Every POST carried a fresh UUID4 Idempotency-Key, recorded by the server.
    with psycopg.connect(api_server.database_url) as conn:
        keys = [
            row[0]
            for row in conn.execute(
                "SELECT key FROM api_idempotency WHERE token_id = %s", (alice.token_id,)
            )
        ]
    assert len(keys) >= 8 and len(set(keys)) == len(keys)
    assert all(uuid.UUID(k).version == 4 for k in keys)
