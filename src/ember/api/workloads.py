"""Workload commands and the status query of one app environment.

Commands (``scale``, ``restart``, rollout ``promote`` / ``abort``) authorise like releases
(the ``deploy`` capability on the env; another tenant's env is not found), decide with the
pure rules of ember.core.workload_commands on the folded stream
``workload-<app_id>.<env>``, append at the version read (a concurrent change is decided
again) and wait until the ``scheduling`` projection has folded the append, so the caller
reads its own write.

``status`` reads the views only (releases, workloads, instances) in one snapshot and
derives the desired state with ember.core.workloads.desired_processes, the function the
controller's reconciler uses, so both agree on what "converged" means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ember.api.releases import Releases
from ember.api.service import Row, Tenancy
from ember.api.status import build_status, live_release, rollout_model
from ember.core import workloads as wl
from ember.core.events import EventData
from ember.core.tenancy import Capability, Principal
from ember.core.workload_commands import (
    decide_abort,
    decide_promote,
    decide_restart,
    decide_scale,
)
from ember.wire import workloads as ww

PROJECTION = "scheduling"
#: How long an ended instance stays in ``status`` (so a crash is visible), and how many.
ENDED_WINDOW = "10 minutes"
ENDED_LIMIT = 20


class Workloads:
    def __init__(self, tenancy: Tenancy, releases: Releases) -> None:
        self.t = tenancy
        self.releases = releases

    # -- reads -------------------------------------------------------------------------

    def _live_release(self, app_id: str, env: str) -> Row | None:
        rows = self.t.query(
            "SELECT * FROM view_releases WHERE app_id = %s AND env = %s AND status = 'active'",
            [app_id, env],
        )
        return rows[0] if rows else None

    def status(self, who: Principal, org: str, app: str, env: str) -> ww.Status:
        app_row = self.releases.authorize(who, org, app, env, Capability.READ, "read")
        app_id = app_row["app_id"]
        with self.t.db.connection() as conn, conn.transaction():
            # One snapshot: the release, the workload and the instances agree.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            release = _dict_row(
                conn.execute(
                    "SELECT * FROM view_releases "
                    "WHERE app_id = %s AND env = %s AND status = 'active'",
                    (app_id, env),
                )
            )
            workload = _dict_row(
                conn.execute(
                    "SELECT state FROM view_workloads WHERE app_id = %s AND env = %s",
                    (app_id, env),
                )
            )
            live = _dict_rows(
                conn.execute(
                    "SELECT * FROM view_instances WHERE app_id = %s AND env = %s "
                    "AND state NOT IN ('stopped', 'failed', 'lost') "
                    "ORDER BY process, created_at, instance_id",
                    (app_id, env),
                )
            )
            ended = _dict_rows(
                conn.execute(
                    "SELECT * FROM view_instances WHERE app_id = %s AND env = %s "
                    "AND state IN ('stopped', 'failed', 'lost') "
                    f"AND state_since > clock_timestamp() - interval '{ENDED_WINDOW}' "
                    "ORDER BY state_since DESC, instance_id LIMIT %s",
                    (app_id, env, ENDED_LIMIT),
                )
            )
        state = (
            wl.WorkloadState.model_validate(workload["state"]) if workload else wl.WorkloadState()
        )
        return build_status(app=app, env=env, release=release, state=state, live=live, ended=ended)

    # -- commands ----------------------------------------------------------------------

    def _command(self, who: Principal, org: str, app: str, env: str, what: str) -> str:
        app_row = self.releases.authorize(who, org, app, env, Capability.DEPLOY, what)
        app_id: str = app_row["app_id"]
        return app_id

    def scale(
        self,
        who: Principal,
        org: str,
        app: str,
        env: str,
        processes: Mapping[str, wl.ProcessScale],
    ) -> ww.Formation:
        app_id = self._command(who, org, app, env, "scale")
        release = self._live_release(app_id, env)
        declared = list(release["manifest"].get("processes", {})) if release else None
        state, events = self.t.execute(
            wl.workload_stream(app_id, env),
            wl.fold,
            lambda s: decide_scale(
                s, app_id=app_id, env=env, processes=processes, declared=declared
            ),
            who.user_id,
            PROJECTION,
        )
        for event in events:
            wl.apply(state, (event.event_type, event.model_dump(mode="json")))
        return formation(app, env, release, state, changed=bool(events))

    def restart(
        self, who: Principal, org: str, app: str, env: str, processes: Sequence[str]
    ) -> ww.RestartAccepted:
        app_id = self._command(who, org, app, env, "restart")
        release = self._live_release(app_id, env)
        declared = list(release["manifest"].get("processes", {})) if release else None
        _, events = self.t.execute(
            wl.workload_stream(app_id, env),
            wl.fold,
            lambda _s: decide_restart(
                app_id=app_id, env=env, processes=processes, declared=declared
            ),
            who.user_id,
            PROJECTION,
        )
        assert release is not None and events  # decide_restart raises otherwise
        restarted = events[0]
        assert isinstance(restarted, wl.RestartRequested)
        return ww.RestartAccepted(
            app=app, env=env, processes=restarted.processes, release_version=release["version"]
        )

    def promote(
        self, who: Principal, org: str, app: str, env: str, rollout_id: str | None
    ) -> ww.Rollout:
        app_id = self._command(who, org, app, env, "promote rollouts")
        return self._rollout_command(app_id, env, who, lambda s: decide_promote(s, rollout_id))

    def abort(
        self, who: Principal, org: str, app: str, env: str, rollout_id: str | None
    ) -> ww.Rollout:
        app_id = self._command(who, org, app, env, "abort rollouts")
        return self._rollout_command(
            app_id, env, who, lambda s: decide_abort(s, rollout_id, f"aborted by {who.email}")
        )

    def _rollout_command(
        self,
        app_id: str,
        env: str,
        who: Principal,
        decide: Callable[[wl.WorkloadState], list[EventData]],
    ) -> ww.Rollout:
        self.t.execute(wl.workload_stream(app_id, env), wl.fold, decide, who.user_id, PROJECTION)
        # Read back through the view, which has folded the write: it dates a promotion
        # (the deadline moves), which the bare decision cannot.
        rows = self.t.query(
            "SELECT state FROM view_workloads WHERE app_id = %s AND env = %s", [app_id, env]
        )
        state = wl.WorkloadState.model_validate(rows[0]["state"])
        return rollout_model(state, self._live_release(app_id, env))


def formation(
    app: str, env: str, release: Row | None, state: wl.WorkloadState, *, changed: bool
) -> ww.Formation:
    """The effective scale: the live release's processes with the formation applied
    (before the first deploy, what was scaled)."""
    if release is not None:
        desired = wl.desired_processes(live_release(release), state)
        processes = {
            name: ww.ProcessFormation(count=d.count, memory_mb=d.spec.memory_mb)
            for name, d in desired.items()
        }
    else:
        processes = {
            name: ww.ProcessFormation(
                count=s.count if s.count is not None else 1, memory_mb=s.memory_mb
            )
            for name, s in sorted(state.formation.items())
        }
    return ww.Formation(app=app, env=env, processes=processes, changed=changed)


def _dict_rows(cur: Any) -> list[Row]:
    names = [c.name for c in cur.description or ()]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _dict_row(cur: Any) -> Row | None:
    rows = _dict_rows(cur)
    return rows[0] if rows else None
