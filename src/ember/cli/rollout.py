"""Waiting for a release to roll out (`ember deploy`, unless ``--detach``).

The CLI polls ``GET .../status`` and judges each answer with :func:`judge`, a pure
function: the release converged (exit 0), its canary awaits promotion (exit 0, with what
to do next), its rollout halted or was aborted or another release replaced it (exit 6,
:class:`RolloutFailed`), or not yet. Running out of time is exit 6 too
(:class:`RolloutTimeout`), saying whether a rollout ever started: without a running
controller none does.

Errors (both exit 6, "timed out or did not converge")::

    EmberError ├── RolloutFailed    cli.rollout_failed
               └── RolloutTimeout   cli.rollout_timeout
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Literal

import click
from rich.console import Console

from ember.client import Client
from ember.core.errors import EmberError, Kind
from ember.wire import workloads as ww

POLL_INTERVAL = 1.0
MAX_PROBLEMS = 5

Outcome = Literal["converged", "awaiting_promotion", "waiting"]


class RolloutFailed(EmberError):
    code = "cli.rollout_failed"
    kind = Kind.TIMEOUT


class RolloutTimeout(EmberError):
    code = "cli.rollout_timeout"
    kind = Kind.TIMEOUT


def _problems(status: ww.Status) -> str:
    lines = status.problems[:MAX_PROBLEMS]
    more = len(status.problems) - len(lines)
    text = "".join(f"\n  - {p}" for p in lines)
    return text + (f"\n  … and {more} more ('ember status')" if more > 0 else "")


def _live_now(status: ww.Status) -> str:
    live = status.release
    if live is None:
        return "no release is live now"
    if live.reason == "rollback" and live.rollback_of:
        return f"v{live.version} (the contents of v{live.rollback_of}) is live now"
    return f"v{live.version} is live now"


def judge(status: ww.Status, version: int) -> Outcome:
    """Where the rollout of release ``version`` stands; raises RolloutFailed when it
    will not get there by itself."""
    detail: dict[str, object] = {"version": version, "problems": status.problems}
    ro = status.rollout
    live = status.release.version if status.release else None
    # The rollout is about this release when it converges to it, or was started for it
    # (after an auto-rollback the live release differs, and so does its desired state).
    ours = ro is not None and (ro.current or ro.release_version == version)
    if ro is not None and ours and ro.phase in ("halted", "aborted"):
        what = "halted" if ro.phase == "halted" else "was aborted"
        after = f"; {_live_now(status)}" if live != version else ""
        if live == version and ro.rolled_back_to:
            after = f"; rolling back to v{ro.rolled_back_to}"
        raise RolloutFailed(
            f"the rollout of v{ro.release_version} {what}: {ro.reason}{after}" + _problems(status),
            hint="'ember status' shows the instances; fix the cause and deploy again"
            + ("" if ro.auto_rollback else ", or 'ember rollback' to the previous release"),
            detail={**detail, "phase": ro.phase, "rolled_back_to": ro.rolled_back_to},
        )
    if live != version:
        raise RolloutFailed(
            f"v{version} is no longer live: {_live_now(status)}" + _problems(status),
            hint="its rollout halted and was rolled back, or another deploy replaced it; "
            "'ember releases' and 'ember status' show what happened",
            detail={**detail, "phase": "replaced", "live_version": live},
        )
    if status.converged:
        return "converged"
    if ro is not None and ro.current and ro.phase == "awaiting_promotion":
        return "awaiting_promotion"
    return "waiting"


def progress_text(status: ww.Status, version: int) -> str:
    ro = status.rollout
    if ro is None or not ro.current:
        return f"Waiting for the controller to start the rollout of v{version} …"
    parts = ", ".join(f"{p.name} {p.healthy}/{p.desired} healthy" for p in status.processes)
    return f"Rolling out v{version} ({ro.strategy}): {parts or 'no processes'} …"


def _seconds(value: float) -> str:
    return f"{value:g}s"


@contextlib.contextmanager
def _reporter(quiet: bool) -> Iterator[Callable[[str], None]]:
    """Progress: a live line on a terminal, a plain line per change otherwise, nothing
    when ``quiet`` (--json)."""
    if quiet:
        yield lambda _text: None
        return
    if sys.stderr.isatty():
        # On stderr: stdout carries the result only (it may be piped while stderr is not).
        with Console(stderr=True, highlight=False).status("Waiting for the rollout …") as spinner:
            yield spinner.update
        return
    last: list[str] = []

    def line(text: str) -> None:
        if not last or last[-1] != text:
            click.echo(text, err=True)
            last.append(text)

    yield line


def wait_for_rollout(
    api: Client,
    org: str,
    app: str,
    env: str,
    version: int,
    *,
    timeout: float,
    quiet: bool = False,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Outcome, ww.Status]:
    """Poll until :func:`judge` settles (converged or awaiting promotion) or ``timeout``
    seconds pass (RolloutTimeout)."""
    deadline = clock() + timeout
    with _reporter(quiet) as report:
        while True:
            status = api.status(org, app, env)
            outcome = judge(status, version)
            if outcome != "waiting":
                return outcome, status
            report(progress_text(status, version))
            left = deadline - clock()
            if left <= 0:
                raise _timed_out(status, version, timeout)
            sleep(min(interval, left))


def _timed_out(status: ww.Status, version: int, timeout: float) -> RolloutTimeout:
    ro = status.rollout
    detail = {"version": version, "timeout_s": timeout, "problems": status.problems}
    if ro is None or not ro.current:
        return RolloutTimeout(
            f"no rollout of v{version} started within {_seconds(timeout)}: "
            "the controller may not be running",
            hint="'ember dev up' starts one (operators: 'ember server controller'); v"
            f"{version} is released and rolls out once a controller runs. "
            "'ember deploy --detach' does not wait",
            detail={**detail, "started": False},
        )
    return RolloutTimeout(
        f"v{version} did not converge within {_seconds(timeout)}" + _problems(status),
        hint="the rollout goes on without you: 'ember status' shows why it is slow; "
        "--timeout waits longer",
        detail={**detail, "started": True, "phase": ro.phase},
    )
