"""A controller and host agents by hand, for API tests of workloads: the real pure
reconciler (ember.core.reconcile) decides on the views and its events are appended the
way the controller appends them; agent reports and scheduler assignments are written
directly to the event log. Every append is folded into the views before returning."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ember.control.controller import Controller
from ember.core.events import ANY, EventData, Metadata, NewEvent
from ember.core.hosts import InstanceAssigned, host_stream
from ember.core.ids import new_id
from ember.core.instances import (
    InstanceFailed,
    InstanceHealthy,
    InstanceStarting,
    instance_stream,
)
from ember.core.reconcile import Decision
from ember.core.workloads import (
    RolloutAwaitingPromotion,
    RolloutStarted,
    workload_stream,
)
from tests.support.api import Api, Tenant


def append(api: Api, stream: str, events: list[EventData], expected: int | Any = ANY) -> None:
    meta = Metadata(actor="test")
    result = api.svc.log.append(stream, expected, [NewEvent.of(e, meta) for e in events])
    api.svc.sync(result.cursor, "scheduling")


def controller_step(api: Api, t: Tenant, now: dt.datetime | None = None) -> Decision:
    """One decision of the real controller's reconciler for the tenant's environment,
    written as the leader writes it (the test holds the lease)."""
    ctl = Controller(api.svc.log, api.svc.runner, holder="test-controller")
    assert ctl.ensure_leader(), "another controller holds the lease"
    return ctl.reconcile_env(t.app_id, t.env, now)


def instances(api: Api, t: Tenant, process: str | None = None, state: str = "pending") -> list:
    rows = api.svc.query(
        "SELECT instance_id, process FROM view_instances WHERE app_id = %s AND env = %s "
        "AND state = %s ORDER BY created_at, instance_id",
        [t.app_id, t.env, state],
    )
    return [r["instance_id"] for r in rows if process in (None, r["process"])]


def assign(api: Api, t: Tenant, instance_id: str, host: str = "h1") -> None:
    row = api.svc.query("SELECT * FROM view_instances WHERE instance_id = %s", [instance_id])[0]
    append(
        api,
        host_stream(host),
        [
            InstanceAssigned(
                host_id=host,
                instance_id=instance_id,
                app_id=t.app_id,
                env=t.env,
                process=row["process"],
                memory_mb=row["memory_mb"],
                cpus=row["cpus"],
            )
        ],
    )


def report(api: Api, instance_id: str, event: EventData) -> None:
    append(api, instance_stream(instance_id), [event])


def run_healthy(api: Api, t: Tenant, instance_id: str, host: str = "h1") -> None:
    assign(api, t, instance_id, host)
    report(api, instance_id, InstanceStarting(instance_id=instance_id, host_id=host))
    report(api, instance_id, InstanceHealthy(instance_id=instance_id, host_id=host))


def run_failed(api: Api, t: Tenant, instance_id: str, exit_code: int = 3, host: str = "h1") -> None:
    assign(api, t, instance_id, host)
    report(api, instance_id, InstanceStarting(instance_id=instance_id, host_id=host))
    report(
        api,
        instance_id,
        InstanceFailed(
            instance_id=instance_id,
            host_id=host,
            reason=f"exited with code {exit_code}",
            exit_code=exit_code,
        ),
    )


def awaiting_canary(api: Api, app_id: str, env: str) -> str:
    """Start a new canary rollout that awaits promotion (no instances: for tests of the
    promote / abort routes alone, e.g. the schemathesis fuzzing); returns its id."""
    rollout_id = new_id("r")
    now = dt.datetime.now(dt.UTC)
    started = RolloutStarted(
        rollout_id=rollout_id,
        app_id=app_id,
        env=env,
        release_version=1,
        strategy="canary",
        max_surge=1,
        max_unavailable=0,
        specs={},
        started_at=now,
        deadline_at=now + dt.timedelta(minutes=5),
    )
    append(
        api,
        workload_stream(app_id, env),
        [started, RolloutAwaitingPromotion(rollout_id=rollout_id)],
    )
    return rollout_id
