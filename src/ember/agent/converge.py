"""The agent's converge step, pure: desired allocations + local VMs → actions.

:func:`plan` compares what the control plane wants on this host (its allocations: instance
id, the instance's state as the control plane last recorded it, ``desired`` run or stop,
the spec) with what the agent knows about its own VMs (:class:`LocalVm`: preparing,
running or exited, with the exit code, whether the health check passed and what was last
reported) and returns what to do, in order:

- a ``run`` allocation the agent has no VM for, still ``pending``/``assigned``:
  :class:`Prepare` then :class:`Start`; one the control plane believes runs (``starting``,
  ``healthy``…) but the host has no VM for (local state lost): :class:`Report` ``failed``;
- a running VM whose allocation says ``stop``, or that is allocated no more (an orphan),
  or whose instance the control plane already wrote off (terminal state): :class:`Stop`;
- observed transitions, each reported once (``LocalVm.reported`` suppresses a repeat
  while the allocations have not caught up yet): a running VM → ``starting`` (with its
  address); its health verdict (:mod:`ember.agent.health`) → ``healthy`` (with its
  address) or, once the control plane knows it started, ``unhealthy`` (with the failing
  check), and back, as often as the verdict flips; an exited VM → ``stopped`` when a stop
  was asked for (by the allocation or by the agent), else ``failed`` with its exit code;
- an exited or never-started VM whose instance is terminal or no longer allocated:
  :class:`Forget` (release its address, tap and record).

Apart from healthy ⇄ unhealthy, reports only move forward (a restarted agent that has not
re-run a health check does not report ``starting`` for a ``healthy`` instance), and a
report repeats neither the allocation's state nor the last report, so a converged host
yields no action at all: the plan is idempotent, and an agent restarted with its VMs
running (adopted before the first plan) neither starts nor stops anything.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from ember.agent.health import Verdict

__all__ = [
    "Action",
    "Allocation",
    "Forget",
    "LocalStatus",
    "LocalVm",
    "Prepare",
    "Report",
    "Start",
    "Stop",
    "plan",
]

TERMINAL = frozenset({"stopped", "failed", "lost"})
NOT_STARTED = frozenset({"pending", "assigned"})


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One item of ``GET /v1/hosts/{id}/allocations``."""

    instance_id: str
    state: str
    desired: str  # "run" | "stop"
    spec: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    app_id: str = ""
    process: str = ""
    org_id: str = ""

    @property
    def network_group(self) -> str:
        """Whom the instance may reach on the host (ember.agent.net.firewall): its org's
        instances; its app's alone when the control plane names no org."""
        return self.org_id or f"app:{self.app_id}"

    @classmethod
    def from_wire(cls, item: Any) -> Allocation:
        return cls(
            instance_id=item.instance_id,
            state=item.state,
            desired=item.desired,
            spec=dict(item.spec),
            app_id=item.app_id,
            process=item.process,
            org_id=getattr(item, "org_id", ""),
        )


class LocalStatus(enum.StrEnum):
    PREPARING = "preparing"
    """Image, address, tap, config drive, VMM start in progress (a worker thread)."""
    RUNNING = "running"
    EXITED = "exited"
    """The VMM is gone (or never started: ``reason`` says why)."""


@dataclasses.dataclass(frozen=True)
class LocalVm:
    instance_id: str
    status: LocalStatus
    exit_code: int | None = None
    health: Verdict | None = None
    """The health checks' verdict (:mod:`ember.agent.health`); ``None`` before the first."""
    health_reason: str = ""
    """Why it is unhealthy (the failing check)."""
    stop_requested: bool = False
    """The agent asked the VM to stop (so its exit is ``stopped``, not ``failed``)."""
    reported: str | None = None
    """The last state the agent reported for it."""
    address: str | None = None
    reason: str = ""
    """Why it exited, when the agent knows (a failed prepare or start)."""


@dataclasses.dataclass(frozen=True)
class Prepare:
    instance_id: str
    allocation: Allocation


@dataclasses.dataclass(frozen=True)
class Start:
    instance_id: str
    allocation: Allocation


@dataclasses.dataclass(frozen=True)
class Stop:
    instance_id: str
    timeout_s: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Report:
    instance_id: str
    state: str
    exit_code: int | None = None
    reason: str = ""
    address: str | None = None


@dataclasses.dataclass(frozen=True)
class Forget:
    instance_id: str


Action = Prepare | Start | Stop | Report | Forget

DEFAULT_KILL_TIMEOUT_S = 5.0


def _kill_timeout(alloc: Allocation | None) -> float:
    if alloc is None:
        return DEFAULT_KILL_TIMEOUT_S
    value = alloc.spec.get("kill_timeout_s", DEFAULT_KILL_TIMEOUT_S)
    return float(value) if isinstance(value, int | float) else DEFAULT_KILL_TIMEOUT_S


def _report(vm: LocalVm, alloc: Allocation, state: str, **kw: Any) -> list[Action]:
    """``state`` unless the control plane already has it or the agent already sent it."""
    if state in (alloc.state, vm.reported):
        return []
    return [Report(vm.instance_id, state, **kw)]


def _exit_report(vm: LocalVm, alloc: Allocation) -> list[Action]:
    if alloc.state in TERMINAL:
        return []
    if vm.stop_requested or alloc.desired == "stop":
        return _report(vm, alloc, "stopped", exit_code=vm.exit_code, reason=vm.reason)
    code = vm.exit_code
    reason = vm.reason or (
        f"exited with code {code}" if code is not None else "the VM exited without an exit status"
    )
    return _report(vm, alloc, "failed", exit_code=code, reason=reason)


def _running(vm: LocalVm, alloc: Allocation) -> list[Action]:
    if vm.stop_requested:
        return []  # a stop is under way; its exit is reported when observed
    if alloc.desired == "stop":
        return [Stop(vm.instance_id, _kill_timeout(alloc), "stop requested")]
    if alloc.state in TERMINAL:
        return [Stop(vm.instance_id, _kill_timeout(alloc), f"instance is {alloc.state}")]
    return _health_report(vm, alloc)


def _health_report(vm: LocalVm, alloc: Allocation) -> list[Action]:
    if vm.health is Verdict.HEALTHY and alloc.state in (*NOT_STARTED, "starting", "unhealthy"):
        return _report(vm, alloc, "healthy", address=vm.address)
    # An unhealthy report carries no address: the control plane learns it from
    # ``starting`` first (below), then hears ``unhealthy``.
    if vm.health is Verdict.UNHEALTHY and alloc.state in ("starting", "healthy"):
        return _report(vm, alloc, "unhealthy", reason=vm.health_reason)
    if alloc.state in NOT_STARTED:
        return _report(vm, alloc, "starting", address=vm.address)
    return []


def _absent(alloc: Allocation) -> list[Action]:
    iid = alloc.instance_id
    if alloc.state in TERMINAL:
        return []
    if alloc.desired == "stop":
        return [Report(iid, "stopped", reason="not running on this host")]
    if alloc.state in NOT_STARTED:
        return [Prepare(iid, alloc), Start(iid, alloc)]
    return [Report(iid, "failed", reason="no VM for this instance on the host")]


def _one(alloc: Allocation, vm: LocalVm | None) -> list[Action]:
    iid = alloc.instance_id
    if vm is None:
        return _absent(alloc)
    if vm.status is LocalStatus.PREPARING:
        return []  # the start finishes first; a stop then follows on the next plan
    if vm.status is LocalStatus.RUNNING:
        return _running(vm, alloc)
    # exited
    if alloc.state in TERMINAL:
        return [Forget(iid)]
    return _exit_report(vm, alloc)


def plan(allocations: Iterable[Allocation], local: Mapping[str, LocalVm]) -> list[Action]:
    """What to do to converge ``local`` on ``allocations`` (see the module docstring)."""
    actions: list[Action] = []
    allocated: set[str] = set()
    for alloc in sorted(allocations, key=lambda a: a.instance_id):
        allocated.add(alloc.instance_id)
        actions += _one(alloc, local.get(alloc.instance_id))
    for iid in sorted(set(local) - allocated):
        vm = local[iid]
        if vm.status is LocalStatus.RUNNING and not vm.stop_requested:
            actions.append(Stop(iid, DEFAULT_KILL_TIMEOUT_S, "not allocated to this host"))
        elif vm.status is LocalStatus.EXITED:
            actions.append(Forget(iid))
    return actions
