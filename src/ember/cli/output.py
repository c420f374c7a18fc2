"""Printing results: tables for people, stable JSON for scripts (``--json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


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
