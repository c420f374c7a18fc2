"""Printing results: tables for people, stable JSON for scripts (``--json``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table


def console() -> Console:
    # Piped output is never cut to 80 columns: an id ending in "…" is useless to a script.
    wide = None if sys.stdout.isatty() else 1000
    return Console(highlight=False, soft_wrap=True, width=wide)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, sort_keys=True, default=str, indent=None))


def emit_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console().print(table)


def emit_fields(fields: Mapping[str, Any]) -> None:
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        click.echo(f"{key.ljust(width)}  {value}")


def dump(value: BaseModel | Sequence[BaseModel]) -> Any:
    """A wire model (or a list of them) as JSON-able data with the wire's field names."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return [v.model_dump(mode="json") for v in value]


def emit_model(value: BaseModel | Sequence[BaseModel]) -> None:
    emit_json(dump(value))


def when(value: dt.datetime | None) -> str:
    """A timestamp for people: UTC, to the minute."""
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@contextlib.contextmanager
def step(text: str, *, quiet: bool = False) -> Iterator[None]:
    """Announce a long step: a spinner on a terminal, a plain line on stderr otherwise,
    nothing when ``quiet`` (``--json``: stdout and stderr stay machine-readable)."""
    if quiet:
        yield
    elif sys.stderr.isatty():
        with console().status(text):
            yield
    else:
        click.echo(text, err=True)
        yield
