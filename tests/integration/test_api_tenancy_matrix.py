"""Tenant isolation and token scoping, as matrices.

(a) Cross-tenant: every /v1 operation with an ``{org}`` path parameter, taken from the
committed OpenAPI document (a new route is covered the day it is added), is called with
tenant A's all-powerful token on tenant B's real org, app, env and user. Each must answer
404, byte-for-byte the answer for the same names in a world where B never existed, and
write nothing.

(b) Scoping: roles x token scope x token capabilities x operations, against a table of
expected statuses written out by hand from the rules (docs: DESIGN.md section 2 and
ember.core.tenancy): visibility needs membership and a scope overlapping the target;
a write needs a scope containing the target and the capability in token caps AND role
caps; only owners grant the owner role; a new token is never wider than its creator.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.dev.postgres import LocalCluster
from tests.support import pg
from tests.support.api import Api, Tenant, auth, running_api

SPEC = Path(__file__).resolve().parents[2] / "docs/specs/openapi.json"


# -- (a) cross-tenant -----------------------------------------------------------------------


@pytest.fixture
def lonely_api(pg_cluster: LocalCluster) -> Iterator[Api]:
    """A second, independent API + database: the world where tenant B never existed."""
    url = pg.fresh_database(pg_cluster)
    try:
        yield from running_api(url)
    finally:
        pg.drop_database(pg_cluster, url)


@dataclasses.dataclass(frozen=True)
class Probe:
    method: str
    path: str  # with B's names substituted
    template: str
    body: Any


def org_operations() -> list[tuple[str, str, dict[str, Any]]]:
    spec = json.loads(SPEC.read_text())
    ops = [
        (method.upper(), path, op)
        for path, methods in spec["paths"].items()
        if path.startswith("/v1/") and "{org}" in path
        for method, op in methods.items()
    ]
    return sorted(ops, key=lambda o: (o[1], o[0]))


def request_body(op: dict[str, Any], values: dict[str, str]) -> Any:
    """A valid body for ``op`` from its schema: required fields, filled by name."""
    if "requestBody" not in op:
        return None
    spec = json.loads(SPEC.read_text())
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    body = {}
    for field in schema.get("required", []):
        assert field in values, (
            f"no value for body field {field!r} of {ref}: teach the matrix about it"
        )
        body[field] = values[field]
    return body


DIGEST = "sha256:" + "1" * 64


def manifest_for(app: str) -> str:
    return f'''schema_version = 1
app = "{app}"
[processes]
web = "httpd -f -p 8080"
'''


def probes(b: Tenant, objects: dict[str, str]) -> list[Probe]:
    """``objects``: B's own objects named in paths beyond org, app and env (a route id, a
    dedicated address)."""
    params = {
        "org": b.org,
        "app": b.app,
        "env": b.env,
        "user_id": b.user_id,
        "version": "1",
        **objects,
    }
    fields = {
        "name": "probe",
        "email": b.email,
        "role": "viewer",
        "image": {"repository": f"{b.org}/{b.app}", "digest": DIGEST},
        "manifest": manifest_for(b.app),
        "processes": {"web": {"count": 1}},
        "process": "web",
        "backend_port": 8443,
    }
    out = []
    for method, template, op in org_operations():
        path = template
        for p in op.get("parameters", []):
            if p["in"] == "path":
                assert p["name"] in params, (
                    f"{method} {template}: no tenant-B value for path parameter "
                    f"{p['name']!r}; add B's object to the matrix"
                )
                path = path.replace("{" + p["name"] + "}", params[p["name"]])
        assert "{" not in path, (method, template)
        out.append(Probe(method, path, template, request_body(op, fields)))
    return out


def test_other_tenants_objects_answer_exactly_like_missing_ones(api: Api, lonely_api: Api) -> None:
    a = api.tenant("alice")
    b = api.tenant("bob")
    # B has a release, so release routes have something to leak.
    api.call(
        "POST",
        f"/v1/orgs/{b.org}/apps/{b.app}/envs/{b.env}/releases",
        b.token,
        201,
        {
            "image": {"repository": f"{b.org}/{b.app}", "digest": DIGEST},
            "manifest": manifest_for(b.app),
        },
    )
    b_token_id = api.call("GET", "/v1/whoami", b.token, 200)["token"]["id"]
    # B has a route and a dedicated address, so their routes have something to leak.
    b_env = f"/v1/orgs/{b.org}/apps/{b.app}/envs/{b.env}"
    b_ip = api.call("POST", f"/v1/orgs/{b.org}/ips", b.token, 201, {})["address"]
    b_route = api.call(
        "POST",
        f"{b_env}/routes",
        b.token,
        201,
        {"hostname": "b.example.com", "process": "web", "backend_port": 8443, "ip": b_ip},
    )["id"]
    # The same tenant A, with the same names, in a world without B.
    a_alone = lonely_api.tenant("alice")

    cases = probes(b, {"route_id": b_route, "address": b_ip})
    covered = {(p.method, p.template) for p in cases}
    assert covered == {(m, t) for m, t, _ in org_operations()}
    assert len(covered) >= 12  # sanity: the spec was read
    assert {m for m, _ in covered} == {"GET", "POST", "DELETE"}
    # Beyond the {org} routes: B's token id, and token scopes naming B's objects.
    cases += [
        Probe("DELETE", f"/v1/tokens/{b_token_id}", "/v1/tokens/{token_id}", None),
        Probe("POST", "/v1/tokens", "/v1/tokens", {"name": "x", "org": b.org}),
        Probe("POST", "/v1/tokens", "/v1/tokens", {"name": "x", "org": b.org, "app": b.app}),
        Probe(
            "POST",
            "/v1/tokens",
            "/v1/tokens",
            {"name": "x", "org": b.org, "app": b.app, "env": b.env},
        ),
    ]

    leaks = []
    events = api.event_count()
    for probe in cases:
        seen = api.client.request(probe.method, probe.path, json=probe.body, headers=a.headers)
        missing = lonely_api.client.request(
            probe.method, probe.path, json=probe.body, headers=a_alone.headers
        )
        if (
            seen.status_code != 404
            or missing.status_code != 404
            or seen.content != missing.content
            or not seen.json()["error"]["code"].endswith(".not_found")
        ):
            leaks.append((probe.method, probe.path, seen.status_code, seen.text, missing.text))
    assert leaks == []
    assert api.event_count() == events

    # Listings show none of B's objects; B's are all still there for B.
    orgs = api.call("GET", "/v1/orgs", a.token, 200)["items"]
    assert [o["name"] for o in orgs] == [a.org]
    who = api.call("GET", "/v1/whoami", a.token, 200)
    assert [o["name"] for o in who["orgs"]] == [a.org]
    assert b_token_id not in {t["id"] for t in api.call("GET", "/v1/tokens", a.token, 200)["items"]}
    listed = json.dumps(
        [api.call("GET", f"/v1/orgs/{a.org}/{x}", a.token, 200) for x in ("apps", "members")]
    )
    assert b.org not in listed and b.app not in listed and b.email not in listed
    assert api.call("GET", f"/v1/orgs/{b.org}/apps/{b.app}", b.token, 200)["envs"] == [b.env]
    members = api.call("GET", f"/v1/orgs/{b.org}/members", b.token, 200)["items"]
    assert [m["email"] for m in members] == [b.email]


# -- (b) roles x token scope x capabilities -------------------------------------------------

SCOPES = ("unscoped", "org", "app", "env")
ROLES = ("owner", "admin", "deployer", "viewer")

# Expected status per operation, token capabilities (read only, or admin: read + admin),
# member role, and token scope (u: unscoped, o: org acme-org, a: app w<i> of it, e: env
# prod of that app; every token gets its own app w<i>). Operations run in this order;
# "other" is another app of acme-org, "side-org" another org where the member is a viewer.
#
#   get_app        GET    .../apps/w<i>
#   get_other_app  GET    .../apps/other
#   get_side_org   GET    /v1/orgs/side-org
#   create_app     POST   .../apps                    {"name": "n<i>"}
#   create_env     POST   .../apps/w<i>/envs          {"name": "x"}
#   add_member     POST   /v1/orgs/acme-org/members   a new user as viewer
#   grant_owner    POST   /v1/orgs/acme-org/members   a new user as owner
#   token_unscoped POST   /v1/tokens                  unscoped, read only
#   token_admin    POST   /v1/tokens                  same scope as the token, admin
#   delete_env     DELETE .../apps/w<i>/envs/prod
#   delete_app     DELETE .../apps/w<i>
TABLE = """
op             caps  | owner           | admin           | deployer        | viewer
(scope:)             | u   o   a   e   | u   o   a   e   | u   o   a   e   | u   o   a   e
get_app        read  | 200 200 200 200 | 200 200 200 200 | 200 200 200 200 | 200 200 200 200
get_app        admin | 200 200 200 200 | 200 200 200 200 | 200 200 200 200 | 200 200 200 200
get_other_app  read  | 200 200 404 404 | 200 200 404 404 | 200 200 404 404 | 200 200 404 404
get_other_app  admin | 200 200 404 404 | 200 200 404 404 | 200 200 404 404 | 200 200 404 404
get_side_org   read  | 200 404 404 404 | 200 404 404 404 | 200 404 404 404 | 200 404 404 404
get_side_org   admin | 200 404 404 404 | 200 404 404 404 | 200 404 404 404 | 200 404 404 404
create_app     read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
create_app     admin | 201 201 403 403 | 201 201 403 403 | 403 403 403 403 | 403 403 403 403
create_env     read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
create_env     admin | 201 201 201 403 | 201 201 201 403 | 403 403 403 403 | 403 403 403 403
add_member     read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
add_member     admin | 200 200 403 403 | 200 200 403 403 | 403 403 403 403 | 403 403 403 403
grant_owner    read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
grant_owner    admin | 200 200 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
token_unscoped read  | 201 403 403 403 | 201 403 403 403 | 201 403 403 403 | 201 403 403 403
token_unscoped admin | 201 403 403 403 | 201 403 403 403 | 201 403 403 403 | 201 403 403 403
token_admin    read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
token_admin    admin | 201 201 201 201 | 201 201 201 201 | 201 201 201 201 | 201 201 201 201
delete_env     read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
delete_env     admin | 204 204 204 204 | 204 204 204 204 | 403 403 403 403 | 403 403 403 403
delete_app     read  | 403 403 403 403 | 403 403 403 403 | 403 403 403 403 | 403 403 403 403
delete_app     admin | 204 204 204 403 | 204 204 204 403 | 403 403 403 403 | 403 403 403 403
"""


def parse_table() -> dict[tuple[str, str, str, str], int]:
    """(op, caps, role, scope) -> expected status."""
    expected = {}
    lines = [ln for ln in TABLE.strip().splitlines()[2:] if ln.strip()]
    for line in lines:
        head, *per_role = line.split("|")
        op, caps = head.split()
        assert len(per_role) == len(ROLES), line
        for role, cells in zip(ROLES, per_role, strict=True):
            statuses = cells.split()
            assert len(statuses) == len(SCOPES), line
            for scope, status in zip(SCOPES, statuses, strict=True):
                expected[(op, caps, role, scope)] = int(status)
    return expected


EXPECTED = parse_table()
OPS = list(dict.fromkeys(op for op, *_ in EXPECTED))


def test_the_table_is_complete() -> None:
    assert len(OPS) == 11
    assert len(EXPECTED) == len(OPS) * 2 * len(ROLES) * len(SCOPES)


@pytest.mark.parametrize("role", ROLES)
def test_role_scope_capability_matrix(api: Api, role: str) -> None:
    owner = api.tenant("acme")
    org = owner.org
    api.call("POST", "/v1/orgs", owner.token, 201, {"name": "side-org"})
    api.call("POST", f"/v1/orgs/{org}/apps", owner.token, 201, {"name": "other"})
    member_id = owner.add_member("m@example.com", role)
    api.user("m@example.com")
    api.call(
        "POST",
        "/v1/orgs/side-org/members",
        owner.token,
        200,
        {"email": "m@example.com", "role": "viewer"},
    )
    bootstrap = api.mint(member_id)

    combos = [(scope, caps) for scope in SCOPES for caps in ("read", "admin")]
    tokens = {}
    for i, (scope, caps) in enumerate(combos):
        app = f"w{i}"
        api.call("POST", f"/v1/orgs/{org}/apps", owner.token, 201, {"name": app})
        api.call("POST", f"/v1/orgs/{org}/apps/{app}/envs", owner.token, 201, {"name": "prod"})
        api.user(f"new{i}@example.com")
        api.user(f"own{i}@example.com")
        body = {"name": f"{scope}-{caps}", "capabilities": [caps], **token_scope(scope, org, app)}
        tokens[(scope, caps)] = api.call("POST", "/v1/tokens", bootstrap, 201, body)["token"]

    mismatches = []
    for i, (scope, caps) in enumerate(combos):
        token = tokens[(scope, caps)]
        for op in OPS:
            method, path, body = operation(op, org, f"w{i}", i, scope)
            want = EXPECTED[(op, caps, role, scope)]
            events = api.event_count()
            r = api.client.request(method, path, json=body, headers=auth(token))
            got = r.status_code
            if got != want:
                mismatches.append((op, role, scope, caps, want, got, r.text[:200]))
                continue
            if got >= 400:
                code = r.json()["error"]["code"]
                assert code == "auth.forbidden" if got == 403 else code.endswith(".not_found")
                assert api.event_count() == events, (op, role, scope, caps)
    assert mismatches == []


def token_scope(scope: str, org: str, app: str) -> dict[str, str]:
    return {
        "unscoped": {},
        "org": {"org": org},
        "app": {"org": org, "app": app},
        "env": {"org": org, "app": app, "env": "prod"},
    }[scope]


def operation(op: str, org: str, app: str, i: int, scope: str) -> tuple[str, str, Any]:
    apps = f"/v1/orgs/{org}/apps"
    return {
        "get_app": ("GET", f"{apps}/{app}", None),
        "get_other_app": ("GET", f"{apps}/other", None),
        "get_side_org": ("GET", "/v1/orgs/side-org", None),
        "create_app": ("POST", apps, {"name": f"n{i}"}),
        "create_env": ("POST", f"{apps}/{app}/envs", {"name": "x"}),
        "add_member": (
            "POST",
            f"/v1/orgs/{org}/members",
            {"email": f"new{i}@example.com", "role": "viewer"},
        ),
        "grant_owner": (
            "POST",
            f"/v1/orgs/{org}/members",
            {"email": f"own{i}@example.com", "role": "owner"},
        ),
        "token_unscoped": ("POST", "/v1/tokens", {"name": "wider", "capabilities": ["read"]}),
        "token_admin": (
            "POST",
            "/v1/tokens",
            {"name": "admin", "capabilities": ["admin"], **token_scope(scope, org, app)},
        ),
        "delete_env": ("DELETE", f"{apps}/{app}/envs/prod", None),
        "delete_app": ("DELETE", f"{apps}/{app}", None),
    }[op]
