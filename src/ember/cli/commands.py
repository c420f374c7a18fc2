"""User commands of `ember` (login, whoami, orgs, apps, envs, tokens, deploy, logs,
routes, ips, ...): one module per noun, each talking to the control-plane API through
ember.client only."""

from __future__ import annotations

import click


def register(root: click.Group) -> None:
    """Add the user commands to the root group."""
    from ember.cli.apps import apps
    from ember.cli.auth import login, logout, whoami
    from ember.cli.deploy import deploy, releases, rollback
    from ember.cli.envs import envs
    from ember.cli.hosts import hosts
    from ember.cli.ips import ips
    from ember.cli.logs import logs
    from ember.cli.manifest import manifest
    from ember.cli.orgs import orgs
    from ember.cli.routes import routes
    from ember.cli.tokens import tokens
    from ember.cli.workloads import restart, scale, status

    for command in (
        login,
        logout,
        whoami,
        orgs,
        apps,
        envs,
        tokens,
        manifest,
        deploy,
        releases,
        rollback,
        scale,
        status,
        restart,
        logs,
        routes,
        ips,
        hosts,
    ):
        root.add_command(command)
