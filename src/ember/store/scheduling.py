"""Reads of the scheduling views for the controller: each returns ``ember.core`` values,
so the decisions (placement, reconciliation, liveness) stay pure."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from ember.core.instances import InstanceState
from ember.core.placement import Allocation, GroupKey, Host, HostState, Snapshot
from ember.core.reconcile import ObservedInstance
from ember.core.workloads import LiveRelease, WorkloadState
from ember.store.db import Database

_LIVE = "state NOT IN ('stopped', 'failed', 'lost')"


@dataclasses.dataclass(frozen=True)
class HostLiveness:
    host_id: str
    down: bool
    version: int
    last_seen: dt.datetime | None
    registered_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class PendingInstance:
    instance_id: str
    group: GroupKey
    cpus: float
    memory_mb: int


@dataclasses.dataclass(frozen=True)
class EnvWork:
    """Everything the reconciler needs about one environment."""

    app_id: str
    env: str
    release: LiveRelease | None
    previous_release: int | None
    state: WorkloadState
    instances: tuple[ObservedInstance, ...]


class SchedulingReads:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.db.connection() as conn:
            return list(conn.execute(sql.encode(), tuple(params)).fetchall())

    def now(self) -> dt.datetime:
        """The database's clock: every process compares times against one clock."""
        row = self._rows("SELECT clock_timestamp()")[0]
        value: dt.datetime = row[0]
        return value

    def liveness(self) -> list[HostLiveness]:
        rows = self._rows(
            """SELECT h.host_id, h.down, h.version, b.last_seen, h.registered_at
               FROM view_hosts h LEFT JOIN host_heartbeats b USING (host_id)
               ORDER BY h.host_id"""
        )
        return [HostLiveness(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows]

    def live_instances_on(self, host_ids: Iterable[str]) -> list[tuple[str, str]]:
        """(instance_id, host_id) of every live instance on these hosts."""
        ids = list(host_ids)
        if not ids:
            return []
        rows = self._rows(
            f"SELECT instance_id, host_id FROM view_instances WHERE host_id = ANY(%s) AND {_LIVE}",
            (ids,),
        )
        return [(r[0], r[1]) for r in rows]

    def snapshot(self) -> Snapshot:
        """Every host with its live allocations, and the host stream versions read."""
        with self.db.connection() as conn, conn.transaction():
            # One snapshot for hosts and allocations: REPEATABLE READ (read-only).
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            hosts = conn.execute(
                "SELECT host_id, admin_state, down, vcpus, memory_mb, labels, region, version "
                "FROM view_hosts"
            ).fetchall()
            allocs = conn.execute(
                f"SELECT host_id, instance_id, app_id, env, process, cpus, memory_mb "
                f"FROM view_instances WHERE host_id IS NOT NULL AND {_LIVE}"
            ).fetchall()
        by_host: dict[str, list[Allocation]] = {}
        # One GroupKey per group, not per row: a snapshot holds every live instance, and
        # the replicas of a group share it (~20k fewer objects to build per pass at scale).
        groups: dict[tuple[str, str, str], GroupKey] = {}
        for h, iid, app, env, proc, cpus, mem in allocs:
            group = groups.get((app, env, proc))
            if group is None:
                group = groups[(app, env, proc)] = GroupKey(app, env, proc)
            by_host.setdefault(h, []).append(Allocation(iid, group, float(cpus), int(mem)))
        return Snapshot(
            hosts=tuple(
                Host(
                    id=r[0],
                    state=HostState.DOWN if r[2] else HostState(r[1]),
                    vcpus=int(r[3]),
                    memory_mb=int(r[4]),
                    labels=r[5],
                    region=r[6],
                    allocations=tuple(by_host.get(r[0], ())),
                )
                for r in hosts
            ),
            versions={r[0]: int(r[7]) for r in hosts},
        )

    def pending(self, limit: int) -> list[PendingInstance]:
        rows = self._rows(
            """SELECT instance_id, app_id, env, process, cpus, memory_mb FROM view_instances
               WHERE state = 'pending' ORDER BY created_at, instance_id LIMIT %s""",
            (limit,),
        )
        return [
            PendingInstance(r[0], GroupKey(r[1], r[2], r[3]), float(r[4]), int(r[5])) for r in rows
        ]

    def workload_versions(self) -> dict[tuple[str, str], tuple[int, WorkloadState]]:
        rows = self._rows("SELECT app_id, env, version, state FROM view_workloads")
        return {(r[0], r[1]): (int(r[2]), WorkloadState.model_validate(r[3])) for r in rows}

    def envs(self) -> list[tuple[str, str]]:
        """Environments with a live release or live instances."""
        rows = self._rows(
            f"""SELECT app_id, env FROM view_releases WHERE status = 'active'
                UNION SELECT app_id, env FROM view_instances WHERE {_LIVE}
                UNION SELECT app_id, env FROM view_workloads
                      WHERE state->'rollout'->>'phase' IN ('running', 'awaiting_promotion')
                ORDER BY 1, 2"""
        )
        return [(r[0], r[1]) for r in rows]

    def env_work(self, app_id: str, env: str) -> tuple[EnvWork, int]:
        """The reconciler's inputs for one environment and the workload stream version."""
        with self.db.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rel = conn.execute(
                """SELECT version, repository, image_digest, manifest, secrets_version,
                          auto_rollback, previous_active
                   FROM view_releases WHERE app_id = %s AND env = %s AND status = 'active'""",
                (app_id, env),
            ).fetchone()
            wl = conn.execute(
                "SELECT version, state FROM view_workloads WHERE app_id = %s AND env = %s",
                (app_id, env),
            ).fetchone()
            state = WorkloadState.model_validate(wl[1]) if wl else WorkloadState()
            since = (
                state.rollout.started_at
                if state.rollout
                else dt.datetime.min.replace(tzinfo=dt.UTC)
            )
            insts = conn.execute(
                f"""SELECT i.instance_id, i.process, i.spec_hash, i.state, i.created_at,
                           i.host_id, h.admin_state, h.down, i.rollout_id, i.reason
                    FROM view_instances i LEFT JOIN view_hosts h USING (host_id)
                    WHERE i.app_id = %s AND i.env = %s
                      AND (i.{_LIVE} OR i.created_at >= %s)
                    ORDER BY i.created_at, i.instance_id""",
                (app_id, env, since),
            ).fetchall()
        release = (
            LiveRelease(
                version=int(rel[0]),
                repository=rel[1],
                image_digest=rel[2],
                manifest=rel[3],
                secrets_version=int(rel[4]),
                auto_rollback=bool(rel[5]),
            )
            if rel
            else None
        )
        observed = tuple(
            ObservedInstance(
                instance_id=r[0],
                process=r[1],
                spec_hash=r[2],
                state=InstanceState(r[3]),
                created_at=r[4],
                host_id=r[5],
                host_state=None if r[6] is None else (HostState.DOWN if r[7] else HostState(r[6])),
                rollout_id=r[8],
                reason=r[9],
            )
            for r in insts
        )
        work = EnvWork(
            app_id, env, release, int(rel[6]) if rel and rel[6] else None, state, observed
        )
        return work, int(wl[0]) if wl else 0
