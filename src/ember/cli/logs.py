"""`ember logs`: the console output of an environment's instances, like `heroku logs` and
`fly logs`.

Without ``-f`` it prints the newest ``--lines`` lines and exits; with ``-f`` it then keeps
following (a long-poll loop on the cursor, so nothing is printed twice or skipped) until
Ctrl-C, which exits 0. ``--since`` takes a duration back from now (``90s``, ``10m``,
``1h30m``, ``2d``) or an RFC 3339 time with an offset; a bad one exits 2 naming the flag
before anything is sent. A line's time is when the host's agent read it from the console
(ADR-0016).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from collections.abc import Callable

import click

from ember.cli.deploy import current_env, env_option
from ember.cli.exits import InvalidArgument
from ember.cli.output import emit_json
from ember.cli.session import Session, app_option, json_option, org_option
from ember.core.errors import EmberError, Kind
from ember.wire import logs as wl

__all__ = ["format_line", "logs", "parse_since"]

FOLLOW_WAIT_S = 25.0
"""How long one follow request waits for a line (the server holds it at most 30 s)."""
RETRY_S = 2.0
_DURATION_RE = re.compile(r"^(?:(\d{1,6})d)?(?:(\d{1,7})h)?(?:(\d{1,9})m)?(?:(\d{1,10})s)?$")


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``10m`` / ``1h30m`` / ``2d`` / ``45s`` back from ``now``, or an RFC 3339 time with
    an offset (``2026-11-27T11:00:00Z``)."""
    value = text.strip()
    now = now or dt.datetime.now(dt.UTC)

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            f"invalid --since {text!r}: {why}",
            hint="a duration back from now like 90s, 10m, 1h30m or 2d, or a time like "
            "2026-11-27T11:00:00Z",
            detail={"field": "--since", "argument": text},
        )

    m = _DURATION_RE.match(value.lower())
    if value and m is not None and any(m.groups()):
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        try:
            return now - dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        except OverflowError:
            raise bad("that is before the year 1") from None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise bad("not a duration or a time") from None
    if when.tzinfo is None:
        raise bad("the time needs an offset, like Z or +01:00")
    return when


def format_line(item: wl.LogLine) -> str:
    """``2026-11-27T11:00:00Z web[ab12cd] listening on :8080`` (the instance id's last
    six characters)."""
    ts = item.ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{ts} {item.process}[{item.instance_id[-6:]}] {item.line}"


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--process", default=None, metavar="PROCESS", help="Only this process's lines.")
@click.option("--instance", default=None, metavar="ID", help="Only this instance's lines.")
@click.option(
    "--since",
    default=None,
    metavar="WHEN",
    help="Only lines from this far back (10m, 1h, 2d) or since this time (RFC 3339).",
)
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(1, wl.MAX_READ_LIMIT),
    default=100,
    show_default=True,
    help="How many of the newest lines to print first.",
)
@org_option
@app_option
@env_option
@json_option
def logs(
    follow: bool,
    process: str | None,
    instance: str | None,
    since: str | None,
    count: int,
    org: str | None,
    app: str | None,
    env: str | None,
    as_json: bool,
) -> None:
    """Print the console output of the environment's instances: the workload's stdout
    and stderr, the platform init's lines and kernel messages. '-f' follows; '--json'
    prints one JSON object per line."""
    since_at = parse_since(since) if since is not None else None
    session = Session.load(org=org, app=app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)

    def emit(page: wl.LogPage) -> None:
        for item in page.items:
            if as_json:
                emit_json(item.model_dump(mode="json"))
            else:
                click.echo(format_line(item))

    try:
        with session.client() as api:

            def read(after: str | None, limit: int, wait: float = 0.0) -> wl.LogPage:
                return api.logs(
                    org_name,
                    app_name,
                    env_name,
                    process=process,
                    instance=instance,
                    since=since_at,
                    after=after,
                    limit=limit,
                    wait=wait,
                )

            page = read(None, count)
            emit(page)
            if not follow:
                if not page.items and not as_json:
                    click.echo(f"No log lines of {app_name} in {env_name} yet.", err=True)
                return
            try:
                _follow(read, page.cursor, emit)
            except KeyboardInterrupt:
                return  # Ctrl-C ends a follow: that is how it is meant to stop (exit 0)
    except BrokenPipeError:
        # `ember logs | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _follow(
    read: Callable[[str | None, int, float], wl.LogPage],
    cursor: str,
    emit: Callable[[wl.LogPage], None],
) -> None:
    """Long-poll from ``cursor`` forever; an unreachable control plane is retried."""
    lost = False
    while True:
        try:
            page = read(cursor, wl.MAX_READ_LIMIT, FOLLOW_WAIT_S)
        except EmberError as exc:
            if exc.kind is not Kind.UNAVAILABLE:
                raise
            if not lost:
                click.echo(f"ember: {exc.message}; retrying every {RETRY_S:g}s", err=True)
                lost = True
            time.sleep(RETRY_S)
            continue
        if lost:
            click.echo("ember: reconnected", err=True)
            lost = False
        emit(page)
        cursor = page.cursor
