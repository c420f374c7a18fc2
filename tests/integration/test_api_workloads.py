"""Workloads through the HTTP API on real Postgres: scale, restart, status, rollout
promote / abort, and deploy's auto_rollback.

Where the controller would act, the tests run the real pure reconciler
(ember.core.reconcile) on the views and append its events, and write the host and agent
reports (instance.assigned / starting / healthy / failed) directly to the event log.
"""

from __future__ import annotations

from typing import Any

from ember.core.instances import InstanceFailed, InstanceStarting, PlacementFailed
from ember.core.tenancy import Capability
from ember.core.workloads import workload_stream
from tests.support.api import Api, Tenant
from tests.support.workloads import (
    append,
    assign,
    awaiting_canary,
    controller_step,
    instances,
    report,
    run_healthy,
)

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def manifest(app: str, *, strategy: str = "rolling", port: int = 8080) -> str:
    return f"""schema_version = 1
app = "{app}"
[processes]
web = "httpd -f -p {port}"
worker = "sleep infinity"
[deploy]
strategy = "{strategy}"
"""


def base(t: Tenant) -> str:
    return f"/v1/orgs/{t.org}/apps/{t.app}/envs/{t.env}"


def deploy(
    api: Api, t: Tenant, digest: str = D1, *, strategy: str = "rolling", **extra: Any
) -> dict[str, Any]:
    body = {
        "image": {"repository": f"{t.org}/{t.app}", "digest": digest},
        "manifest": manifest(t.app, strategy=strategy),
        **extra,
    }
    result: dict[str, Any] = api.call("POST", base(t) + "/releases", t.token, 201, body)
    return result


def scale(api: Api, t: Tenant, processes: Any, expect: int = 200, token: str | None = None) -> Any:
    return api.call("POST", base(t) + "/scale", token or t.token, expect, {"processes": processes})


def status(api: Api, t: Tenant) -> dict[str, Any]:
    result: dict[str, Any] = api.call("GET", base(t) + "/status", t.token, 200)
    return result


def converge(api: Api, t: Tenant) -> None:
    """Controller steps and healthy reports until the rollout completes."""
    for _ in range(10):
        for iid in instances(api, t):
            run_healthy(api, t, iid)
        if any(e.event_type == "rollout.completed" for e in controller_step(api, t).events):
            return
    raise AssertionError("the rollout did not complete")


# -- scale -------------------------------------------------------------------------------


def test_scale_sets_the_formation_and_scaling_again_writes_nothing(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant)
    first = scale(api, tenant, {"web": {"count": 3}})
    assert first == {
        "app": tenant.app,
        "env": tenant.env,
        "processes": {
            "web": {"count": 3, "memory_mb": 256},
            "worker": {"count": 1, "memory_mb": 256},
        },
        "changed": True,
    }
    before = api.event_count()
    again = scale(api, tenant, {"web": {"count": 3}})
    assert again == {**first, "changed": False} and api.event_count() == before

    both = scale(api, tenant, {"web": {"count": 3}, "worker": {"memory_mb": 512, "count": 0}})
    assert both["processes"] == {
        "web": {"count": 3, "memory_mb": 256},
        "worker": {"count": 0, "memory_mb": 512},
    }
    assert api.event_count() == before + 1
    # Only what changed is recorded.
    data = api.scalar(
        "SELECT data FROM events WHERE type = 'formation.scaled' ORDER BY position DESC LIMIT 1"
    )
    assert data["processes"] == {"worker": {"count": 0, "memory_mb": 512}}
    # Status agrees: desired counts and sizes come from the same formation.
    procs = {p["name"]: p for p in status(api, tenant)["processes"]}
    assert (procs["web"]["desired"], procs["worker"]["desired"]) == (3, 0)
    assert procs["worker"]["memory_mb"] == 512


def test_scale_refuses_bad_input_naming_the_field_and_writes_nothing(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant)
    before = api.event_count()
    cases: list[tuple[Any, int, str, str]] = [
        ({"nope": {"count": 1}}, 404, "process.not_found", "processes.nope"),
        ({"web": {"count": -1}}, 422, "scale.invalid", "processes.web.count"),
        ({"web": {"count": 101}}, 422, "scale.invalid", "processes.web.count"),
        ({"web": {"memory_mb": 64}}, 422, "scale.invalid", "processes.web.memory_mb"),
        ({"web": {"memory_mb": 130}}, 422, "scale.invalid", "processes.web.memory_mb"),
        ({"web": {}}, 422, "scale.invalid", "processes.web"),
        ({}, 422, "scale.invalid", "processes"),
    ]
    for processes, code, error, field in cases:
        body = scale(api, tenant, processes, code)
        assert (body["error"]["code"], body["error"]["detail"]["field"]) == (error, field)
    malformed = scale(api, tenant, {"web": {"count": "many"}}, 422)
    assert malformed["error"]["code"] == "request.invalid"
    assert malformed["error"]["detail"]["errors"][0]["loc"] == "body.processes.web.count"
    typo = scale(api, tenant, {"web": {"cnt": 2}}, 422)
    assert typo["error"]["detail"]["errors"][0]["loc"] == "body.processes.web.cnt"
    assert api.event_count() == before


def test_scale_before_the_first_deploy_accepts_well_formed_names_only(
    api: Api, tenant: Tenant
) -> None:
    early = scale(api, tenant, {"web": {"count": 2}})
    assert early["processes"] == {"web": {"count": 2, "memory_mb": None}}
    bad = scale(api, tenant, {"Web!": {"count": 2}}, 422)
    assert bad["error"]["code"] == "scale.invalid"
    deploy(api, tenant)  # the formation survives the deploy
    procs = {p["name"]: p["desired"] for p in status(api, tenant)["processes"]}
    assert procs == {"web": 2, "worker": 1}


def test_workload_writes_need_deploy_and_other_tenants_see_nothing(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant)
    viewer = api.mint(tenant.add_member("viewer@example.com", "viewer"))
    reader = api.mint(tenant.user_id, caps=frozenset({Capability.READ}))
    other = api.tenant("other")
    before = api.event_count()
    writes = [
        ("/scale", {"processes": {"web": {"count": 2}}}),
        ("/restart", {"processes": []}),
        ("/rollout/promote", {}),
        ("/rollout/abort", {}),
    ]
    for path, body in writes:
        for token in (viewer, reader):
            refused = api.call("POST", base(tenant) + path, token, 403, body)
            assert refused["error"]["code"] == "auth.forbidden", path
        hidden = api.call("POST", base(tenant) + path, other.token, 404, body)
        assert hidden["error"]["code"] == "org.not_found"
    assert api.event_count() == before
    for token in (viewer, reader):
        api.call("GET", base(tenant) + "/status", token, 200)
    api.call("GET", base(tenant) + "/status", other.token, 404)
    missing_env = f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs/nope/status"
    assert api.call("GET", missing_env, tenant.token, 404)["error"]["code"] == "env.not_found"


# -- restart -----------------------------------------------------------------------------


def test_restart_requests_a_rolling_replacement(api: Api, tenant: Tenant) -> None:
    nothing = api.call("POST", base(tenant) + "/restart", tenant.token, 404, {"processes": []})
    assert nothing["error"]["code"] == "release.not_found"
    deploy(api, tenant)
    before = api.event_count()
    every = api.call("POST", base(tenant) + "/restart", tenant.token, 202, {})
    assert every == {"app": tenant.app, "env": tenant.env, "processes": [], "release_version": 1}
    one = api.call(
        "POST", base(tenant) + "/restart", tenant.token, 202, {"processes": ["web", "web"]}
    )
    assert one["processes"] == ["web"]
    unknown = api.call(
        "POST", base(tenant) + "/restart", tenant.token, 404, {"processes": ["web", "db"]}
    )
    assert unknown["error"]["code"] == "process.not_found"
    assert unknown["error"]["detail"] == {"field": "processes", "process": "db"}
    assert api.event_count() == before + 2
    state = api.scalar("SELECT state FROM view_workloads")
    assert (state["all_restarts"], state["restart_generation"]) == (1, {"web": 1})


def test_a_restart_makes_the_reconciler_replace_instances(api: Api, tenant: Tenant) -> None:
    deploy(api, tenant)
    controller_step(api, tenant)  # rollout.started
    controller_step(api, tenant)  # instance.created for web and worker
    for iid in instances(api, tenant):
        run_healthy(api, tenant, iid)
    controller_step(api, tenant)  # rollout.completed
    assert status(api, tenant)["converged"] is True
    api.call("POST", base(tenant) + "/restart", tenant.token, 202, {"processes": ["web"]})
    after = status(api, tenant)
    assert after["converged"] is False
    assert after["rollout"]["current"] is False  # the controller has not seen it yet
    web = next(p for p in after["processes"] if p["name"] == "web")
    assert (web["healthy"], web["outdated"]) == (0, 1)
    started = controller_step(api, tenant)
    assert [e.event_type for e in started.events] == ["rollout.started"]
    assert status(api, tenant)["rollout"]["current"] is True


# -- status ------------------------------------------------------------------------------


def test_status_before_any_deploy(api: Api, tenant: Tenant) -> None:
    body = status(api, tenant)
    assert body == {
        "app": tenant.app,
        "env": tenant.env,
        "release": None,
        "rollout": None,
        "processes": [],
        "instances": [],
        "problems": [],
        "converged": True,
    }


def test_status_shows_desired_running_healthy_and_why_it_does_not_converge(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant, auto_rollback=True)
    scale(api, tenant, {"web": {"count": 3}})
    waiting = status(api, tenant)
    assert waiting["release"]["version"] == 1 and waiting["release"]["auto_rollback"] is True
    assert waiting["rollout"] is None and waiting["converged"] is False
    assert waiting["problems"][0].startswith("waiting for the controller to start the rollout")

    controller_step(api, tenant)
    controller_step(api, tenant)
    web = instances(api, tenant, "web")
    worker = instances(api, tenant, "worker")
    assert (len(web), len(worker)) == (3, 1)
    append(
        api,
        workload_stream(tenant.app_id, tenant.env),
        [
            PlacementFailed(
                app_id=tenant.app_id,
                env=tenant.env,
                process="web",
                instance_ids=web[1:],
                reason="no host has 256 MB free",
            )
        ],
    )
    run_healthy(api, tenant, web[0], "h1")
    run_healthy(api, tenant, worker[0], "h1")
    body = status(api, tenant)
    rollout = body["rollout"]
    assert rollout["release_version"] == 1 and rollout["phase"] == "running"
    assert rollout["current"] is True and rollout["auto_rollback"] is True
    procs = {p["name"]: p for p in body["processes"]}
    assert {k: procs["web"][k] for k in ("desired", "running", "healthy", "outdated")} == {
        "desired": 3,
        "running": 1,
        "healthy": 1,
        "outdated": 0,
    }
    assert procs["web"]["unplaced_reason"] == "no host has 256 MB free"
    assert procs["worker"]["unplaced_reason"] is None
    assert "web: 2 instances cannot be placed: no host has 256 MB free" in body["problems"]
    assert "web: 1/3 healthy" in body["problems"]
    table = {i["instance_id"]: i for i in body["instances"]}
    assert (table[web[0]]["state"], table[web[0]]["health"]) == ("healthy", "passing")
    assert (table[web[0]]["host_id"], table[web[0]]["release_version"]) == ("h1", 1)
    assert (table[web[1]]["state"], table[web[1]]["health"]) == ("pending", "unknown")
    assert body["converged"] is False

    # One instance crashes: it stays visible, with its exit code, as a problem.
    assign(api, tenant, web[1], "h2")
    report(api, web[1], InstanceStarting(instance_id=web[1], host_id="h2"))
    report(
        api,
        web[1],
        InstanceFailed(instance_id=web[1], host_id="h2", reason="exited with code 3", exit_code=3),
    )
    body = status(api, tenant)
    table = {i["instance_id"]: i for i in body["instances"]}
    assert table[web[1]]["state"] == "failed" and table[web[1]]["exit_code"] == 3
    assert table[web[1]]["health"] == "failing"
    assert f"web: instance {web[1]} failed: exited with code 3" in body["problems"]
    assert body["instances"][-1]["instance_id"] == web[1]  # ended ones come last


def test_status_converges_once_every_instance_is_healthy_and_the_rollout_completed(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant)
    controller_step(api, tenant)
    controller_step(api, tenant)
    for iid in instances(api, tenant):
        run_healthy(api, tenant, iid)
    almost = status(api, tenant)
    assert almost["problems"] == [] and almost["converged"] is False  # rollout still running
    done = controller_step(api, tenant)
    assert [e.event_type for e in done.events] == ["rollout.completed"]
    body = status(api, tenant)
    assert body["converged"] is True and body["problems"] == []
    assert body["rollout"]["phase"] == "completed"
    assert [(p["name"], p["desired"], p["healthy"]) for p in body["processes"]] == [
        ("web", 1, 1),
        ("worker", 1, 1),
    ]

    # A new release: the old instances are outdated until replaced.
    deploy(api, tenant, D2)
    controller_step(api, tenant)
    body = status(api, tenant)
    assert body["release"]["version"] == 2 and body["rollout"]["release_version"] == 2
    assert body["converged"] is False
    assert "web: 1 instance of an older release or spec still running" in body["problems"]
    assert "web: 0/1 healthy" in body["problems"]


# -- rollout promote / abort -------------------------------------------------------------


def test_promote_and_abort_follow_the_rollout_phase(api: Api, tenant: Tenant) -> None:
    def promote(expect: int, **body: Any) -> Any:
        return api.call("POST", base(tenant) + "/rollout/promote", tenant.token, expect, body)

    def abort(expect: int, **body: Any) -> Any:
        return api.call("POST", base(tenant) + "/rollout/abort", tenant.token, expect, body)

    assert promote(404)["error"]["code"] == "rollout.not_found"
    assert abort(404)["error"]["code"] == "rollout.not_found"

    deploy(api, tenant)  # a first release rolls out without a canary: nothing to compare
    scale(api, tenant, {"web": {"count": 3}})
    converge(api, tenant)
    deploy(api, tenant, D2, strategy="canary")
    controller_step(api, tenant)
    controller_step(api, tenant)
    assert len(instances(api, tenant, "web")) == 1  # the canary
    early = promote(409)  # the canary is not healthy yet
    assert early["error"]["code"] == "rollout.not_awaiting"
    assert early["error"]["detail"]["phase"] == "running"
    for iid in instances(api, tenant):
        run_healthy(api, tenant, iid)
    awaiting = controller_step(api, tenant)
    assert [e.event_type for e in awaiting.events] == ["rollout.awaiting_promotion"]
    body = status(api, tenant)
    assert body["rollout"]["phase"] == "awaiting_promotion"
    assert any("awaits promotion" in p for p in body["problems"])
    rollout_id = body["rollout"]["id"]

    stale = promote(409, rollout_id="r-not-this-one")
    assert stale["error"]["code"] == "rollout.not_awaiting"
    before = api.event_count()
    promoted = promote(200, rollout_id=rollout_id)
    assert (promoted["id"], promoted["phase"], promoted["promoted"]) == (
        rollout_id,
        "running",
        True,
    )
    assert api.event_count() == before + 1
    assert promote(200) == promoted and api.event_count() == before + 1  # idempotent

    aborted = abort(200)
    assert (aborted["phase"], aborted["reason"]) == ("aborted", f"aborted by {tenant.email}")
    assert abort(200) == aborted and api.event_count() == before + 2
    assert promote(409)["error"]["code"] == "rollout.not_awaiting"


def test_abort_needs_an_active_rollout(api: Api, tenant: Tenant) -> None:
    deploy(api, tenant)
    converge(api, tenant)
    refused = api.call("POST", base(tenant) + "/rollout/abort", tenant.token, 409, {})
    assert refused["error"]["code"] == "rollout.not_active"
    assert refused["error"]["detail"]["phase"] == "completed"
    rolling = api.call("POST", base(tenant) + "/rollout/promote", tenant.token, 409, {})
    assert rolling["error"]["code"] == "rollout.not_awaiting"


def test_abort_acts_on_the_named_rollout_only(api: Api, tenant: Tenant) -> None:
    deploy(api, tenant)
    first = awaiting_canary(api, tenant.app_id, tenant.env)
    second = awaiting_canary(api, tenant.app_id, tenant.env)  # supersedes the first
    path = base(tenant) + "/rollout/abort"
    stale = api.call("POST", path, tenant.token, 409, {"rollout_id": first})
    assert stale["error"]["code"] == "rollout.not_active"
    assert stale["error"]["detail"] == {"rollout_id": second}
    aborted = api.call("POST", path, tenant.token, 200, {"rollout_id": second})
    assert (aborted["id"], aborted["phase"]) == (second, "aborted")
    # The canary's specs are not the live release's: it is not the current rollout.
    assert aborted["current"] is False


def test_deploy_records_auto_rollback_on_the_promotion(api: Api, tenant: Tenant) -> None:
    deploy(api, tenant, auto_rollback=True)
    deploy(api, tenant, D2)
    rows = api.svc.query(
        "SELECT version, auto_rollback, previous_active FROM view_releases ORDER BY version", []
    )
    assert [(r["version"], r["auto_rollback"], r["previous_active"]) for r in rows] == [
        (1, True, None),
        (2, False, 1),
    ]
    promoted = api.scalar(
        "SELECT data FROM events WHERE type = 'release.promoted' ORDER BY position LIMIT 1"
    )
    assert promoted["auto_rollback"] is True
