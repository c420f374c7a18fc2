"""`ember scale`, `ember restart`, `ember status`: what runs in an environment.

``scale`` parses ``PROCESS=COUNT`` and ``--memory SIZE PROCESS`` locally (a malformed
argument exits 2 naming it, before anything is sent); the server checks the processes
against the live release and the limits.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

import click

from ember.cli.deploy import current_env, env_option
from ember.cli.exits import InvalidArgument
from ember.cli.output import emit_fields, emit_model, emit_table
from ember.cli.session import Session, app_option, json_option, org_option
from ember.core.manifest_model import PROCESS_NAME_RE
from ember.wire import workloads as ww

_MEMORY_RE = re.compile(r"^(\d{1,9})\s*(m|mb|mib|g|gb|gib)?$", re.IGNORECASE)
_COUNT_RE = re.compile(r"^[0-9]{1,9}$")


def parse_memory(text: str) -> int:
    """``512``, ``512M``, ``512MB``, ``1G``, ``1GB`` -> megabytes."""
    m = _MEMORY_RE.match(text.strip())
    if m is None:
        raise InvalidArgument(
            f"invalid memory size {text!r}",
            hint="a size in MB like 512, or with a unit: 512M, 1G",
            detail={"field": "--memory", "argument": text},
        )
    unit = (m[2] or "m").lower()
    return int(m[1]) * (1024 if unit.startswith("g") else 1)


def parse_scale(args: Sequence[str], memory: str | None) -> dict[str, dict[str, int]]:
    """``("web=3", "worker")`` with ``--memory 512`` -> ``{"web": {"count": 3,
    "memory_mb": 512}, "worker": {"memory_mb": 512}}``."""
    if not args:
        raise InvalidArgument(
            "nothing to scale: name a process",
            hint="e.g. 'ember scale web=3' or 'ember scale --memory 512 web'",
            detail={"field": "PROCESS"},
        )
    memory_mb = parse_memory(memory) if memory is not None else None
    out: dict[str, dict[str, int]] = {}
    for arg in args:
        name, sep, count = arg.partition("=")

        def bad(message: str, hint: str, arg: str = arg) -> InvalidArgument:
            return InvalidArgument(
                f"invalid argument {arg!r}: {message}",
                hint=hint,
                detail={"field": "PROCESS", "argument": arg},
            )

        if not name:
            raise bad("no process name before '='", "like web=3")
        if not PROCESS_NAME_RE.match(name):
            raise bad(
                f"{name!r} is not a process name",
                "process names are lowercase letters, digits and '-' (as in ember.toml)",
            )
        if name in out:
            raise bad(f"{name} is named twice", "name each process once")
        entry: dict[str, int] = {}
        if sep:
            if not _COUNT_RE.match(count):
                raise bad("the count must be a whole number", f"like {name}=3")
            entry["count"] = int(count)
        elif memory_mb is None:
            raise bad("no count and no --memory", f"like {name}=3, or --memory 512 {name}")
        if memory_mb is not None:
            entry["memory_mb"] = memory_mb
        out[name] = entry
    return out


def _context(org: str | None, app: str | None, env: str | None) -> tuple[Session, str, str, str]:
    session = Session.load(org=org, app=app, env=env)
    return session, session.org(), session.app(), current_env(session)


@click.command()
@click.argument("processes", nargs=-1, metavar="PROCESS[=COUNT]...")
@click.option(
    "--memory",
    default=None,
    metavar="SIZE",
    help="Memory per instance of the named processes: 512 (MB), 512M, 1G. A new size "
    "replaces the instances, rolling.",
)
@org_option
@app_option
@env_option
@json_option
def scale(
    processes: tuple[str, ...],
    memory: str | None,
    org: str | None,
    app: str | None,
    env: str | None,
    as_json: bool,
) -> None:
    """Set how many instances of each process run, and their memory: 'ember scale web=3
    worker=1', 'ember scale --memory 512 web'. Processes not named keep their scale."""
    wanted = parse_scale(processes, memory)
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        formation = api.scale(org_name, app_name, env_name, wanted)
    if as_json:
        emit_model(formation)
        return
    names = ", ".join(sorted(wanted))
    if formation.changed:
        click.echo(f"Scaled {names} of {app_name} in {env_name}")
    else:
        click.echo(f"{names} of {app_name} in {env_name} already at that scale; nothing to do")
    emit_table(
        None,
        ["PROCESS", "COUNT", "MEMORY"],
        [
            (name, p.count, f"{p.memory_mb} MB" if p.memory_mb else "-")
            for name, p in formation.processes.items()
        ],
    )


@click.command()
@click.argument("processes", nargs=-1, metavar="[PROCESS]...")
@org_option
@app_option
@env_option
@json_option
def restart(
    processes: tuple[str, ...], org: str | None, app: str | None, env: str | None, as_json: bool
) -> None:
    """Replace the instances of PROCESS (default: every process), rolling: each new
    instance becomes healthy before an old one stops."""
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        accepted = api.restart(org_name, app_name, env_name, processes)
    if as_json:
        emit_model(accepted)
        return
    what = ", ".join(accepted.processes) or "every process"
    click.echo(
        f"Restarting {what} of {app_name} in {env_name} (v{accepted.release_version}); "
        "'ember status' shows progress"
    )


@click.command()
@org_option
@app_option
@env_option
@json_option
def status(org: str | None, app: str | None, env: str | None, as_json: bool) -> None:
    """What should run in the environment, what runs, and why it is not converging."""
    session, org_name, app_name, env_name = _context(org, app, env)
    with session.client() as api:
        st = api.status(org_name, app_name, env_name)
    if as_json:
        emit_model(st)
        return
    render_status(st)


def ago(value: dt.datetime, now: dt.datetime | None = None) -> str:
    """``42s ago``, ``5m ago``, ``3h ago``, ``2d ago``."""
    seconds = max(0, int(((now or dt.datetime.now(dt.UTC)) - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _rollout_line(ro: ww.Rollout) -> str:
    state = {
        "running": "in progress",
        "awaiting_promotion": "canary awaits promotion",
        "completed": "completed",
        "halted": f"halted: {ro.reason}",
        "aborted": f"aborted: {ro.reason}",
    }.get(ro.phase, ro.phase)
    back = f" (rolled back to v{ro.rolled_back_to})" if ro.rolled_back_to else ""
    pending = "" if ro.current else " (a newer change waits for the controller)"
    return (
        f"v{ro.release_version} {ro.strategy}, {state}{back}, started {ago(ro.started_at)}{pending}"
    )


def render_status(st: ww.Status) -> None:
    rel = st.release
    fields = {"app": f"{st.app} ({st.env})"}
    if rel is None:
        fields["release"] = "none: 'ember deploy' creates the first"
    else:
        extra = f", rollback to v{rel.rollback_of}" if rel.rollback_of else ""
        auto = ", auto-rollback" if rel.auto_rollback else ""
        fields["release"] = (
            f"v{rel.version} ({rel.image_digest[:19]}…, by {rel.author}, "
            f"{ago(rel.created_at)}{extra}{auto})"
        )
    if st.rollout is not None:
        fields["rollout"] = _rollout_line(st.rollout)
    emit_fields(fields)
    if st.processes:
        click.echo()
        emit_table(
            None,
            ["PROCESS", "DESIRED", "RUNNING", "HEALTHY", "OUTDATED", "MEMORY", "CPUS"],
            [
                (
                    p.name,
                    p.desired,
                    p.running,
                    f"{p.healthy}/{p.desired}",
                    p.outdated or "-",
                    f"{p.memory_mb} MB" if p.memory_mb else "-",
                    f"{p.cpus:g}" if p.cpus is not None else "-",
                )
                for p in st.processes
            ],
        )
    if st.instances:
        click.echo()
        emit_table(
            None,
            ["INSTANCE", "PROCESS", "HOST", "STATE", "HEALTH", "RELEASE", "SINCE"],
            [
                (
                    i.instance_id,
                    i.process,
                    i.host_id or "-",
                    i.state + (f" ({i.exit_code})" if i.exit_code is not None else ""),
                    i.health,
                    f"v{i.release_version}",
                    ago(i.since),
                )
                for i in st.instances
            ],
        )
    click.echo()
    if st.problems:
        click.echo("Not converging:" if not st.converged else "Recent problems:")
        for problem in st.problems:
            click.echo(f"  - {problem}")
    if st.converged:
        click.echo(
            "Converged: every process runs its desired instances, all healthy."
            if st.release
            else "Nothing runs here."
        )
