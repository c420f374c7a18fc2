"""User commands of `ember` (login, whoami, orgs, apps, envs, tokens)."""

from __future__ import annotations

import click


def register(root: click.Group) -> None:
    """Add the user commands to the root group."""
