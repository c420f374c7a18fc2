"""What an operator command needs, resolved once: settings, the database, the registry."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import click

from ember.api.service import Tenancy
from ember.core.catalog import REGISTRY
from ember.core.errors import Unavailable
from ember.core.settings import Settings, load_settings
from ember.dev.postgres import LocalCluster
from ember.store import migrations
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

    def tenancy(self) -> Tenancy:
        migrations.migrate(self.database_url)
        return Tenancy(self.db, self.event_log(), self.projections())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def make_context(as_json: bool) -> OpsContext:
    """Entry-point only: the one place operator commands read the environment."""
    return OpsContext(settings=load_settings(os.environ), as_json=as_json)


JSON_META = "ember.json"
P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


def json_option(fn: F) -> F:
    """``--json``: machine-readable output with stable field names (docs/specs/cli.md)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_root().meta[JSON_META] = True

    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=False,
        callback=remember,
        is_eager=True,
        help="Print machine-readable JSON.",
    )(fn)


def pass_ops(fn: Callable[Concatenate[OpsContext, P], R]) -> Callable[P, R]:
    """Give a command the OpsContext of its invocation (closed when the command ends)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx = click.get_current_context()
        root = ctx.find_root()
        ops = root.meta.get("ember.ops")
        if ops is None:
            ops = make_context(bool(root.meta.get(JSON_META)))
            root.meta["ember.ops"] = ops
            root.call_on_close(ops.close)
        return fn(ops, *args, **kwargs)

    return wrapper
