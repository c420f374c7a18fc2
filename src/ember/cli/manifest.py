"""`ember manifest`: check ``ember.toml`` and show what the platform will run. Offline:
these commands read a file and never talk to the API (docs/specs/manifest.md).

Errors besides :class:`ember.core.manifest.ManifestInvalid` (exit 2 like it)::

    ManifestFileMissing      manifest.file_missing      no such file
    ManifestFileUnreadable   manifest.file_unreadable   a directory, no permission, ...
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ember.cli.output import emit_json
from ember.cli.session import json_option
from ember.core.errors import ValidationFailed
from ember.core.manifest import (
    Manifest,
    ManifestError,
    ManifestInvalid,
    for_environment,
    manifest_hash,
    normalize,
    parse_manifest,
    render_json_schema,
)

DEFAULT_FILE = "ember.toml"


class ManifestFileMissing(ValidationFailed):
    code = "manifest.file_missing"


class ManifestFileUnreadable(ValidationFailed):
    code = "manifest.file_unreadable"


def load_manifest_file(path: Path) -> Manifest:
    """Read and validate a manifest file; every failure is an EmberError naming the file
    (exit 2). For any command that needs the manifest (`ember deploy` too)."""
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestFileMissing(
            f"{source} not found",
            hint=f"run this in the app's directory, or pass the manifest's path "
            f"(docs/specs/manifest.md shows a minimal {DEFAULT_FILE})",
            detail={"file": source},
        ) from None
    except OSError as exc:
        raise ManifestFileUnreadable(
            f"cannot read {source}: {exc.strerror or exc}",
            hint="pass the path of a readable manifest file",
            detail={"file": source},
        ) from None
    try:
        text = data.decode("utf-8-sig")  # a BOM some editors write is not content
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        raise ManifestInvalid.of(
            [ManifestError("", "not valid UTF-8 text", line, column)], source=source
        ) from None
    return parse_manifest(text, source=source)


def _file_argument(fn: click.decorators.FC) -> click.decorators.FC:
    return click.argument(
        "file", required=False, default=DEFAULT_FILE, type=click.Path(path_type=Path)
    )(fn)


@click.group()
def manifest() -> None:
    """The app manifest, ember.toml: validate it and see how the platform reads it."""


@manifest.command("validate")
@_file_argument
@json_option
def validate(file: Path, as_json: bool) -> None:
    """Check FILE (default ./ember.toml): every error, one per line, exit 2; or exit 0."""
    parsed = load_manifest_file(file)
    digest = manifest_hash(parsed)
    if as_json:
        emit_json(
            {
                "file": str(file),
                "valid": True,
                "app": parsed.app,
                "manifest_hash": digest,
                "environments": {
                    env: manifest_hash(for_environment(parsed, env))
                    for env in sorted(parsed.environments)
                },
            }
        )
    else:
        click.echo(f"{file} is valid ({digest})")


@manifest.command("show")
@click.option(
    "--normalized",
    is_flag=True,
    help="The canonical form: every default filled, arrays in canonical order.",
)
@click.option(
    "--env",
    default=None,
    metavar="ENV",
    help="The manifest of environment ENV: [environments.ENV] merged over the base.",
)
@_file_argument
@json_option
def show(file: Path, normalized: bool, env: str | None, as_json: bool) -> None:
    """Print FILE (default ./ember.toml) as the platform reads it, with its manifest_hash.

    Without --normalized: defaults filled, in the file's order. The hash is always that of
    the normalized form."""
    parsed = load_manifest_file(file)
    if env is not None:
        if env not in parsed.environments:
            click.echo(
                f"note: {file} has no [environments.{env}]; showing the base manifest", err=True
            )
        parsed = for_environment(parsed, env)
    body = normalize(parsed) if normalized else parsed.model_dump(mode="json")
    body["manifest_hash"] = manifest_hash(parsed)
    if as_json:
        emit_json(body)
    else:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))


@manifest.command("schema")
def schema() -> None:
    """Print the JSON Schema of ember.toml (for editors; docs/specs/manifest.schema.json)."""
    click.echo(render_json_schema(), nl=False)
