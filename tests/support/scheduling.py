"""Set up scheduling worlds through the event log: hosts, releases, scale, and a
controller that leads (tests drive its passes one at a time)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ember.control.controller import Controller, ControllerConfig
from ember.core.catalog import REGISTRY
from ember.core.events import ANY, Metadata, NewEvent
from ember.core.hosts import HostRegistered, host_stream
from ember.core.manifest import for_environment, manifest_hash, normalize, parse_manifest
from ember.core.releases import (
    Contents,
    decide_deploy,
    fold_releases,
    releases_stream,
)
from ember.core.workloads import FormationScaled, ProcessScale, workload_stream
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.projections import ProjectionRunner
from ember.store.views import all_projections
from tests.support.simagent import SimAgent, StoreTransport

MANIFEST = """
schema_version = 1
app = "{app}"

[processes]
web = "httpd -f -p 8080"
{extra}

[[vm]]
processes = ["web"]
cpus = 1
memory_mb = {memory}

[deploy]
strategy = "{strategy}"
max_surge = {surge}
max_unavailable = {unavailable}
"""


def manifest(
    app: str = "shop",
    *,
    strategy: str = "rolling",
    surge: int = 1,
    unavailable: int = 0,
    memory: int = 256,
    extra: str = "",
) -> str:
    return MANIFEST.format(
        app=app,
        strategy=strategy,
        surge=surge,
        unavailable=unavailable,
        memory=memory,
        extra=extra,
    )


def digest(n: int) -> str:
    return "sha256:" + f"{n:x}".rjust(64, "0")


@dataclasses.dataclass
class World:
    db: Database
    log: EventLog
    runner: ProjectionRunner
    controller: Controller
    agents: list[SimAgent] = dataclasses.field(default_factory=list)
    app_id: str = "app_shop"
    env: str = "production"

    @classmethod
    def create(cls, database_url: str, config: ControllerConfig | None = None) -> World:
        db = Database(database_url, max_size=10)
        log = EventLog(db, REGISTRY)
        runner = ProjectionRunner(db, REGISTRY, all_projections())
        ctl = Controller(log, runner, config or ControllerConfig(), holder="test-controller")
        assert ctl.ensure_leader()
        return cls(db, log, runner, ctl)

    def close(self) -> None:
        self.db.close()

    def add_host(
        self, host_id: str, *, vcpus: int = 4, memory_mb: int = 4096, **kw: Any
    ) -> SimAgent:
        event = HostRegistered(
            host_id=host_id, vcpus=vcpus, memory_mb=memory_mb, disk_mb=10_000, **kw
        )
        self.log.append(host_stream(host_id), ANY, [NewEvent.of(event)])
        agent = SimAgent(StoreTransport(self.log), host_id)
        agent.transport.heartbeat(host_id)
        self.agents.append(agent)
        return agent

    def deploy(self, text: str, image: int, *, auto_rollback: bool = False) -> int:
        stream = releases_stream(self.app_id, self.env)
        events = self.log.read_stream(stream)
        m = for_environment(parse_manifest(text), self.env)
        payloads = decide_deploy(
            fold_releases(events),
            app_id=self.app_id,
            env=self.env,
            contents=Contents("acme/shop", digest(image), manifest_hash(m), 0),
            manifest=normalize(m),
            author="test",
            auto_rollback=auto_rollback,
        )
        self.log.append(stream, len(events), [NewEvent.of(p) for p in payloads])
        return int(payloads[0].model_dump()["version"])

    def scale(self, **processes: ProcessScale) -> None:
        event = FormationScaled(app_id=self.app_id, env=self.env, processes=processes)
        self.log.append(
            workload_stream(self.app_id, self.env),
            ANY,
            [NewEvent.of(event, Metadata(actor="test"))],
        )

    def step(self) -> None:
        """One controller pass, then one step of every agent."""
        self.controller.run_pass()
        for agent in self.agents:
            agent.step()
        self.runner.catch_up()

    def converge(self, max_steps: int = 40) -> int:
        """Step until a pass changes nothing; returns the steps taken."""
        for n in range(max_steps):
            before = self.event_count()
            self.step()
            if self.event_count() == before:
                return n
        raise AssertionError(f"did not converge in {max_steps} steps")

    def event_count(self) -> int:
        return int(self.one("SELECT count(*) FROM events"))

    def one(self, sql: str, *params: Any) -> Any:
        with self.db.connection() as conn:
            row = conn.execute(sql.encode(), params).fetchone()
        assert row is not None
        return row[0]

    def instances(self, *states: str) -> list[dict[str, Any]]:
        with self.db.connection() as conn:
            cur = conn.execute(
                "SELECT instance_id, process, state, host_id, release_version, spec, reason "
                "FROM view_instances WHERE cardinality(%s::text[]) = 0 OR state = ANY(%s) "
                "ORDER BY created_at, instance_id",
                (list(states), list(states)),
            )
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def rollout(self) -> dict[str, Any] | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT state->'rollout' FROM view_workloads WHERE app_id = %s AND env = %s",
                (self.app_id, self.env),
            ).fetchone()
        return row[0] if row else None

    def live_release(self) -> int:
        return int(
            self.one(
                "SELECT version FROM view_releases WHERE app_id = %s AND env = %s "
                "AND status = 'active'",
                self.app_id,
                self.env,
            )
        )
