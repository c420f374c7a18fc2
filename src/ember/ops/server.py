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
@click.option("--host", default="127.0.0.1", show_default=True, envvar="EMBER_API_HOST")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=7070,
    show_default=True,
    envvar="EMBER_API_PORT",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@pass_ops
def api(ops: OpsContext, host: str, port: int, workers: int) -> None:
    """The control-plane HTTP API (uvicorn). Applies migrations first."""
    import logging

    import uvicorn

    from ember.api.app import ApiSettings, create_app

    url = ops.database_url
    migrations.migrate(url)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import os

    registry = os.environ.get("EMBER_REGISTRY_URL") or None
    app = create_app(ApiSettings(database_url=url, registry_url=registry))
    uvicorn.run(app, host=host, port=port, workers=workers, access_log=False, log_level="warning")


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
