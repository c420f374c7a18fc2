"""`ember server`: the long-running control-plane processes."""

from __future__ import annotations

import signal
import threading

import click

from ember.ops.context import OpsContext, pass_ops
from ember.store import migrations


@click.group()
def server() -> None:
    """Run a control-plane process in the foreground."""


@server.command()
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@pass_ops
def controller(ops: OpsContext, batch_size: int) -> None:
    """Projectors (and, later, the scheduler and reconcilers). Stops cleanly on SIGTERM."""
    migrations.migrate(ops.database_url)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    click.echo("controller: running projections", err=True)
    ops.projections().run_forever(batch_size=batch_size, stop=stopping.is_set)
