"""Request and response bodies of an environment's workload routes: scale, restart,
status, rollout promote / abort (docs/specs/api.md, "Workloads").

Field names are a contract: add fields freely, never rename or remove one.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from ember.wire.models import Body

Health = Literal["passing", "failing", "unknown"]


class ProcessScaleRequest(Body):
    count: int | None = Field(
        None, description="Instances to run (0-100); absent: leave as it is.", examples=[3]
    )
    memory_mb: int | None = Field(
        None,
        description="Memory per instance in MB (128-65536, a multiple of 4); absent: leave "
        "as it is. A new size replaces the instances, rolling.",
        examples=[512],
    )


class ScaleRequest(Body):
    processes: dict[str, ProcessScaleRequest] = Field(
        max_length=50,
        description="Process name -> what to change. Processes not named keep their scale.",
        examples=[{"web": {"count": 3}, "worker": {"memory_mb": 512}}],
    )


class ProcessFormation(BaseModel):
    count: int
    memory_mb: int | None = Field(
        description="Memory per instance; null before the first deploy unless scaled."
    )


class Formation(BaseModel):
    app: str
    env: str
    processes: dict[str, ProcessFormation] = Field(
        description="The effective scale of every process of the live release (of every "
        "scaled process before the first deploy)."
    )
    changed: bool = Field(description="False when the formation was already so: nothing written.")


class RestartRequest(Body):
    processes: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="Processes to restart; empty: every process.",
    )


class RestartAccepted(BaseModel):
    app: str
    env: str
    processes: list[str] = Field(description="The processes restarted; empty: every process.")
    release_version: int = Field(description="The live release whose instances are replaced.")


class RolloutCommand(Body):
    rollout_id: str | None = Field(
        None,
        max_length=100,
        description="Act only if this is still the current rollout (from GET .../status).",
    )


class Rollout(BaseModel):
    id: str
    release_version: int
    previous_release: int | None = Field(description="The release live before this one.")
    strategy: str = Field(description="rolling | immediate | canary | bluegreen")
    phase: str = Field(description="running | awaiting_promotion | completed | halted | aborted")
    reason: str = Field(description="Why it halted or was aborted; empty otherwise.")
    started_at: dt.datetime
    deadline_at: dt.datetime
    promoted: bool
    auto_rollback: bool
    rolled_back_to: int | None
    current: bool = Field(
        description="True when this rollout converges to the live release's desired state; "
        "false while a newer change (deploy, scale --memory, restart) waits for the "
        "controller to start its rollout."
    )


class StatusRelease(BaseModel):
    version: int
    repository: str
    image_digest: str
    manifest_hash: str
    secrets_version: int
    author: str
    reason: str = Field(description="deploy | rollback")
    rollback_of: int | None
    auto_rollback: bool
    created_at: dt.datetime


class StatusProcess(BaseModel):
    name: str
    desired: int
    running: int = Field(description="Instances of any release whose VM is up (or booting).")
    healthy: int = Field(description="Healthy instances of the desired release and spec.")
    outdated: int = Field(description="Live instances of an older release or spec.")
    memory_mb: int | None
    cpus: float | None
    unplaced_reason: str | None = Field(
        description="Why instances of this process fit on no host, when some are waiting."
    )


class StatusInstance(BaseModel):
    instance_id: str
    process: str
    host_id: str | None
    state: str = Field(
        description="pending | assigned | starting | healthy | unhealthy | stopping | "
        "stopped | failed | lost"
    )
    health: Health = Field(description="passing (healthy), failing (unhealthy, failed), unknown")
    release_version: int
    since: dt.datetime = Field(description="When it entered its state.")
    created_at: dt.datetime
    reason: str
    exit_code: int | None
    address: str | None = Field(
        default=None, description="The address the host reported (starting, healthy...)."
    )


class Status(BaseModel):
    app: str
    env: str
    release: StatusRelease | None = Field(description="The live release; null before a deploy.")
    rollout: Rollout | None = Field(description="The latest rollout; null before the first.")
    processes: list[StatusProcess]
    instances: list[StatusInstance] = Field(
        description="Live instances, then those that ended in the last 10 minutes (at most 20)."
    )
    problems: list[str] = Field(
        description="For people: why the environment is not converging, and instance "
        "failures of the last 10 minutes."
    )
    converged: bool = Field(
        description="Every process runs its desired count of healthy instances of the live "
        "release, nothing else runs, and no rollout is in progress."
    )
