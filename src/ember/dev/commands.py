"""`ember dev`: bring the single-node stack up and down on this machine."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator

import click

from ember import __version__
from ember.cli.output import console, emit_fields, emit_json
from ember.core.catalog import StackStarted, StackStopped
from ember.core.events import ANY, Metadata, NewEvent
from ember.dev.postgres import LocalCluster
from ember.ops.context import OpsContext, json_option, pass_ops
from ember.store import migrations
from ember.store.db import redact

STACK_STREAM = "stack-local"


@click.group()
def dev() -> None:
    """The single-node stack: everything Ember needs, on this machine."""


@dev.command()
@json_option
@pass_ops
def up(ops: OpsContext) -> None:
    """Start the stack (idempotent): Postgres, schema, projections.

    Without EMBER_DATABASE_URL an embedded PostgreSQL cluster is created under
    $EMBER_HOME/postgres (default ~/.local/share/ember) and started.
    """
    embedded = ops.settings.database_url is None
    info: dict[str, object] = {"home": str(ops.settings.home)}
    if embedded:
        cluster = LocalCluster(ops.settings.postgres_dir)
        with _progress(ops, "Preparing the embedded PostgreSQL cluster…"):
            info["postgres_created"] = cluster.init()
            info["postgres_started"] = cluster.start()
            cluster.ensure_database()
        info["postgres"] = f"embedded, {cluster.data_dir}"
    else:
        info["postgres"] = "external (EMBER_DATABASE_URL)"
    with _progress(ops, "Migrating the schema…"):
        info["migrations_applied"] = [
            f"{m.version:04d}_{m.name}" for m in migrations.migrate(ops.database_url)
        ]
    started = StackStarted(
        hostname=socket.gethostname(),
        version=__version__,
        database="embedded" if embedded else "external",
    )
    result = ops.event_log().append(
        STACK_STREAM, ANY, [NewEvent.of(started, Metadata(actor="ember dev up"))]
    )
    runner = ops.projections()
    runner.catch_up()
    info["event"] = f"stack.started at {result.cursor} (version {result.last_version})"
    info["projections"] = {s.name: str(s.cursor) for s in runner.status()}
    info["database_url"] = redact(ops.database_url)
    if ops.as_json:
        emit_json(info)
        return
    console().print("[bold green]Ember single-node stack is up.[/]")
    emit_fields(
        {
            "home": info["home"],
            "postgres": info["postgres"],
            "database": info["database_url"],
            "migrations": ", ".join(info["migrations_applied"]) or "up to date",  # type: ignore[arg-type]
            "event": info["event"],
        }
    )
    click.echo("Next: 'ember admin events list' shows the event log; 'ember dev down' stops.")


@dev.command()
@json_option
@pass_ops
def down(ops: OpsContext) -> None:
    """Stop the stack (idempotent). Data stays in $EMBER_HOME."""
    stopped = False
    if ops.settings.database_url is None:
        cluster = LocalCluster(ops.settings.postgres_dir)
        if cluster.is_running():
            _record_stop(ops)
            ops.close()
            stopped = cluster.stop()
    else:
        _record_stop(ops)
    if ops.as_json:
        emit_json({"stopped": stopped})
    else:
        click.echo(
            "Stopped the embedded PostgreSQL cluster." if stopped else "Nothing was running."
        )


@dev.command()
@json_option
@pass_ops
def status(ops: OpsContext) -> None:
    """Is the stack up, and how far have the projections got?"""
    out: dict[str, object] = {"home": str(ops.settings.home)}
    if ops.settings.database_url is None:
        out["postgres_running"] = LocalCluster(ops.settings.postgres_dir).is_running()
    else:
        out["postgres_running"] = True
    if out["postgres_running"]:
        out["head"] = str(ops.event_log().head())
        out["pending_migrations"] = [
            f"{m.version:04d}_{m.name}" for m in migrations.pending(ops.database_url)
        ]
        out["projections"] = {
            s.name: {"cursor": str(s.cursor), "lag_events": s.lag_events}
            for s in ops.projections().status()
        }
    if ops.as_json:
        emit_json(out)
    else:
        emit_fields(out)


def _record_stop(ops: OpsContext) -> None:
    stopped = StackStopped(hostname=socket.gethostname())
    ops.event_log().append(
        STACK_STREAM, ANY, [NewEvent.of(stopped, Metadata(actor="ember dev down"))]
    )
    ops.projections().catch_up()


@contextlib.contextmanager
def _progress(ops: OpsContext, text: str) -> Iterator[None]:
    if ops.as_json or not sys.stderr.isatty():
        yield
        return
    with console().status(text):
        yield
