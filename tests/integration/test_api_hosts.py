"""Hosts and the agent-facing routes over HTTP on a real Postgres: registration (idempotent,
validated), heartbeats (no events), list / show with usage, cordon / uncordon / drain,
the operator-only rule, allocations with their cursor, and instance reports.

Instances are set up by appending the controller's and scheduler's events directly
(instance.created on the workload stream, instance.assigned on the host's stream), then
folding the scheduling projection, as the controller would.
"""

from __future__ import annotations

from typing import Any

import pytest

from ember.core.hosts import HostMarkedDown, host_stream
from ember.core.instances import InstanceSpec, InstanceStopRequested
from ember.core.tenancy import Capability, Role, Scope
from ember.core.workloads import workload_stream
from tests.support.api import Api, Tenant, auth
from tests.support.hosts import HOST, append, operator_token, place


@pytest.fixture
def op(api: Api) -> str:
    return operator_token(api)


def register(api: Api, token: str, host_id: str, expect: int = 201, **fields: Any) -> Any:
    return api.call("PUT", f"/v1/hosts/{host_id}", token, expect, {**HOST, **fields})


def report(api: Api, token: str, instance_id: str, expect: int = 202, **body: Any) -> Any:
    return api.call("POST", f"/v1/instances/{instance_id}/reports", token, expect, body)


def error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err: dict[str, Any] = response.json()["error"]
    assert err["code"] == code, err
    return err


# -- registration --------------------------------------------------------------------------


def test_register_is_idempotent_and_updates_what_changed(api: Api, op: str) -> None:
    first = register(api, op, "h1", labels={"disk": "ssd"}, address="10.0.0.1")
    assert first["id"] == "h1" and first["state"] == "ready" and first["admin_state"] == "ready"
    assert (first["vcpus"], first["memory_mb"], first["disk_mb"]) == (4, 8192, 100_000)
    assert first["labels"] == {"disk": "ssd"} and first["region"] == "fra"
    assert first["address"] == "10.0.0.1"
    assert first["usage"] == {"instances": 0, "memory_mb": 0, "cpus": 0.0}
    assert first["instances"] == []
    assert first["last_seen"] is not None, "registering counts as a heartbeat"

    events = api.event_count()
    again = register(api, op, "h1", 200, labels={"disk": "ssd"}, address="10.0.0.1")
    assert api.event_count() == events, "the same facts again write nothing"
    assert {k: v for k, v in again.items() if k != "last_seen"} == {
        k: v for k, v in first.items() if k != "last_seen"
    }

    bigger = register(api, op, "h1", 200, memory_mb=16384, labels={"disk": "ssd"})
    assert api.event_count() == events + 1
    assert bigger["memory_mb"] == 16384 and bigger["address"] == ""
    assert api.call("GET", "/v1/hosts/h1", op, 200)["memory_mb"] == 16384
    stream = api.svc.log.read_stream(host_stream("h1"))
    assert [e.type for e in stream] == ["host.registered", "host.registered"]
    assert stream[0].metadata["actor"].startswith("usr_")


@pytest.mark.parametrize(
    ("host_id", "change", "status", "code", "field"),
    [
        ("Bad_Host", {}, 422, "host.invalid", "host_id"),
        ("h1", {"vcpus": 0}, 422, "host.invalid", "vcpus"),
        ("h1", {"memory_mb": 64}, 422, "host.invalid", "memory_mb"),
        ("h1", {"disk_mb": -1}, 422, "host.invalid", "disk_mb"),
        ("h1", {"labels": {"Bad Key": "x"}}, 422, "host.invalid", "labels"),
        ("h1", {"labels": {"k": "nul\x00"}}, 422, "host.invalid", "labels"),
        ("h1", {"region": "x" * 64}, 422, "host.invalid", "region"),
        ("h1", {"address": "10.0.0.1 evil"}, 422, "host.invalid", "address"),
        ("h1", {"vcpus": "four"}, 422, "request.invalid", "body.vcpus"),
        ("h1", {"labels": {"k": 1}}, 422, "request.invalid", "body.labels.k"),
        ("h1", {"surprise": True}, 422, "request.invalid", "body.surprise"),
    ],
)
def test_bad_registrations_name_the_field_and_write_nothing(
    api: Api, op: str, host_id: str, change: dict[str, Any], status: int, code: str, field: str
) -> None:
    events = api.event_count()
    r = api.client.put(f"/v1/hosts/{host_id}", json={**HOST, **change}, headers=auth(op))
    err = error(r, status, code)
    if code == "request.invalid":
        assert field in [e["loc"] for e in err["detail"]["errors"]]
    else:
        assert err["detail"]["field"] == field
    assert api.event_count() == events
    assert api.scalar("SELECT count(*) FROM host_heartbeats") == 0
    r = api.client.put("/v1/hosts/h1", json={"memory_mb": 1024}, headers=auth(op))
    assert "body.vcpus" in [e["loc"] for e in error(r, 422, "request.invalid")["detail"]["errors"]]


# -- heartbeats ----------------------------------------------------------------------------


def test_heartbeats_move_last_seen_and_write_no_events(api: Api, op: str) -> None:
    r = api.client.post("/v1/hosts/ghost/heartbeat", json={}, headers=auth(op))
    error(r, 404, "host.not_found")
    assert api.scalar("SELECT count(*) FROM host_heartbeats") == 0

    register(api, op, "h1")
    with api.db.connection() as conn:  # as if the last heartbeat were a minute old
        conn.execute("UPDATE host_heartbeats SET last_seen = now() - interval '1 minute'")
    seen = api.call("GET", "/v1/hosts/h1", op, 200)["last_seen"]
    events = api.event_count()
    assert api.call("POST", "/v1/hosts/h1/heartbeat", op, 204, {"report": {"vms": 3}}) is None
    after = api.call("GET", "/v1/hosts/h1", op, 200)["last_seen"]
    assert after > seen
    assert api.scalar("SELECT report FROM host_heartbeats WHERE host_id = 'h1'") == {"vms": 3}
    # No body at all is a heartbeat too; re-registering keeps the last report.
    assert api.client.post("/v1/hosts/h1/heartbeat", headers=auth(op)).status_code == 204
    api.call("POST", "/v1/hosts/h1/heartbeat", op, 204, {"report": {"vms": 4}})
    register(api, op, "h1", 200)
    assert api.scalar("SELECT report FROM host_heartbeats WHERE host_id = 'h1'") == {"vms": 4}
    assert api.event_count() == events, "liveness is not history"

    for bad in ({"report": {"x": "y" * 70_000}}, {"report": {"x": "\x00"}}, {"extra": 1}):
        r = api.client.post("/v1/hosts/h1/heartbeat", json=bad, headers=auth(op))
        assert r.status_code == 422, r.text
    assert api.scalar("SELECT report FROM host_heartbeats WHERE host_id = 'h1'") == {"vms": 4}


# -- list, show, usage ---------------------------------------------------------------------


def test_list_and_show_hosts_with_usage(api: Api, op: str, tenant: Tenant) -> None:
    register(api, op, "h2", region="ams")
    register(api, op, "h1")
    app_id = tenant.app_id
    place(api, "h1", "ins_a", app_id=app_id, memory_mb=512)
    place(api, "h1", "ins_b", app_id=app_id, memory_mb=256)
    place(api, "h2", "ins_c", app_id=app_id, memory_mb=1024)
    # ins_b ends: it no longer counts against h1.
    report(api, op, "ins_b", host_id="h1", state="failed", exit_code=1)

    listed = api.call("GET", "/v1/hosts", op, 200)
    assert [h["id"] for h in listed["items"]] == ["h1", "h2"] and listed["next_cursor"] is None
    usage = {h["id"]: h["usage"] for h in listed["items"]}
    assert usage == {
        "h1": {"instances": 1, "memory_mb": 512, "cpus": 0.5},
        "h2": {"instances": 1, "memory_mb": 1024, "cpus": 0.5},
    }
    assert "instances" not in listed["items"][0], "the list is a summary"

    page = api.call("GET", "/v1/hosts?limit=1", op, 200)
    assert [h["id"] for h in page["items"]] == ["h1"] and page["next_cursor"] == "h1"
    rest = api.call("GET", "/v1/hosts?limit=1&cursor=h1", op, 200)
    assert [h["id"] for h in rest["items"]] == ["h2"]

    detail = api.call("GET", "/v1/hosts/h1", op, 200)
    assert detail["instances"] == [
        {
            "instance_id": "ins_a",
            "app_id": app_id,
            "org": tenant.org,
            "app": tenant.app,
            "env": "prod",
            "process": "web",
            "state": "assigned",
            "memory_mb": 512,
            "cpus": 0.5,
        }
    ]
    for missing in ("nope", "NOT-valid", "x" * 100):
        error(api.client.get(f"/v1/hosts/{missing}", headers=auth(op)), 404, "host.not_found")


# -- cordon, uncordon, drain ---------------------------------------------------------------


def test_cordon_uncordon_drain_are_idempotent(api: Api, op: str) -> None:
    register(api, op, "h1")
    events = api.event_count()
    cordoned = api.call("POST", "/v1/hosts/h1/cordon", op, 200)
    assert cordoned["state"] == cordoned["admin_state"] == "cordoned"
    assert api.call("POST", "/v1/hosts/h1/cordon", op, 200)["state"] == "cordoned"
    assert api.event_count() == events + 1
    assert api.call("POST", "/v1/hosts/h1/drain", op, 200)["state"] == "draining"
    assert api.call("POST", "/v1/hosts/h1/uncordon", op, 200)["state"] == "ready"
    assert api.call("POST", "/v1/hosts/h1/uncordon", op, 200)["state"] == "ready"
    types = [e.type for e in api.svc.log.read_stream(host_stream("h1"))]
    assert types == ["host.registered", "host.cordoned", "host.drain_started", "host.uncordoned"]
    # The same Idempotency-Key answers the first response.
    key = {"Idempotency-Key": "k1"}
    api.call("POST", "/v1/hosts/h1/cordon", op, 200, headers=key)
    replay = api.client.post("/v1/hosts/h1/cordon", headers={**auth(op), **key})
    assert replay.headers.get("Idempotent-Replayed") == "true"

    # A host the controller marked down shows as down, whatever the operator set.
    append(api, host_stream("h1"), HostMarkedDown(host_id="h1", reason="silent"))
    api.svc.runner.catch_up("scheduling")
    down = api.call("GET", "/v1/hosts/h1", op, 200)
    assert (down["state"], down["admin_state"]) == ("down", "cordoned")

    events = api.event_count()
    for action in ("cordon", "uncordon", "drain"):
        r = api.client.post(f"/v1/hosts/ghost/{action}", headers=auth(op))
        error(r, 404, "host.not_found")
        r = api.client.post(f"/v1/hosts/Bad_Id/{action}", headers=auth(op))
        error(r, 404, "host.not_found")
    assert api.event_count() == events


# -- who may ---------------------------------------------------------------------------------


def test_only_an_operators_unscoped_admin_token_reaches_hosts(
    api: Api, op: str, tenant: Tenant
) -> None:
    register(api, op, "h1")
    place(api, "h1", "ins_a")
    ops_id = str(api.scalar("SELECT user_id FROM view_users WHERE email = 'ops@example.com'"))
    org_id = tenant.org_id
    api.svc.operator_set_member(tenant.org, ops_id, Role.OWNER, "test")
    refused = {
        # An org owner with every capability, but not an operator.
        "tenant": tenant.token,
        # An operator, but through a token limited to an org, or without 'admin'.
        "scoped": api.mint(ops_id, scope=Scope(org_id)),
        "read-only": api.mint(ops_id, caps=frozenset({Capability.READ})),
    }
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/v1/hosts", None),
        ("GET", "/v1/hosts/h1", None),
        ("PUT", "/v1/hosts/h1", {**HOST, "vcpus": 64}),
        ("PUT", "/v1/hosts/h9", HOST),
        ("POST", "/v1/hosts/h1/heartbeat", {"report": {"evil": True}}),
        ("POST", "/v1/hosts/h1/cordon", None),
        ("POST", "/v1/hosts/h1/uncordon", None),
        ("POST", "/v1/hosts/h1/drain", None),
        ("GET", "/v1/hosts/h1/allocations", None),
        ("POST", "/v1/instances/ins_a/reports", {"host_id": "h1", "state": "healthy"}),
        # Even a missing host answers 403: there is nothing to hide, and nothing to probe.
        ("GET", "/v1/hosts/ghost", None),
    ]
    events = api.event_count()
    beat = api.scalar("SELECT last_seen FROM host_heartbeats WHERE host_id = 'h1'")
    for who, token in refused.items():
        for method, path, body in calls:
            r = api.client.request(method, path, json=body, headers=auth(token))
            err = error(r, 403, "auth.forbidden")
            assert err["hint"], (who, method, path)
    for method, path, body in calls:
        r = api.client.request(method, path, json=body)
        error(r, 401, "auth.unauthorized")
    assert api.event_count() == events
    assert api.scalar("SELECT last_seen FROM host_heartbeats WHERE host_id = 'h1'") == beat
    assert api.call("GET", "/v1/hosts/h1", op, 200)["vcpus"] == 4

    # Revoking the operator role takes effect on the operator's next request.
    _, changed = api.svc.set_operator("ops@example.com", False)
    assert changed
    error(api.client.get("/v1/hosts", headers=auth(op)), 403, "auth.forbidden")
    assert api.svc.set_operator("ops@example.com", False) == (
        api.svc.user_by_email("ops@example.com"),
        False,
    )


def test_operator_events_survive_a_rebuild(api: Api, op: str) -> None:
    api.svc.set_operator("ops@example.com", False)
    api.svc.set_operator("ops@example.com", True)
    users = [e.type for e in api.svc.log.read_all() if e.type.startswith("user.")]
    assert users == [
        "user.created",
        "user.operator_granted",
        "user.operator_revoked",
        "user.operator_granted",
    ]
    live, rebuilt = api.svc.runner.verify("tenancy")["tenancy"]
    assert live == rebuilt
    assert api.scalar("SELECT operator FROM view_users WHERE email = 'ops@example.com'") is True


# -- agents: allocations and reports ---------------------------------------------------------


def test_allocations_name_the_apps_org_for_the_hosts_firewall(
    api: Api, op: str, tenant: Tenant
) -> None:
    register(api, op, "h1")
    place(api, "h1", "ins_t", app_id=tenant.app_id)
    place(api, "h1", "ins_x")  # an app the views do not know (a test's own): no org
    items = api.call("GET", "/v1/hosts/h1/allocations", op, 200)["items"]
    assert {a["instance_id"]: a["org_id"] for a in items} == {
        "ins_t": tenant.org_id,
        "ins_x": "",
    }
    watched = api.call("GET", "/v1/hosts/h1/allocations/watch?wait=0", op, 200)["events"]
    assert {e["allocation"]["instance_id"]: e["allocation"]["org_id"] for e in watched} == {
        "ins_t": tenant.org_id,
        "ins_x": "",
    }


def test_allocations_list_what_the_host_should_run_with_a_cursor(api: Api, op: str) -> None:
    register(api, op, "h1")
    register(api, op, "h2")
    empty = api.call("GET", "/v1/hosts/h1/allocations", op, 200)
    assert empty["host_id"] == "h1" and empty["items"] == []
    place(api, "h1", "ins_a")
    place(api, "h1", "ins_b", memory_mb=256)
    place(api, "h2", "ins_c")

    alloc = api.call("GET", "/v1/hosts/h1/allocations", op, 200)
    assert alloc["cursor"] == str(api.svc.runner.cursor("scheduling"))
    assert alloc["cursor"] != empty["cursor"]
    assert [a["instance_id"] for a in alloc["items"]] == ["ins_a", "ins_b"]
    first = alloc["items"][0]
    assert first["app_id"] == "app_x" and first["env"] == "prod" and first["process"] == "web"
    assert (first["state"], first["desired"]) == ("assigned", "run")
    assert InstanceSpec.model_validate(first["spec"]).memory_mb == 512

    # Stopping: still listed, desired "stop"; once stopped it is gone.
    append(
        api,
        workload_stream("app_x", "prod"),
        InstanceStopRequested(instance_id="ins_b", reason="scaled down"),
    )
    api.svc.runner.catch_up("scheduling")
    items = api.call("GET", "/v1/hosts/h1/allocations", op, 200)["items"]
    assert [(a["instance_id"], a["state"], a["desired"]) for a in items] == [
        ("ins_a", "assigned", "run"),
        ("ins_b", "stopping", "stop"),
    ]
    report(api, op, "ins_b", host_id="h1", state="stopped", exit_code=0)
    items = api.call("GET", "/v1/hosts/h1/allocations", op, 200)["items"]
    assert [a["instance_id"] for a in items] == ["ins_a"]
    error(api.client.get("/v1/hosts/ghost/allocations", headers=auth(op)), 404, "host.not_found")


def test_reports_move_the_instance_and_repeats_write_nothing(api: Api, op: str) -> None:
    register(api, op, "h1")
    register(api, op, "h2")
    place(api, "h1", "ins_a")
    stream = "instance-ins_a"

    assert report(api, op, "ins_a", host_id="h1", state="starting") == {
        "instance_id": "ins_a",
        "state": "starting",
    }
    events = api.event_count()
    assert report(api, op, "ins_a", host_id="h1", state="starting")["state"] == "starting"
    assert api.event_count() == events, "a repeat changes nothing"
    assert report(api, op, "ins_a", host_id="h1", state="healthy")["state"] == "healthy"
    assert report(api, op, "ins_a", host_id="h1", state="unhealthy", reason="check failed") == {
        "instance_id": "ins_a",
        "state": "unhealthy",
    }

    # Another host, an unknown instance, a malformed one: not found, nothing written.
    events = api.event_count()
    for instance_id, host_id in (("ins_a", "h2"), ("ins_zz", "h1"), ("NOT%20valid", "h1")):
        r = api.client.post(
            f"/v1/instances/{instance_id}/reports",
            json={"host_id": host_id, "state": "healthy"},
            headers=auth(op),
        )
        error(r, 404, "instance.not_found")
    # A state no agent reports, or a malformed body: 4xx naming the field.
    for body, code, field in (
        ({"host_id": "h1", "state": "running"}, "instance.invalid_report", "state"),
        ({"host_id": "h1", "state": "lost"}, "instance.invalid_report", "state"),
        ({"host_id": "h1", "state": "failed", "reason": "a\x00b"}, "instance.invalid_report", None),
        ({"host_id": "h1"}, "request.invalid", "body.state"),
        ({"host_id": "h1", "state": "stopped", "exit_code": 2**40}, "request.invalid", None),
    ):
        r = api.client.post("/v1/instances/ins_a/reports", json=body, headers=auth(op))
        err = error(r, 422, code)
        if code == "request.invalid" and field:
            assert field in [e["loc"] for e in err["detail"]["errors"]]
        elif field:
            assert err["detail"]["field"] == field
    r = api.client.post(
        "/v1/instances/ins_zz/reports", json={"host_id": "h1", "state": "bogus"}, headers=auth(op)
    )
    error(r, 422, "instance.invalid_report")
    assert api.event_count() == events

    stopped = report(api, op, "ins_a", host_id="h1", state="stopped", exit_code=137)
    assert stopped["state"] == "stopped"
    # A late report about an instance that ended changes nothing.
    events = api.event_count()
    assert report(api, op, "ins_a", host_id="h1", state="healthy")["state"] == "stopped"
    assert api.event_count() == events
    recorded = api.svc.log.read_stream(stream)
    assert [(e.stream_version, e.type) for e in recorded] == [
        (1, "instance.starting"),
        (2, "instance.healthy"),
        (3, "instance.unhealthy"),
        (4, "instance.stopped"),
    ]
    assert recorded[2].data["reason"] == "check failed"
    assert recorded[3].data == {"instance_id": "ins_a", "host_id": "h1", "exit_code": 137}
    assert api.scalar("SELECT exit_code FROM view_instances WHERE instance_id = 'ins_a'") == 137
    detail = api.call("GET", "/v1/hosts/h1", op, 200)
    assert detail["instances"] == [] and detail["usage"]["instances"] == 0
