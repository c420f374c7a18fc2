"""`ember routes` and `ember ips` with the real executable against a real API server
(`ember server api`, default pools: ports 10000-10999, IPv4 127.10.0.0/24) on a real
Postgres: create (idempotent), list, show, delete; bad input exits 2 naming the flag; a
conflict exits 4 without naming the other tenant; not found exits 3."""

from __future__ import annotations

import threading
import time

import pytest

from ember.client import Client
from ember.wire.routes import EdgeSnapshot
from tests.e2e.conftest import ApiServer, Cli, User, concurrently


def user_with_app(api_server: ApiServer, email: str, org: str) -> User:
    user = api_server.create_user(email, org)
    with api_server.client(user) as api:
        api.create_app(user.org, "shop")
        api.create_env(user.org, "shop", "prod")
    return user


@pytest.fixture(scope="module")
def dana(api_server: ApiServer) -> User:
    return user_with_app(api_server, "dana@example.com", "globex")


@pytest.fixture(scope="module")
def eve(api_server: ApiServer) -> User:
    return user_with_app(api_server, "eve@example.com", "hooli")


def test_tls_and_tcp_routes_create_list_show_delete(cli: Cli, dana: User) -> None:
    cli.use(dana, app="shop")
    tls = ("routes", "create", "--hostname", "shop.example.com", "--process", "web")
    route = cli.ok(*tls, "--backend-port", "8443", "--proxy-protocol", "v2")
    assert (route["kind"], route["hostname"], route["port"], route["proxy_protocol"]) == (
        "tls",
        "shop.example.com",
        443,
        "v2",
    )
    again = cli(*tls, "--backend-port", "8443", "--proxy-protocol", "v2")
    assert again.returncode == 0 and "exists already" in again.stdout, again.stderr
    assert cli.ok(*tls, "--backend-port", "8443", "--proxy-protocol", "v2") == route

    db = cli.ok(
        "routes", "create", "--tcp", "--port", "auto", "--process", "db", "--backend-port", "5432"
    )
    assert (db["kind"], db["port"], db["port_auto"], db["hostname"]) == ("tcp", 10000, True, None)

    listed, shown, human = concurrently(
        lambda: cli.ok("routes", "list"),
        lambda: cli.ok("routes", "show", "shop.example.com"),
        lambda: cli("routes", "list"),
    )
    assert [r["id"] for r in listed] == [route["id"], db["id"]]
    assert shown == route
    assert human.returncode == 0
    assert "shop.example.com" in human.stdout and "0.0.0.0:10000" in human.stdout

    deleted = cli.ok("routes", "delete", route["id"], "--yes")
    assert deleted == {"route": route["id"], "deleted": True}
    missing = cli.fails(3, "routes", "show", route["id"])
    assert missing["code"] == "edge_route.not_found"
    assert cli.fails(3, "routes", "delete", "shop.example.com", "--yes")["code"] == (
        "edge_route.not_found"
    )
    refused = cli("routes", "delete", db["id"])  # no terminal to ask: --yes is needed
    assert refused.returncode == 2 and "--yes" in refused.stderr


def test_bad_input_exits_2_naming_the_flag_and_sends_nothing(cli: Cli, dana: User) -> None:
    cli.use(dana, app="shop")
    before = cli.ok("routes", "list")
    web = ("routes", "create", "--process", "web", "--backend-port", "8443")
    cases = [
        ((*web, "--hostname", "*.example.com"), "--hostname"),
        ((*web, "--hostname", "example.com."), "--hostname"),
        ((*web,), "--hostname"),
        ((*web, "--tcp", "--hostname", "db.example.com"), "--hostname"),
        ((*web, "--hostname", "a.example.com", "--port", "0"), "--port"),
        ((*web, "--hostname", "a.example.com", "--port", "many"), "--port"),
        ((*web, "--hostname", "a.example.com", "--port", "auto"), "--port"),
        (
            (
                "routes",
                "create",
                "--hostname",
                "a.example.com",
                "--process",
                "web",
                "--backend-port",
                "x",
            ),
            "--backend-port",
        ),
        ((*web, "--hostname", "a.example.com", "--proxy-protocol", "v1"), "--proxy-protocol"),
        ((*web, "--hostname", "a.example.com", "--ip", "nowhere"), "--ip"),
        ((*web, "--hostname", "a.example.com", "--process", "Web!"), "--process"),
        # Checked by the server (the pool is its configuration), named the same way.
        ((*web, "--tcp", "--port", "80"), "--port"),
        ((*web, "--hostname", "a.example.com", "--port", "8443"), "--port"),
    ]
    results = concurrently(*(lambda args=args: cli.fails(2, *args) for args, _ in cases))
    for (args, flag), err in zip(cases, results, strict=True):
        assert err["detail"]["flag"] == flag, (args, err)
        assert err["message"].startswith(flag), (args, err)
    assert cli.ok("routes", "list") == before


def test_conflicts_exit_4_without_naming_the_other_tenant(cli: Cli, dana: User, eve: User) -> None:
    cli.use(dana, app="shop")
    cli.ok(
        "routes",
        "create",
        "--hostname",
        "owned.example.com",
        "--process",
        "web",
        "--backend-port",
        "8443",
    )
    port = cli.ok(
        "routes", "create", "--tcp", "--port", "10500", "--process", "db", "--backend-port", "5432"
    )
    assert port["port"] == 10500
    cli.use(eve, app="shop")
    hostname, tcp = concurrently(
        lambda: cli.fails(
            4,
            "routes",
            "create",
            "--hostname",
            "owned.example.com",
            "--process",
            "web",
            "--backend-port",
            "8443",
        ),
        lambda: cli.fails(
            4,
            "routes",
            "create",
            "--tcp",
            "--port",
            "10500",
            "--process",
            "db",
            "--backend-port",
            "5432",
        ),
    )
    assert hostname["code"] == "hostname.taken" and tcp["code"] == "route.port_in_use"
    for err in (hostname, tcp):
        assert "already in use" in err["message"]
        assert dana.org not in str(err) and port["id"] not in str(err)
    human = cli(
        "routes",
        "create",
        "--hostname",
        "owned.example.com",
        "--process",
        "web",
        "--backend-port",
        "8443",
    )
    assert human.returncode == 4 and "Hint:" in human.stderr
    assert cli.ok("routes", "list") == []


def test_dedicated_ipv4_allocate_bind_release(cli: Cli, eve: User) -> None:
    cli.use(eve, app="shop")
    ip = cli.ok("ips", "allocate-v4")
    assert ip["billing"] == "dedicated_ipv4" and ip["family"] == "ipv4"
    assert ip["address"].startswith("127.10.0.")
    human = cli("ips", "list")
    assert human.returncode == 0 and ip["address"] in human.stdout
    assert "dedicated_ipv4" in human.stdout
    route = cli.ok(
        "routes",
        "create",
        "--tcp",
        "--process",
        "db",
        "--backend-port",
        "5432",
        "--ip",
        ip["address"],
    )
    assert (route["address"], route["dedicated"], route["port"]) == (ip["address"], True, 10000)
    assert cli.ok("ips", "list")[0]["routes"] == 1
    in_use = cli.fails(4, "ips", "release", ip["address"], "--yes")
    assert in_use["code"] == "ipv4.in_use"
    cli.ok("routes", "delete", route["id"], "--yes")
    released = cli.ok("ips", "release", ip["address"], "--yes")
    assert released == {"org": eve.org, "address": ip["address"], "released": True}
    assert cli.fails(3, "ips", "release", ip["address"], "--yes")["code"] == "ipv4.not_found"
    assert cli.fails(2, "ips", "release", "bogus", "--yes")["detail"]["field"] == "ADDRESS"
    assert cli.ok("ips", "list") == []


def test_an_edge_long_polls_the_real_server(api_server: ApiServer, dana: User) -> None:
    """The edge's client against uvicorn: the long-poll answers when a route is created
    (the API folds the views on the log's notification, no controller runs here)."""
    api_server.admin("grant-operator", dana.email)
    with Client(api_server.url, dana.token) as edge, api_server.client(dana) as user:
        first = edge.edge_snapshot()
        answers: list[tuple[float, EdgeSnapshot]] = []

        def poll() -> None:
            snapshot = edge.edge_snapshot(after=first.cursor, wait=20)
            answers.append((time.monotonic(), snapshot))

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.3)
        assert not answers
        route = user.create_route(
            dana.org, "shop", "prod", hostname="poll.example.com", process="web", backend_port=8443
        ).item
        created = time.monotonic()
        poller.join(25)
        done, snapshot = answers[0]
        assert 0 < done - created < 15, "answered only when the wait ran out"
        core = snapshot.to_core()
        assert route.id in {r.route_id for r in core.routes}
        assert core.cursor != first.cursor
