"""The `ember` executable: assembles the user CLI with the operator and dev commands, and
is the only place that turns errors into exit codes (docs/specs/cli.md)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from ember import __version__
from ember.cli.exits import Exit, report
from ember.core.errors import EmberError

# Operator groups pull in the store, the API and psycopg: import them only when used,
# so `ember apps list` starts fast.
_LAZY = {
    "admin": ("ember.ops.admin", "admin"),
    "dev": ("ember.dev.commands", "dev"),
    "server": ("ember.ops.server", "server"),
}


class _Root(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY and cmd_name not in self.commands:
            import importlib

            module, attr = _LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ember")
def root() -> None:
    """Ember: deploy OCI images as microVMs behind an L4 edge."""


def _register() -> None:
    from ember.cli.commands import register

    if not root.commands:
        register(root)


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one exit per outcome
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    _register()
    try:
        root.main(args=args, prog_name="ember", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        return int(Exit.UNEXPECTED)
    except click.ClickException as exc:
        exc.show()
        return int(Exit.USAGE) if isinstance(exc, click.UsageError) else exc.exit_code
    except EmberError as exc:
        return int(report(exc, as_json=as_json))
    except Exception as exc:
        if os.environ.get("EMBER_DEBUG"):
            raise
        click.echo(f"Error: unexpected internal error: {type(exc).__name__}: {exc}", err=True)
        click.echo(
            "Hint: this is a bug in ember; rerun with EMBER_DEBUG=1 to see the "
            "traceback and report it",
            err=True,
        )
        return int(Exit.UNEXPECTED)
    except KeyboardInterrupt:
        return 130
    return int(Exit.OK)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
