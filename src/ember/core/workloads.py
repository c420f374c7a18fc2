"""Workloads: what should run in one app environment, stream ``workload-<app_id>.<env>``.

The desired state of an environment is its live release (``releases-<app_id>.<env>``)
combined with this stream: the formation (``ember scale``: count and memory per process),
restart generations (``ember restart``, secrets rotation), the current rollout, and the
instances the controller created or asked to stop. ``ember.core.reconcile`` turns
desired + observed into the next events.

:func:`apply` folds one event into a :class:`WorkloadState`; the store's projection and the
tests use the same function, so the view and the decision cannot disagree.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import pydantic

from ember.core.errors import NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent
from ember.core.instances import InstanceSpec
from ember.core.manifest_model import parse_duration

REGISTRY = EventRegistry()
MAX_COUNT = 100
RolloutPhase = Literal["running", "awaiting_promotion", "completed", "halted", "aborted"]


class InvalidScale(ValidationFailed):
    code = "scale.invalid"


class ProcessNotFound(NotFound):
    code = "process.not_found"


class RolloutNotFound(NotFound):
    code = "rollout.not_found"


def workload_stream(app_id: str, env: str) -> str:
    return f"workload-{app_id}.{env}"


class ProcessScale(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    count: int | None = None
    memory_mb: int | None = None


@REGISTRY.register
class FormationScaled(EventData):
    event_type = "formation.scaled"
    app_id: str
    env: str
    processes: dict[str, ProcessScale]


@REGISTRY.register
class RestartRequested(EventData):
    """Replace the instances of ``processes`` (all when empty), rolling; with
    ``secrets_version`` set this is a secrets rotation."""

    event_type = "restart.requested"
    app_id: str
    env: str
    processes: list[str] = pydantic.Field(default_factory=list)
    secrets_version: int | None = None
    reason: str = "restart"


@REGISTRY.register
class RolloutStarted(EventData):
    event_type = "rollout.started"
    rollout_id: str
    app_id: str
    env: str
    release_version: int
    previous_release: int | None = None
    strategy: str
    max_surge: int
    max_unavailable: int
    auto_rollback: bool = False
    specs: dict[str, str]
    """process -> the spec hash this rollout converges to."""
    started_at: dt.datetime
    deadline_at: dt.datetime


@REGISTRY.register
class RolloutAwaitingPromotion(EventData):
    event_type = "rollout.awaiting_promotion"
    rollout_id: str


@REGISTRY.register
class RolloutPromoted(EventData):
    event_type = "rollout.promoted"
    rollout_id: str


@REGISTRY.register
class RolloutAborted(EventData):
    event_type = "rollout.aborted"
    rollout_id: str
    reason: str = "aborted by the user"


@REGISTRY.register
class RolloutCompleted(EventData):
    event_type = "rollout.completed"
    rollout_id: str


@REGISTRY.register
class RolloutHalted(EventData):
    event_type = "rollout.halted"
    rollout_id: str
    reason: str
    rolled_back_to: int | None = None


class Rollout(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    rollout_id: str
    release_version: int
    previous_release: int | None = None
    strategy: str
    max_surge: int
    max_unavailable: int
    auto_rollback: bool = False
    specs: dict[str, str]
    started_at: dt.datetime
    deadline_at: dt.datetime
    phase: RolloutPhase = "running"
    promoted: bool = False
    reason: str = ""
    rolled_back_to: int | None = None

    @property
    def active(self) -> bool:
        return self.phase in ("running", "awaiting_promotion")


class WorkloadState(pydantic.BaseModel):
    """One environment's workload stream folded."""

    model_config = pydantic.ConfigDict(extra="forbid")
    version: int = 0
    formation: dict[str, ProcessScale] = {}
    restart_generation: dict[str, int] = {}
    all_restarts: int = 0
    secrets_version: int | None = None
    rollout: Rollout | None = None
    unplaced: dict[str, str] = {}
    """process -> the last placement failure recorded (cleared when it places)."""


def apply(state: WorkloadState, event: RecordedEvent | tuple[str, Mapping[str, Any]]) -> None:
    """Fold one workload-stream event into ``state`` (in place). A recorded event's
    ``recorded_at`` dates a promotion (it restarts the rollout's deadline window); a bare
    ``(type, data)`` pair has no time and leaves the deadline as it is."""
    at: dt.datetime | None = None
    if isinstance(event, RecordedEvent):
        state.version = event.stream_version
        etype, data, at = event.type, event.data, event.recorded_at
    else:
        etype, data = event
    if etype in ("formation.scaled", "restart.requested"):
        _apply_desired(state, etype, data)
    elif etype == "rollout.started":
        started = RolloutStarted.model_validate(data)
        state.rollout = Rollout.model_validate(
            started.model_dump(exclude={"app_id", "env"}) | {"phase": "running"}
        )
    elif state.rollout is not None and data.get("rollout_id") == state.rollout.rollout_id:
        _apply_rollout(state.rollout, etype, data, at)
    if etype == "placement.failed":
        state.unplaced[str(data["process"])] = str(data["reason"])
    elif etype == "instance.created":
        state.unplaced.pop(str(data["process"]), None)


def _apply_desired(state: WorkloadState, etype: str, data: Mapping[str, Any]) -> None:
    if etype == "formation.scaled":
        for name, scale in FormationScaled.model_validate(data).processes.items():
            old = state.formation.get(name, ProcessScale())
            state.formation[name] = ProcessScale(
                count=scale.count if scale.count is not None else old.count,
                memory_mb=scale.memory_mb if scale.memory_mb is not None else old.memory_mb,
            )
    elif etype == "restart.requested":
        req = RestartRequested.model_validate(data)
        if req.secrets_version is not None:
            state.secrets_version = req.secrets_version
        if req.processes:
            for name in req.processes:
                state.restart_generation[name] = state.restart_generation.get(name, 0) + 1
        else:
            state.all_restarts += 1


def _apply_rollout(
    ro: Rollout, etype: str, data: Mapping[str, Any], at: dt.datetime | None
) -> None:
    if etype == "rollout.awaiting_promotion":
        ro.phase = "awaiting_promotion"
    elif etype == "rollout.promoted":
        ro.promoted, ro.phase = True, "running"
        if at is not None:
            # The deadline bounds how long new instances take to become healthy, not how
            # long a person takes to promote: the rest of the rollout gets a full window.
            ro.deadline_at = max(ro.deadline_at, at + (ro.deadline_at - ro.started_at))
    elif etype == "rollout.aborted":
        ro.phase, ro.reason = "aborted", str(data.get("reason", ""))
    elif etype == "rollout.completed":
        ro.phase = "completed"
    elif etype == "rollout.halted":
        ro.phase, ro.reason = "halted", str(data["reason"])
        ro.rolled_back_to = data.get("rolled_back_to")


def fold(events: Iterable[RecordedEvent]) -> WorkloadState:
    state = WorkloadState()
    for e in events:
        apply(state, e)
    return state


# -- desired state -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LiveRelease:
    """The parts of the live release the workload needs."""

    version: int
    repository: str
    image_digest: str
    manifest: Mapping[str, Any]
    secrets_version: int = 0
    auto_rollback: bool = False


@dataclasses.dataclass(frozen=True)
class Desired:
    process: str
    count: int
    spec: InstanceSpec

    @functools.cached_property
    def spec_hash(self) -> str:
        """Cached: the reconciler compares it with every instance on every pass."""
        return self.spec.spec_hash


def desired_processes(release: LiveRelease, state: WorkloadState) -> dict[str, Desired]:
    """Process -> how many instances of which spec (manifest, then ``ember scale``).

    A process the formation never scaled runs one instance."""
    m = release.manifest
    sizes: dict[str, tuple[float, int]] = {}
    for group in m.get("vm", []):
        for name in group["processes"]:
            sizes[name] = (float(group["cpus"]), int(group["memory_mb"]))
    deploy = m.get("deploy", {})
    restart = m.get("restart", {})
    secrets = state.secrets_version if state.secrets_version is not None else 0
    out: dict[str, Desired] = {}
    for name, command in sorted(m.get("processes", {}).items()):
        cpus, memory = sizes.get(name, (1.0, 256))
        scale = state.formation.get(name, ProcessScale())
        spec = InstanceSpec(
            release_version=release.version,
            repository=release.repository,
            image_digest=release.image_digest,
            command=list(command) if command is not None else None,
            env=dict(m.get("env", {})),
            memory_mb=scale.memory_mb if scale.memory_mb is not None else memory,
            cpus=cpus,
            services=[s for s in m.get("services", []) if s.get("process") == name],
            kill_signal=str(deploy.get("kill_signal", "SIGTERM")),
            kill_timeout_s=parse_duration(str(deploy.get("kill_timeout", "5s"))) / 1000,
            restart_policy=str(restart.get("policy", "on-failure")),
            max_retries=int(restart.get("max_retries", 10)),
            secrets_version=max(secrets, release.secrets_version),
            restart_generation=state.all_restarts + state.restart_generation.get(name, 0),
        )
        count = scale.count if scale.count is not None else 1
        out[name] = Desired(process=name, count=count, spec=spec)
    return out


def check_scale(
    processes: Mapping[str, ProcessScale], declared: Iterable[str] | None
) -> dict[str, ProcessScale]:
    """Validate ``ember scale`` input against the live release's processes (when one is
    live; before the first deploy any process name is accepted)."""
    if not processes:
        raise InvalidScale(
            "nothing to scale", hint="e.g. 'ember scale web=3'", detail={"field": "processes"}
        )
    known = set(declared) if declared is not None else None
    for name, scale in processes.items():
        if known is not None and name not in known:
            raise ProcessNotFound(
                f"the live release has no process {name!r}",
                hint=f"processes: {', '.join(sorted(known)) or 'none'}",
                detail={"field": f"processes.{name}"},
            )
        if scale.count is None and scale.memory_mb is None:
            raise InvalidScale(
                f"{name}: give a count or a memory size", detail={"field": f"processes.{name}"}
            )
        if scale.count is not None and not 0 <= scale.count <= MAX_COUNT:
            raise InvalidScale(
                f"{name}: count must be between 0 and {MAX_COUNT}",
                detail={"field": f"processes.{name}.count"},
            )
        if scale.memory_mb is not None and (
            not 128 <= scale.memory_mb <= 65536 or scale.memory_mb % 4
        ):
            raise InvalidScale(
                f"{name}: memory must be 128-65536 MB and a multiple of 4",
                detail={"field": f"processes.{name}.memory_mb"},
            )
    return dict(processes)
