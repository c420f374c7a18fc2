"""Routes, dedicated IPv4 addresses and the edge's snapshot through the HTTP API on real
Postgres: TLS (SNI) and TCP routes, auto ports, uniqueness across and within tenants
without leaking the other tenant, bad input (4xx naming the field, nothing written),
authorisation, the IPv4 pool, and the edge's snapshot with backends and its long-poll.

The API runs with a small port pool (10000-10004) and IPv4 pool (127.10.0.0/30: two
addresses), so exhaustion is cheap to reach.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ember.api.app import ApiSettings, create_app
from ember.core import ipv4
from ember.core.routes import RoutingConfig
from ember.core.tenancy import Capability
from ember.wire.routes import EdgeSnapshot
from tests.support.api import Api, Tenant
from tests.support.hosts import operator_token, place

CONFIG = RoutingConfig(tcp_ports=(10000, 10004), ipv4_pool=ipv4.parse_pool("127.10.0.0/30"))
DIGEST = "sha256:" + "1" * 64


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    app = create_app(ApiSettings(database_url, routing=CONFIG))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, app, database_url)


@pytest.fixture
def tenant(api: Api) -> Tenant:
    t = api.tenant("acme")
    deploy(api, t)
    return t


def deploy(api: Api, t: Tenant) -> None:
    manifest = (
        f'schema_version = 1\napp = "{t.app}"\n[processes]\n'
        'web = "httpd -f -p 8443"\ndb = "postgres"\n'
    )
    api.call(
        "POST",
        f"{base(t)}/releases",
        t.token,
        201,
        {"image": {"repository": f"{t.org}/{t.app}", "digest": DIGEST}, "manifest": manifest},
    )


def base(t: Tenant, env: str | None = None) -> str:
    return f"/v1/orgs/{t.org}/apps/{t.app}/envs/{env or t.env}"


def create(
    api: Api,
    t: Tenant,
    expect: int = 201,
    token: str | None = None,
    env: str | None = None,
    **body: Any,
) -> Any:
    return api.call("POST", base(t, env) + "/routes", token or t.token, expect, body)


def tls(hostname: str = "api.example.com", **extra: Any) -> dict[str, Any]:
    return {"hostname": hostname, "process": "web", "backend_port": 8443, **extra}


def tcp(**extra: Any) -> dict[str, Any]:
    return {"kind": "tcp", "process": "db", "backend_port": 5432, **extra}


def routes_view(api: Api) -> list[tuple[Any, ...]]:
    return [
        tuple(r.values())
        for r in api.svc.query(
            "SELECT kind, address, port, hostname FROM view_routes ORDER BY port, hostname", []
        )
    ]


# -- TLS and TCP routes ----------------------------------------------------------------------


def test_tls_route_create_list_show_delete(api: Api, tenant: Tenant) -> None:
    route = create(api, tenant, **tls(hostname="API.Example.com", proxy_protocol="v2"))
    assert route["id"].startswith("rt_")
    assert {k: v for k, v in route.items() if k not in ("id", "created_at")} == {
        "app": tenant.app,
        "env": tenant.env,
        "kind": "tls",
        "hostname": "api.example.com",
        "address": "0.0.0.0",
        "dedicated": False,
        "port": 443,
        "port_auto": False,
        "process": "web",
        "backend_port": 8443,
        "proxy_protocol": "v2",
    }
    # The same route again: 200, the same route, nothing written.
    events = api.event_count()
    again = create(api, tenant, 200, **tls(proxy_protocol="v2"))
    assert again == route and api.event_count() == events

    listed = api.call("GET", base(tenant) + "/routes", tenant.token, 200)
    assert listed == {"items": [route], "next_cursor": None}
    assert api.call("GET", f"{base(tenant)}/routes/{route['id']}", tenant.token, 200) == route
    claims = api.svc.query("SELECT hostname, org_id, verification FROM view_hostname_claims", [])
    assert claims == [
        {"hostname": "api.example.com", "org_id": tenant.org_id, "verification": "none"}
    ]

    api.call("DELETE", f"{base(tenant)}/routes/{route['id']}", tenant.token, 204)
    gone = api.call("GET", f"{base(tenant)}/routes/{route['id']}", tenant.token, 404)
    assert gone["error"]["code"] == "edge_route.not_found"
    again_gone = api.call("DELETE", f"{base(tenant)}/routes/{route['id']}", tenant.token, 404)
    assert again_gone["error"]["code"] == "edge_route.not_found"
    assert api.call("GET", base(tenant) + "/routes", tenant.token, 200)["items"] == []
    # The org's last route on the name released its claim: another org may take it now.
    assert api.svc.query("SELECT * FROM view_hostname_claims", []) == []
    other = api.tenant("other")
    deploy(api, other)
    create(api, other, **tls())


def test_tls_hostnames_share_a_port_and_a_hostname_can_use_several_ports(
    api: Api, tenant: Tenant
) -> None:
    a = create(api, tenant, **tls("a.example.com"))
    b = create(api, tenant, **tls("b.example.com"))
    c = create(api, tenant, **tls("a.example.com", port=10003))
    assert (a["port"], b["port"], c["port"]) == (443, 443, 10003)
    assert routes_view(api) == [
        ("tls", "0.0.0.0", 443, "a.example.com"),
        ("tls", "0.0.0.0", 443, "b.example.com"),
        ("tls", "0.0.0.0", 10003, "a.example.com"),
    ]
    # A TLS port stays a TLS port: TCP cannot take it, and auto skips it.
    refused = create(api, tenant, 409, **tcp(port=10003))
    assert refused["error"]["code"] == "route.port_in_use"
    assert refused["error"]["detail"]["field"] == "port"
    ports = [create(api, tenant, **tcp(backend_port=5000 + i))["port"] for i in range(4)]
    assert ports == [10000, 10001, 10002, 10004]
    full = create(api, tenant, 409, **tcp(backend_port=6000))
    assert full["error"]["code"] == "route.no_free_port"
    assert full["error"]["detail"]["pool"] == "10000-10004"


def test_tcp_routes_auto_explicit_and_idempotent(api: Api, tenant: Tenant) -> None:
    first = create(api, tenant, **tcp(port="auto"))
    assert (first["kind"], first["port"], first["port_auto"], first["hostname"]) == (
        "tcp",
        10000,
        True,
        None,
    )
    # The same request again (auto: any port) answers the same route.
    events = api.event_count()
    assert create(api, tenant, 200, **tcp()) == first
    assert create(api, tenant, 200, **tcp(port=10000)) == first
    assert api.event_count() == events
    explicit = create(api, tenant, **tcp(port=10003, backend_port=5433))
    assert (explicit["port"], explicit["port_auto"]) == (10003, False)
    taken = create(api, tenant, 409, **tcp(port=10003, backend_port=9999))
    assert taken["error"]["code"] == "route.port_in_use"
    second = create(api, tenant, **tcp(backend_port=5434))
    assert second["port"] == 10001
    # A deleted route's port is the lowest free one again.
    api.call("DELETE", f"{base(tenant)}/routes/{first['id']}", tenant.token, 204)
    assert create(api, tenant, **tcp(backend_port=5435))["port"] == 10000
    listeners = api.svc.query("SELECT port, kind FROM view_listeners ORDER BY port", [])
    assert [(r["port"], r["kind"]) for r in listeners] == [
        (10000, "tcp"),
        (10001, "tcp"),
        (10003, "tcp"),
    ]


def test_routes_before_the_first_deploy_accept_any_process(api: Api) -> None:
    t = api.tenant("early")
    route = create(api, t, **tls(process="api"))
    assert route["process"] == "api"


# -- conflicts -------------------------------------------------------------------------------


def test_conflicts_across_tenants_are_409_and_name_nobody(api: Api, tenant: Tenant) -> None:
    mine = create(api, tenant, **tls())
    port = create(api, tenant, **tcp(port=10002))
    other = api.tenant("rival")
    deploy(api, other)
    events = api.event_count()
    for body, code in (
        (tls(), "hostname.taken"),
        (tls(port=10003), "hostname.taken"),  # the name is the org's, on any port
        (tls("API.EXAMPLE.COM"), "hostname.taken"),
        (tcp(port=10002), "route.port_in_use"),
        (tls("b.example.com", port=10002), "route.port_in_use"),
    ):
        body_ = create(api, other, 409, **body)
        assert body_["error"]["code"] == code, body
        text = str(body_)
        for secret in (tenant.org, tenant.app, tenant.org_id, mine["id"], port["id"]):
            assert secret not in text, (body, text)
        assert "route_id" not in body_["error"]["detail"]
        assert "already in use" in body_["error"]["message"]
    assert api.event_count() == events
    # The rival's own routes elsewhere still work.
    assert create(api, other, **tls("rival.example.com"))["port"] == 443


def test_conflicts_within_a_tenant_name_the_route_in_the_same_env(api: Api, tenant: Tenant) -> None:
    route = create(api, tenant, **tls())
    events = api.event_count()
    same_env = create(api, tenant, 409, **tls(backend_port=9443))
    assert same_env["error"]["code"] == "route.conflict"
    assert same_env["error"]["detail"]["route_id"] == route["id"]
    assert route["id"] in same_env["error"]["hint"]
    # Another env of the same app: the binding is taken, but not by a route seen here.
    api.call(
        "POST",
        f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs",
        tenant.token,
        201,
        {"name": "staging"},
    )
    staging = create(api, tenant, 409, env="staging", **tls())
    assert staging["error"]["code"] == "route.conflict"
    assert "route_id" not in staging["error"]["detail"]
    assert api.event_count() == events + 1  # only env.created
    # The org's hostname on another port of the same env is fine.
    assert create(api, tenant, env="staging", **tls(port=10001))["port"] == 10001


def test_racing_identical_creates_make_one_route(api: Api, tenant: Tenant) -> None:
    results: list[Any] = []

    def go() -> None:
        r = api.client.post(base(tenant) + "/routes", json=tcp(), headers=tenant.headers)
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(s for s, _ in results) == [200, 200, 200, 201]
    assert len({body["id"] for _, body in results}) == 1
    assert api.scalar("SELECT count(*) FROM view_routes") == 1


# -- bad input, authorisation ----------------------------------------------------------------


def test_bad_input_names_the_field_and_writes_nothing(api: Api, tenant: Tenant) -> None:
    events = api.event_count()
    long_name = ".".join(["a" * 63] * 4) + ".com"
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        (tls("Bad_Name.example.com"), 422, "route.invalid", "hostname"),
        (tls("*.example.com"), 422, "route.invalid", "hostname"),
        (tls("example.com."), 422, "route.invalid", "hostname"),
        (tls("localhost"), 422, "route.invalid", "hostname"),
        (tls("10.0.0.1"), 422, "route.invalid", "hostname"),
        (tls("-a.example.com"), 422, "route.invalid", "hostname"),
        (tls("bücher.example"), 422, "route.invalid", "hostname"),
        (tls(long_name), 422, "route.invalid", "hostname"),
        ({"process": "web", "backend_port": 8443}, 422, "route.invalid", "hostname"),
        (tcp(hostname="db.example.com"), 422, "route.invalid", "hostname"),
        (tls(port=0), 422, "route.invalid", "port"),
        (tls(port=70000), 422, "route.invalid", "port"),
        (tls(port=8443), 422, "route.invalid", "port"),
        (tls(port="auto"), 422, "route.invalid", "port"),
        (tcp(port=443), 422, "route.invalid", "port"),
        (tcp(port=10005), 422, "route.invalid", "port"),
        (tls(backend_port=0), 422, "route.invalid", "backend_port"),
        (tls(backend_port=65536), 422, "route.invalid", "backend_port"),
        (tls(process="Web!"), 422, "route.invalid", "process"),
        (tls(process="worker"), 404, "process.not_found", "process"),
        (tls(ip="not-an-ip"), 422, "route.invalid", "ip"),
        (tls(ip="::1"), 422, "route.invalid", "ip"),
        (tls(ip="127.10.0.1"), 404, "ipv4.not_found", "ip"),
    ]
    for body, status, code, field in cases:
        err = create(api, tenant, status, **body)["error"]
        assert (err["code"], err["detail"].get("field")) == (code, field), body
    for body, loc in (
        (tls(proxy_protocol="v1"), "body.proxy_protocol"),
        (tls(kind="udp"), "body.kind"),
        (tls(port="any"), "body.port"),
        ({"hostname": "a.example.com", "backend_port": 1}, "body.process"),
        (tls(extra=1), "body.extra"),
    ):
        err = create(api, tenant, 422, **body)["error"]
        assert err["code"] == "request.invalid"
        assert any(e["loc"].startswith(loc) for e in err["detail"]["errors"]), (body, err)
    assert api.event_count() == events
    assert api.scalar("SELECT count(*) FROM view_routes") == 0


def test_reads_need_read_writes_need_deploy_and_other_tenants_see_nothing(
    api: Api, tenant: Tenant
) -> None:
    route = create(api, tenant, **tls())
    viewer = api.mint(tenant.add_member("viewer@example.com", "viewer"))
    reader = api.mint(tenant.user_id, caps=frozenset({Capability.READ}))
    other = api.tenant("other")
    path = f"{base(tenant)}/routes/{route['id']}"
    events = api.event_count()
    for token in (viewer, reader):
        assert (
            create(api, tenant, 403, token=token, **tls("b.example.com"))["error"]["code"]
            == "auth.forbidden"
        )
        assert api.call("DELETE", path, token, 403)["error"]["code"] == "auth.forbidden"
        assert api.call("GET", path, token, 200)["id"] == route["id"]
        assert len(api.call("GET", base(tenant) + "/routes", token, 200)["items"]) == 1
    for method, url, body in (
        ("GET", base(tenant) + "/routes", None),
        ("POST", base(tenant) + "/routes", tls("c.example.com")),
        ("GET", path, None),
        ("DELETE", path, None),
    ):
        assert api.call(method, url, other.token, 404, body)["error"]["code"] == "org.not_found"
    # Another tenant's route id in one's own environment is just a missing route.
    deploy(api, other)
    theirs = f"{base(other)}/routes/{route['id']}"
    assert api.call("GET", theirs, other.token, 404)["error"]["code"] == "edge_route.not_found"
    assert api.call("DELETE", theirs, other.token, 404)["error"]["code"] == "edge_route.not_found"
    assert api.event_count() == events + 2  # only the other tenant's deploy
    assert api.call("GET", path, tenant.token, 200)["id"] == route["id"]


# -- dedicated IPv4 --------------------------------------------------------------------------


def ips(t: Tenant) -> str:
    return f"/v1/orgs/{t.org}/ips"


def test_dedicated_ipv4_allocate_list_release(api: Api, tenant: Tenant) -> None:
    first = api.call("POST", ips(tenant), tenant.token, 201, {"family": "ipv4"})
    assert {k: v for k, v in first.items() if k != "allocated_at"} == {
        "address": "127.10.0.1",
        "family": "ipv4",
        "org": tenant.org,
        "billing": "dedicated_ipv4",
        "routes": 0,
    }
    other = api.tenant("other")
    deploy(api, other)
    second = api.call("POST", ips(other), other.token, 201, {})
    assert second["address"] == "127.10.0.2"
    events = api.event_count()
    exhausted = api.call("POST", ips(tenant), tenant.token, 409, {})
    assert exhausted["error"]["code"] == "ipv4.pool_exhausted"
    assert "127.10.0.2" not in str(exhausted) and other.org not in str(exhausted)
    assert api.event_count() == events

    listed = api.call("GET", ips(tenant), tenant.token, 200)
    assert [i["address"] for i in listed["items"]] == ["127.10.0.1"]
    # Routes on the dedicated address; the ports of the shared address are another matter.
    tcp_route = create(api, tenant, **tcp(ip="127.10.0.1"))
    shared = create(api, tenant, **tcp(backend_port=5433))
    assert (tcp_route["address"], tcp_route["dedicated"], tcp_route["port"]) == (
        "127.10.0.1",
        True,
        10000,
    )
    assert (shared["address"], shared["port"]) == ("0.0.0.0", 10000)
    tls_route = create(api, tenant, **tls(ip="127.10.0.1"))
    assert (tls_route["address"], tls_route["port"]) == ("127.10.0.1", 443)
    assert api.call("GET", ips(tenant), tenant.token, 200)["items"][0]["routes"] == 2

    # Another org's address is refused like a missing one, to use and to release.
    theirs = create(api, other, 404, **tcp(ip="127.10.0.1"))["error"]
    assert (theirs["code"], theirs["detail"]["field"]) == ("ipv4.not_found", "ip")
    assert api.call("DELETE", ips(other) + "/127.10.0.1", other.token, 404)["error"]["code"] == (
        "ipv4.not_found"
    )
    assert (
        api.call("DELETE", ips(tenant) + "/127.10.0.2", tenant.token, 404)["error"]["code"]
        == "ipv4.not_found"
    )
    assert api.call("DELETE", ips(tenant) + "/nonsense", tenant.token, 404)["error"]["code"] == (
        "ipv4.not_found"
    )
    in_use = api.call("DELETE", ips(tenant) + "/127.10.0.1", tenant.token, 409)["error"]
    assert (in_use["code"], in_use["detail"]["routes"]) == ("ipv4.in_use", 2)

    for r in (tcp_route, tls_route):
        api.call("DELETE", f"{base(tenant)}/routes/{r['id']}", tenant.token, 204)
    api.call("DELETE", ips(tenant) + "/127.10.0.1", tenant.token, 204)
    assert api.call("GET", ips(tenant), tenant.token, 200)["items"] == []
    api.call("DELETE", ips(tenant) + "/127.10.0.1", tenant.token, 404)
    # Back in the pool: the next allocation gets it (a new allocation, fresh listeners).
    again = api.call("POST", ips(other), other.token, 201, {})
    assert again["address"] == "127.10.0.1"
    assert create(api, other, **tcp(ip="127.10.0.1"))["port"] == 10000


def test_ip_allocation_needs_admin_and_reading_needs_read(api: Api, tenant: Tenant) -> None:
    deployer = api.mint(tenant.add_member("dev@example.com", "deployer"))
    events = api.event_count()
    refused = api.call("POST", ips(tenant), deployer, 403, {})
    assert refused["error"]["code"] == "auth.forbidden"
    api.call("POST", ips(tenant), tenant.token, 201, {})
    events = api.event_count()
    assert api.call("DELETE", ips(tenant) + "/127.10.0.1", deployer, 403)["error"]["code"] == (
        "auth.forbidden"
    )
    assert len(api.call("GET", ips(tenant), deployer, 200)["items"]) == 1
    # A deployer may bind the org's address.
    assert create(api, tenant, token=deployer, **tcp(ip="127.10.0.1"))["dedicated"] is True
    assert api.event_count() > events
    other = api.tenant("other")
    assert api.call("GET", ips(tenant), other.token, 404)["error"]["code"] == "org.not_found"
    assert api.call("POST", ips(tenant), other.token, 404, {})["error"]["code"] == "org.not_found"


# -- instance addresses and the edge's snapshot ---------------------------------------------


def report(api: Api, op: str, instance_id: str, expect: int = 202, **body: Any) -> Any:
    return api.call("POST", f"/v1/instances/{instance_id}/reports", op, expect, body)


def healthy(api: Api, op: str, t: Tenant, instance_id: str, address: str | None) -> None:
    place(api, "h1", instance_id, app_id=t.app_id, env=t.env)
    report(api, op, instance_id, host_id="h1", state="starting", address=address)
    report(api, op, instance_id, host_id="h1", state="healthy")


def test_reports_carry_the_instance_address(api: Api, tenant: Tenant) -> None:
    op = operator_token(api)
    place(api, "h1", "ins_a", app_id=tenant.app_id, env=tenant.env)
    events = api.event_count()
    for body, field in (
        ({"state": "starting", "address": "not-an-ip"}, "address"),
        ({"state": "starting", "address": "fe80::1%eth0"}, "address"),
        ({"state": "starting", "address": "::"}, "address"),
        ({"state": "failed", "address": "10.0.0.1"}, "address"),
    ):
        err = report(api, op, "ins_a", 422, host_id="h1", **body)["error"]
        assert (err["code"], err["detail"]["field"]) == ("instance.invalid_report", field)
    assert api.event_count() == events
    report(api, op, "ins_a", host_id="h1", state="starting", address="FD00:0:1::A")
    assert api.scalar("SELECT address FROM view_instances WHERE instance_id = 'ins_a'") == (
        "fd00:0:1::a"
    )
    report(api, op, "ins_a", host_id="h1", state="healthy")  # keeps the address
    report(api, op, "ins_a", host_id="h1", state="unhealthy")
    report(api, op, "ins_a", host_id="h1", state="healthy", address="10.1.2.3")
    row = api.svc.query("SELECT state, address FROM view_instances", [])[0]
    assert row == {"state": "healthy", "address": "10.1.2.3"}
    data = api.svc.log.read_stream("instance-ins_a")[0].data
    assert data == {"instance_id": "ins_a", "host_id": "h1", "address": "fd00:0:1::a"}


def test_edge_snapshot_has_routes_with_their_healthy_backends(api: Api, tenant: Tenant) -> None:
    op = operator_token(api)
    web = create(api, tenant, **tls(proxy_protocol="v2"))
    db = create(api, tenant, **tcp())
    healthy(api, op, tenant, "ins_b", "fd00::b")
    healthy(api, op, tenant, "ins_a", "fd00::a")
    healthy(api, op, tenant, "ins_none", None)  # no address reported: not reachable
    place(api, "h1", "ins_starting", app_id=tenant.app_id, env=tenant.env)
    report(api, op, "ins_starting", host_id="h1", state="starting", address="fd00::c")
    healthy(api, op, tenant, "ins_sick", "fd00::d")
    report(api, op, "ins_sick", host_id="h1", state="unhealthy")

    body = api.call("GET", "/v1/edge/snapshot", op, 200)
    snap = EdgeSnapshot.model_validate(body).to_core()
    assert snap.cursor == body["cursor"] and snap.cursor != "0-0"
    by_id = {r.route_id: r for r in snap.routes}
    assert [r.route_id for r in snap.routes] == [web["id"], db["id"]]  # by listener
    web_route = by_id[web["id"]]
    assert (web_route.kind, web_route.address, web_route.port, web_route.hostname) == (
        "tls",
        "0.0.0.0",
        443,
        "api.example.com",
    )
    assert (web_route.process, web_route.backend_port, web_route.proxy_protocol) == (
        "web",
        8443,
        "v2",
    )
    assert web_route.org_id == tenant.org_id and web_route.app_id == tenant.app_id
    assert [(b.instance_id, b.address, b.port, b.healthy) for b in web_route.backends] == [
        ("ins_a", "fd00::a", 8443, True),
        ("ins_b", "fd00::b", 8443, True),
    ]
    assert by_id[db["id"]].backends == ()  # no instance of db runs
    assert snap.listeners() == {
        ("0.0.0.0", 443): (web_route,),
        ("0.0.0.0", 10000): (by_id[db["id"]],),
    }
    assert body["settings"]["inspect_timeout_ms"] == 5000

    # Operators only: a tenant's token is refused, nothing to hide.
    refused = api.call("GET", "/v1/edge/snapshot", tenant.token, 403)
    assert refused["error"]["code"] == "auth.forbidden"
    # A route of a deleted environment is not served.
    api.call(
        "DELETE", f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs/{tenant.env}", tenant.token, 204
    )
    assert api.call("GET", "/v1/edge/snapshot", op, 200)["routes"] == []


def test_edge_long_poll_answers_when_a_route_changes(api: Api, tenant: Tenant) -> None:
    op = operator_token(api)
    first = api.call("GET", "/v1/edge/snapshot", op, 200)
    assert first["routes"] == []

    # Nothing changes: the wait runs out, with the same routes.
    started = time.monotonic()
    idle = api.call("GET", f"/v1/edge/snapshot?after={first['cursor']}&wait=0.3", op, 200)
    assert time.monotonic() - started >= 0.3
    assert idle["routes"] == [] and idle["cursor"] == first["cursor"]

    answers: list[tuple[float, Any]] = []

    def poll() -> None:
        r = api.client.get(
            f"/v1/edge/snapshot?after={first['cursor']}&wait=20",
            headers={"Authorization": f"Bearer {op}"},
        )
        answers.append((time.monotonic(), r))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)
    assert not answers, "the long-poll answered before anything changed"
    route = create(api, tenant, **tls())
    created_at = time.monotonic()
    poller.join(25)
    assert answers, "the long-poll did not answer"
    done, response = answers[0]
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["route_id"] for r in body["routes"]] == [route["id"]]
    assert body["cursor"] != first["cursor"]
    assert done - created_at < 15, "answered only when the wait ran out"

    # An event that changes nothing the edge serves (a new token) does not wake it: the
    # answer comes when the wait runs out, with the same routes.
    started = time.monotonic()

    def unrelated_poll() -> None:
        r = api.client.get(
            f"/v1/edge/snapshot?after={body['cursor']}&wait=0.8",
            headers={"Authorization": f"Bearer {op}"},
        )
        answers.append((time.monotonic(), r))

    waiting = threading.Thread(target=unrelated_poll)
    waiting.start()
    time.sleep(0.1)
    api.call("POST", "/v1/tokens", tenant.token, 201, {"name": "unrelated"})
    waiting.join(10)
    done, unchanged = answers[1]
    assert done - started >= 0.8
    assert unchanged.json()["routes"] == body["routes"]

    # An old cursor answers at once; so does one this log never reached.
    for after in (first["cursor"], "99999999999-1"):
        started = time.monotonic()
        now = api.call("GET", f"/v1/edge/snapshot?after={after}&wait=20", op, 200)
        assert time.monotonic() - started < 15
        assert [r["route_id"] for r in now["routes"]] == [route["id"]]
    bad = api.call("GET", "/v1/edge/snapshot?after=yesterday&wait=1", op, 422)
    assert bad["error"]["code"] == "request.invalid"
    api.call("GET", f"/v1/edge/snapshot?after={first['cursor']}&wait=31", op, 422)


def test_routes_view_rebuilds_identically(api: Api, tenant: Tenant) -> None:
    a = create(api, tenant, **tls())
    create(api, tenant, **tls("b.example.com"))
    create(api, tenant, **tcp())
    api.call("POST", ips(tenant), tenant.token, 201, {})
    create(api, tenant, **tcp(ip="127.10.0.1"))
    api.call("DELETE", f"{base(tenant)}/routes/{a['id']}", tenant.token, 204)
    runner = api.svc.runner
    runner.catch_up("routes")
    live = runner.digest("routes")
    runner.rebuild("routes")
    assert runner.digest("routes") == live
    assert runner.verify("routes")["routes"][0] == live


def test_routes_of_a_deleted_env_or_app_are_orphans_and_free_what_they_held(
    api: Api, tenant: Tenant
) -> None:
    apps = f"/v1/orgs/{tenant.org}/apps"
    api.call("POST", ips(tenant), tenant.token, 201, {})
    old_tls = create(api, tenant, **tls())
    old_tcp = create(api, tenant, **tcp(port=10002))
    create(api, tenant, **tcp(ip="127.10.0.1"))
    # The env is deleted and created again: a new environment, without the old routes.
    api.call("DELETE", f"{apps}/{tenant.app}/envs/{tenant.env}", tenant.token, 204)
    api.call("POST", f"{apps}/{tenant.app}/envs", tenant.token, 201, {"name": tenant.env})
    assert api.call("GET", base(tenant) + "/routes", tenant.token, 200)["items"] == []
    gone = api.call("GET", f"{base(tenant)}/routes/{old_tls['id']}", tenant.token, 404)
    assert gone["error"]["code"] == "edge_route.not_found"
    op = operator_token(api)
    assert api.call("GET", "/v1/edge/snapshot", op, 200)["routes"] == []
    assert api.call("GET", ips(tenant), tenant.token, 200)["items"][0]["routes"] == 0
    # What the orphans held is reaped when it is wanted again.
    new_tls = create(api, tenant, **tls())
    new_tcp = create(api, tenant, **tcp(port=10002))
    assert new_tls["id"] != old_tls["id"] and new_tcp["id"] != old_tcp["id"]
    assert api.call("DELETE", ips(tenant) + "/127.10.0.1", tenant.token, 204) is None
    deleted = api.svc.query(
        "SELECT data->>'route_id' AS route_id, metadata->>'actor' AS actor FROM events "
        "WHERE type = 'route.deleted' ORDER BY position",
        [],
    )
    assert len(deleted) == 3 and {d["actor"] for d in deleted} == {"system:route-reaper"}
    assert {d["route_id"] for d in deleted} >= {old_tls["id"], old_tcp["id"]}

    # A deleted app's hostname no longer blocks another org.
    api.call("DELETE", f"{apps}/{tenant.app}", tenant.token, 204)
    other = api.tenant("other")
    deploy(api, other)
    assert create(api, other, **tls())["hostname"] == "api.example.com"
    assert create(api, other, **tcp(port=10002))["port"] == 10002
    claims = api.svc.query("SELECT org_id FROM view_hostname_claims", [])
    assert claims == [{"org_id": other.org_id}]
