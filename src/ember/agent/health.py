"""Health checks of one instance, pure: when each check runs, and the verdict.

The checks are the manifest's (docs/specs/manifest.md §2.2.1), taken from the instance
spec's services of its process (:func:`checks_of`). The agent runs ``tcp`` and ``http``
checks itself against the instance's address (:meth:`InstanceHealth.due`, then
:meth:`InstanceHealth.started` and, when the probe answers, :meth:`InstanceHealth.record`);
the platform init runs ``exec`` checks inside the guest on the same schedule and prints
each result on the console (docs/specs/guest-config.md §4), which the agent records as it
reads them (:meth:`InstanceHealth.record_guest`).

**Schedule.** A check runs every ``interval``; until it first passes, every
:data:`STARTUP_INTERVAL_S` (or its interval, when shorter), and within its grace period
every :data:`GRACE_PROBE_INTERVAL_S` — failures there do not count, so probing often
costs nothing but a connection, and an instance is reported healthy within a fraction
of a second of being ready (a deploy is that much faster), not up to a second later. A
run that has not answered after ``timeout`` fails. A check never runs twice at once.

**Verdict** (:attr:`InstanceHealth.verdict`):

- ``healthy`` once the latest result of every check passed (at once without checks);
- ``unhealthy`` once a check failed :data:`FAILURE_THRESHOLD` times in a row, counting
  only results after its ``grace_period`` from the instance's start (a failure during
  the grace period still keeps a starting instance from being healthy);
- otherwise the verdict stays what it was (``None`` while starting): a healthy
  instance survives fewer failures than the threshold, and an unhealthy one is healthy
  again once every check passes.
"""

from __future__ import annotations

import dataclasses
import enum
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from ember.core.manifest import parse_duration

__all__ = [
    "FAILURE_THRESHOLD",
    "GRACE_PROBE_INTERVAL_S",
    "SILENCE_SLACK_S",
    "STARTUP_INTERVAL_S",
    "Check",
    "CheckState",
    "InstanceHealth",
    "Result",
    "Verdict",
    "checks_of",
]

FAILURE_THRESHOLD = 3
"""Consecutive counted failures of one check that make an instance unhealthy
(Kubernetes' default ``failureThreshold``): one lost packet is not an outage."""

STARTUP_INTERVAL_S = 1.0
"""How often a check runs until it first passes (at most: its interval if shorter)."""
GRACE_PROBE_INTERVAL_S = 0.2
"""...and until it first passes within its grace period (at most: its interval)."""

_DEFAULTS = {"interval": "10s", "timeout": "2s", "grace_period": "5s"}
SILENCE_SLACK_S = 5.0
"""How late an exec check's result may be (console and scheduling jitter) before the
silence counts as a failure (:meth:`InstanceHealth.silent`)."""
REASON_MAX_CHARS = 500
"""A reason goes into a report (at most 2000 characters, no NUL): its detail comes from
what a workload answered, so it is cut and cleaned here — a report the control plane
refuses would be retried on every pass."""


def _printable(text: str, limit: int) -> str:
    clean = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


class Verdict(enum.StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclasses.dataclass(frozen=True)
class Check:
    """One check of the instance's process (times in seconds)."""

    type: str  # tcp | http | exec
    port: int
    """The service's ``internal_port`` (what tcp and http checks connect to)."""
    path: str = "/"
    command: tuple[str, ...] = ()
    interval_s: float = 10.0
    timeout_s: float = 2.0
    grace_s: float = 5.0

    @property
    def in_guest(self) -> bool:
        """Run by the platform init inside the guest, not by the agent."""
        return self.type == "exec"

    def describe(self) -> str:
        if self.type == "http":
            return f"http check GET {self.path} on port {self.port}"
        if self.type == "exec":
            return f"exec check {shlex.join(self.command)!r}"
        return f"tcp check on port {self.port}"


@dataclasses.dataclass(frozen=True)
class Result:
    ok: bool
    detail: str = ""
    """Why it failed: ``connection refused``, ``status 503``, ``timeout``…"""


@dataclasses.dataclass(frozen=True)
class CheckState:
    latest: bool | None = None
    """Whether the latest result passed; ``None`` before the first."""
    failures: int = 0
    """Consecutive failures that counted (after the grace period)."""
    passed_once: bool = False
    last_run: float | None = None
    """When the agent last started it (agent-run checks); when its latest result, or
    silence, was recorded (exec checks)."""
    detail: str = ""
    """Why the latest result failed."""


def _seconds(value: Any, key: str) -> float:
    return parse_duration(str(value if value is not None else _DEFAULTS[key])) / 1000


def checks_of(services: Sequence[Mapping[str, Any]], process: str) -> tuple[Check, ...]:
    """The checks of ``process``'s services, in manifest order (a service without
    ``process`` belongs to every process). Durations are the manifest's canonical
    spellings (``"10s"``); raises ValueError on one that is not."""
    out: list[Check] = []
    for svc in services:
        if process and svc.get("process", process) != process:
            continue
        port = int(svc["internal_port"])
        for check in svc.get("checks") or []:
            out.append(
                Check(
                    type=str(check.get("type", "tcp")),
                    port=port,
                    path=str(check.get("path") or "/"),
                    command=tuple(str(a) for a in check.get("command") or ()),
                    interval_s=_seconds(check.get("interval"), "interval"),
                    timeout_s=_seconds(check.get("timeout"), "timeout"),
                    grace_s=_seconds(check.get("grace_period"), "grace_period"),
                )
            )
    return tuple(out)


def _interval(check: Check, state: CheckState, in_grace: bool) -> float:
    if state.passed_once:
        return check.interval_s
    startup = GRACE_PROBE_INTERVAL_S if in_grace else STARTUP_INTERVAL_S
    return min(check.interval_s, startup)


def _verdict(states: Sequence[CheckState], previous: Verdict | None) -> Verdict | None:
    if any(s.failures >= FAILURE_THRESHOLD for s in states):
        return Verdict.UNHEALTHY
    if all(s.latest for s in states):
        return Verdict.HEALTHY
    return previous


@dataclasses.dataclass(frozen=True)
class InstanceHealth:
    """The checks of one running instance, their states and the verdict (immutable:
    every method returns the next value)."""

    checks: tuple[Check, ...]
    states: tuple[CheckState, ...]
    verdict: Verdict | None = None

    @classmethod
    def of(cls, checks: Sequence[Check], verdict: Verdict | None = None) -> InstanceHealth:
        """Nothing run yet: healthy at once without checks, else ``verdict`` (the one
        recorded before an agent restart; ``None`` for a new instance)."""
        states = (CheckState(),) * len(checks)
        return cls(tuple(checks), states, _verdict(states, verdict))

    @property
    def guest_checks(self) -> tuple[Check, ...]:
        """The exec checks, in the order the init numbers them (the config drive's)."""
        return tuple(c for c in self.checks if c.in_guest)

    def due(self, now: float, started_at: float | None = None) -> list[int]:
        """The agent-run checks to start now (the caller runs each at most once at a
        time: it calls :meth:`started` when it starts one); ``started_at``, the
        instance's start, tells the grace period (None: not in it)."""
        out = []
        for i, (check, state) in enumerate(zip(self.checks, self.states, strict=True)):
            if check.in_guest:
                continue
            last = state.last_run
            # A wall clock that went back must not stall the checks until it catches up.
            in_grace = started_at is not None and now < started_at + check.grace_s
            if last is None or now >= last + _interval(check, state, in_grace) or now < last:
                out.append(i)
        return out

    def started(self, index: int, now: float) -> InstanceHealth:
        state = dataclasses.replace(self.states[index], last_run=now)
        return self._with(index, state)

    def record(
        self, index: int, result: Result, *, now: float, started_at: float
    ) -> InstanceHealth:
        """The result of check ``index`` observed at ``now``; a failure counts only
        after the check's grace period from ``started_at`` (the instance's start)."""
        check, state = self.checks[index], self.states[index]
        if result.ok:
            state = dataclasses.replace(state, latest=True, failures=0, passed_once=True, detail="")
        else:
            counts = now >= started_at + check.grace_s
            state = dataclasses.replace(
                state,
                latest=False,
                failures=state.failures + 1 if counts else state.failures,
                detail=result.detail,
            )
        return self._with(index, state)

    def record_guest(
        self, guest_index: int, result: Result, *, now: float, started_at: float
    ) -> InstanceHealth:
        """The result of the init's exec check number ``guest_index``; an index the
        instance has no check for is ignored."""
        indices = [i for i, c in enumerate(self.checks) if c.in_guest]
        if not 0 <= guest_index < len(indices):
            return self
        index = indices[guest_index]
        recorded = self.record(index, result, now=now, started_at=started_at)
        return recorded._with(index, dataclasses.replace(recorded.states[index], last_run=now))

    def silent(self, now: float, started_at: float) -> InstanceHealth:
        """Count a failure for every exec check the guest has not reported on for its
        interval + timeout + :data:`SILENCE_SLACK_S` (after its grace period): a frozen
        or thrashing guest prints nothing, and must not stay healthy for it. Counted once
        per such stretch of silence."""
        out = self
        for index, (check, state) in enumerate(zip(self.checks, self.states, strict=True)):
            if not check.in_guest:
                continue
            since = state.last_run if state.last_run is not None else started_at + check.grace_s
            quiet = now - since
            if quiet > check.interval_s + check.timeout_s + SILENCE_SLACK_S:
                result = Result(False, f"no result from the guest for {quiet:.0f}s")
                out = out.record(index, result, now=now, started_at=started_at)
                out = out._with(index, dataclasses.replace(out.states[index], last_run=now))
        return out

    @property
    def reason(self) -> str:
        """Why the instance is unhealthy (the first check over the threshold), else ``""``."""
        for check, state in zip(self.checks, self.states, strict=True):
            if state.failures >= FAILURE_THRESHOLD:
                why = f": {state.detail}" if state.detail else ""
                text = f"{check.describe()} failed {state.failures} times in a row{why}"
                return _printable(text, REASON_MAX_CHARS)
        return ""

    def _with(self, index: int, state: CheckState) -> InstanceHealth:
        states = (*self.states[:index], state, *self.states[index + 1 :])
        return dataclasses.replace(self, states=states, verdict=_verdict(states, self.verdict))
