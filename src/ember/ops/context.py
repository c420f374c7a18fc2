"""What an operator command needs, resolved once: settings, the database, the registry."""

from __future__ import annotations

import dataclasses
import os

import click

from ember.core.catalog import REGISTRY
from ember.core.errors import Unavailable
from ember.core.settings import Settings, load_settings
from ember.dev.postgres import LocalCluster
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.projections import ProjectionRunner
from ember.store.views import all_projections


@dataclasses.dataclass
class OpsContext:
    settings: Settings
    as_json: bool = False
    _db: Database | None = None

    @property
    def database_url(self) -> str:
        if self.settings.database_url:
            return self.settings.database_url
        cluster = LocalCluster(self.settings.postgres_dir)
        if not cluster.is_running():
            raise Unavailable(
                "no control-plane database: the embedded Postgres is not running and "
                "EMBER_DATABASE_URL is not set",
                hint="run 'ember dev up', or set EMBER_DATABASE_URL",
            )
        return cluster.conninfo()

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.database_url)
        return self._db

    def event_log(self) -> EventLog:
        return EventLog(self.db, REGISTRY)

    def projections(self) -> ProjectionRunner:
        return ProjectionRunner(self.db, REGISTRY, all_projections())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def make_context(as_json: bool) -> OpsContext:
    """Entry-point only: the one place operator commands read the environment."""
    return OpsContext(settings=load_settings(os.environ), as_json=as_json)


JSON_META = "ember.json"


def json_option(fn):  # type: ignore[no-untyped-def]
    """``--json``: machine-readable output with stable field names (docs/specs/cli.md)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_root().meta[JSON_META] = True

    return click.option(
        "--json", "as_json", is_flag=True, expose_value=False, callback=remember,
        is_eager=True, help="Print machine-readable JSON.",
    )(fn)


def pass_ops(fn):  # type: ignore[no-untyped-def]
    """Give a command the OpsContext of its invocation (closed when the command ends)."""

    @click.pass_context
    def wrapper(ctx: click.Context, *args, **kwargs):  # type: ignore[no-untyped-def]
        root = ctx.find_root()
        ops = root.meta.get("ember.ops")
        if ops is None:
            ops = make_context(bool(root.meta.get(JSON_META)))
            root.meta["ember.ops"] = ops
            ctx.call_on_close(ops.close)
        return ctx.invoke(fn, ops, *args, **kwargs)

    return _update_wrapper(wrapper, fn)


def _update_wrapper(wrapper, fn):  # type: ignore[no-untyped-def]
    import functools

    return functools.update_wrapper(wrapper, fn)
