"""Property-based fuzzing of every documented operation with schemathesis, in process
(ASGI) against a real Postgres, with a valid token: no 5xx, and every response conforms
to the OpenAPI document (status, content type, body schema, headers).

Cases mix schema-valid data, schema-invalid data, and valid data aimed at the tenant's
real org / app / env / member / token, so the success paths are fuzzed too and not only
the 404s. Deterministic (derandomized Hypothesis, no example database) and bounded by
MAX_EXAMPLES per operation.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from ember.api.app import ApiSettings, create_app
from ember.client.node_auth import NodeIdentity
from ember.dev.postgres import LocalCluster
from tests.support import pg
from tests.support.api import Api, Tenant, running_api
from tests.support.hosts import HOST, enroll_body, enroll_token, place
from tests.support.workloads import awaiting_canary

SPEC = Path(__file__).resolve().parents[2] / "docs/specs/openapi.json"
OPERATIONS = sorted(
    (method.upper(), path)
    for path, methods in json.loads(SPEC.read_text())["paths"].items()
    for method in methods
)
MAX_EXAMPLES = 25
FUZZ_HOST, FUZZ_INSTANCE = "fuzz-host", "ins_fuzz"

# positive_data_acceptance expects every schema-valid request to be accepted. The OpenAPI
# document carries lengths but not the name grammar (lowercase, digits, '-'), the email
# shape, or "a token scoped to an app needs its org"; the API rejects such requests with
# a documented 422 `validation.failed`. Every other check stays on, 5xx included.
EXCLUDED_CHECKS = [schemathesis.checks.positive_data_acceptance]


@dataclasses.dataclass
class World:
    schema: Any
    setup: Api  # a second app instance on the same database, for arranging state
    tenant: Tenant
    member_email: str


@pytest.fixture(scope="module")
def world(pg_cluster: LocalCluster) -> Iterator[World]:
    url = pg.fresh_database(pg_cluster)
    arrange = running_api(url)
    setup = next(arrange)
    tenant = setup.tenant("fuzz")
    setup.svc.set_operator(tenant.email, True)  # hosts are for platform operators
    setup.user("member@example.com")
    # The app under test: schemathesis runs its lifespan itself.
    # Long-polls held at most 0.2 s: a fuzzed cursor may be one the edge would wait on.
    app = create_app(ApiSettings(url, edge_max_wait_s=0.2))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        yield World(schema, setup, tenant, "member@example.com")
    finally:
        arrange.close()
        pg.drop_database(pg_cluster, url)


@pytest.fixture
def real_names(world: World) -> dict[str, str]:
    """Path parameters naming live objects; re-created before each operation, since a
    fuzzed DELETE may have removed them (never the tenant's own token or ownership)."""
    api, t = world.setup, world.tenant
    api.client.post(f"/v1/orgs/{t.org}/apps", json={"name": t.app}, headers=t.headers)
    api.client.post(f"/v1/orgs/{t.org}/apps/{t.app}/envs", json={"name": t.env}, headers=t.headers)
    member = api.call(
        "POST",
        f"/v1/orgs/{t.org}/members",
        t.token,
        200,
        {"email": world.member_email, "role": "viewer"},
    )
    victim = api.call("POST", "/v1/tokens", t.token, 201, {"name": "victim"})
    # Two releases with different images, so a rollback always has somewhere to go.
    for digest in (DIGESTS[0], DIGESTS[1]):
        api.client.post(
            f"/v1/orgs/{t.org}/apps/{t.app}/envs/{t.env}/releases",
            json=release_body(t.org, t.app, digest),
            headers=t.headers,
        )
    api.client.put(f"/v1/hosts/{FUZZ_HOST}", json=HOST, headers=t.headers)
    # One instance per incarnation of the app: a fuzzed DELETE may have removed the app
    # (it is made again above, with a new id), and an instance of a deleted app is
    # nobody's (its log lines are refused, for one).
    instance_id = f"{FUZZ_INSTANCE}_{t.app_id.removeprefix('app_')[-12:].lower()}"
    if not api.svc.query("SELECT 1 FROM view_instances WHERE instance_id = %s", [instance_id]):
        place(api, FUZZ_HOST, instance_id, app_id=t.app_id, env=t.env)
    awaiting_canary(api, t.app_id, t.env)  # so promote and abort have a rollout to act on
    # A route and a dedicated address to read and delete (a fuzzed DELETE may have taken
    # the last ones); the route binds the shared address, so the address can be released.
    env_path = f"/v1/orgs/{t.org}/apps/{t.app}/envs/{t.env}"
    routes = api.call("GET", f"{env_path}/routes", t.token, 200)["items"]
    route = (
        routes[0] if routes else api.call("POST", f"{env_path}/routes", t.token, 201, FUZZ_ROUTE)
    )
    ips = [
        i
        for i in api.call("GET", f"/v1/orgs/{t.org}/ips", t.token, 200)["items"]
        if not i["routes"]
    ]
    ip = ips[0] if ips else api.call("POST", f"/v1/orgs/{t.org}/ips", t.token, 201, {})
    return {
        "host_id": FUZZ_HOST,
        "instance_id": instance_id,
        "version": "1",
        "org": t.org,
        "app": t.app,
        "env": t.env,
        "user_id": member["user_id"],
        "token_id": victim["id"],
        "route_id": route["id"],
        "address": ip["address"],
    }


def test_every_documented_operation_is_fuzzed(world: World) -> None:
    live = sorted(
        (result.ok().method.upper(), result.ok().path)
        for result in world.schema.get_all_operations()
    )
    assert live == OPERATIONS


# Schemathesis' negative-data mutations draw from the global `random` module (its code,
# not ours), which Hypothesis warns about now and then.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_and_never_fails(
    world: World, real_names: dict[str, str], method: str, path: str
) -> None:
    operation = world.schema[path][method]
    headers = world.tenant.headers
    names = [p.name for p in operation.path_parameters]
    real = {n: real_names[n] for n in names}

    # The success path, explicitly (random names and emails rarely are valid ones).
    body = valid_body(method, path, world)
    known = operation.Case(path_parameters=real, **({} if body is None else {"body": body}))
    response = known.call_and_validate(headers=headers, excluded_checks=EXCLUDED_CHECKS)
    assert 200 <= response.status_code < 300, response.text

    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if names:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
    if operation.query or operation.headers or operation.body or names:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    statuses: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def fuzz(case: Any) -> None:
        response = case.call(headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 413:
            # The body-size limit (1 MiB) answered before validation: a rejection too,
            # which schemathesis' negative-data check does not count as one.
            assert response.json()["error"]["code"] == "request.too_large"
            return
        case.validate_response(response, excluded_checks=EXCLUDED_CHECKS)

    random.seed(f"{method} {path}")  # schemathesis' own draws from the global PRNG
    fuzz()
    assert statuses and max(statuses) < 500
    # The token stayed valid throughout: fuzzing reached the handlers, not only auth.
    assert world.setup.client.get("/v1/whoami", headers=headers).status_code == 200


DIGESTS = ("sha256:" + "1" * 64, "sha256:" + "2" * 64)
FUZZ_ROUTE = {"hostname": "fuzz.example.com", "process": "web", "backend_port": 8443}


def release_body(org: str, app: str, digest: str) -> dict[str, Any]:
    manifest = f'schema_version = 1\napp = "{app}"\n[processes]\nweb = "httpd -f -p 8080"\n'
    return {"image": {"repository": f"{org}/{app}", "digest": digest}, "manifest": manifest}


def valid_body(method: str, path: str, world: World) -> dict[str, Any] | None:
    if (method, path) == ("POST", "/v1/agents/enroll"):
        # A fresh one-time token (made for the fuzz host, so it may replace its key).
        token = enroll_token(world.setup, world.tenant.token, FUZZ_HOST)
        return enroll_body(token, FUZZ_HOST, NodeIdentity.generate())
    return {
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/releases"): release_body(
            world.tenant.org, world.tenant.app, "sha256:" + "3" * 64
        ),
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/rollback"): {},
        ("POST", "/v1/orgs"): {"name": "fuzzed-org"},
        ("POST", "/v1/orgs/{org}/apps"): {"name": "fuzzed-app"},
        ("POST", "/v1/orgs/{org}/apps/{app}/envs"): {"name": "fuzzed"},
        ("POST", "/v1/orgs/{org}/members"): {"email": world.member_email, "role": "deployer"},
        ("POST", "/v1/tokens"): {"name": "fuzzed", "capabilities": ["read"]},
        ("PUT", "/v1/hosts/{host_id}"): HOST,
        ("POST", "/v1/hosts/{host_id}/heartbeat"): {"report": {"fuzzed": True}},
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/scale"): {
            "processes": {"web": {"count": 2}}
        },
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/restart"): {"processes": []},
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/rollout/promote"): {},
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/rollout/abort"): {},
        ("POST", "/v1/instances/{instance_id}/reports"): {
            "host_id": FUZZ_HOST,
            "state": "starting",
        },
        ("POST", "/v1/hosts/{host_id}/instances/{instance_id}/logs"): {
            "lines": [{"ts": "2026-11-27T11:00:00Z", "line": "fuzzed"}]
        },
        ("POST", "/v1/orgs/{org}/apps/{app}/envs/{env}/routes"): FUZZ_ROUTE,
        ("POST", "/v1/orgs/{org}/ips"): {"family": "ipv4"},
        ("POST", "/v1/hosts/enrollment-tokens"): {"expires_in_s": 600},
    }.get((method, path))
