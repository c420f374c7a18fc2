"""`ember deploy` (and `ember deploy promote|abort`), `ember releases`, `ember rollback`.

deploy: validate ember.toml locally, get the image into the platform registry by digest
(push a local OCI layout or archive, or copy from another registry), then create and
promote a release, and (unless --detach) wait until its rollout converges
(ember.cli.rollout). Deploying what is live already creates nothing and waits for nothing.

`ember deploy` is a group that runs the deploy itself when no subcommand is given, so
`promote` and `abort` (the current rollout) live beside it without a second noun.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from ember.cli.output import emit_fields, emit_model, emit_table, step, when
from ember.cli.rollout import wait_for_rollout
from ember.cli.session import MissingContext, Session, app_option, checked, json_option, org_option
from ember.client import Client
from ember.client.oci import (
    OciLayout,
    RegistryClient,
    copy_image,
    import_archive,
    parse_reference,
)
from ember.core.errors import Unavailable, ValidationFailed
from ember.core.manifest import parse_manifest
from ember.core.manifest_model import parse_duration

DEFAULT_ENV = "prod"


class NoRegistry(Unavailable):
    code = "cli.no_registry"


F = TypeVar("F", bound=Callable[..., Any])


def env_option(fn: F) -> F:
    return click.option(
        "--env",
        default=None,
        metavar="ENV",
        help=f"Environment (else EMBER_ENV, the config file; default {DEFAULT_ENV!r}).",
    )(fn)


def current_env(session: Session) -> str:
    """The env of a user command: --env, EMBER_ENV, the config file, else 'prod'."""
    value = session.config.env or DEFAULT_ENV
    return checked(value, "env", what="env", source=session.sources.get("env"))


def _image_into_registry(image: str, registry_url: str, repository: str, quiet: bool) -> str:
    """Put ``image`` into the platform registry as ``repository``; return its digest."""
    path = Path(image)
    with RegistryClient(registry_url) as platform:
        if path.is_dir():
            with step(f"Pushing OCI layout {path} …", quiet=quiet):
                return platform.push(OciLayout.open(path), repository).digest
        if path.is_file():
            with tempfile.TemporaryDirectory(prefix="ember-image-") as tmp:
                with step(f"Reading image archive {path} …", quiet=quiet):
                    layout, images = import_archive(path, Path(tmp) / "layout")
                if len(images) != 1:
                    raise ValidationFailed(
                        f"{path} holds {len(images)} images; deploy needs exactly one",
                        detail={"field": "--image"},
                    )
                with step("Pushing the image …", quiet=quiet):
                    return platform.push(layout, repository, images[0]).digest
        ref = parse_reference(image)
        if ref.registry is None:
            raise ValidationFailed(
                f"{image!r} is neither a local OCI layout or archive nor a registry reference",
                hint="give a path, or a reference with its registry: "
                "registry.example.com/team/app:1.2",
                detail={"field": "--image"},
            )
        with RegistryClient(ref.registry) as source:
            with step(f"Resolving {ref} …", quiet=quiet):
                digest = ref.digest or source.resolve(ref)
            with step(f"Copying {ref.repository}@{digest[:19]} …", quiet=quiet):
                return copy_image(source, ref.repository, digest, platform, repository).digest


def duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    """Seconds from ``300`` or a manifest-style duration (``90s``, ``5m``, ``1m30s``, ``1h``)
    — a click option callback."""
    text = value.strip()
    try:
        return float(int(text)) if text.isdigit() else parse_duration(text) / 1000
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 300, 90s, 5m or 1h") from None


DEFAULT_TIMEOUT = "300s"


@click.group(
    invoke_without_command=True,
    subcommand_metavar="[promote|abort]",
)
@click.option(
    "--image",
    "image",
    default=None,
    metavar="REF",
    help="An OCI layout directory, an OCI or 'docker save' archive, or "
    "registry/repository[:tag|@digest].",
)
@click.option(
    "--manifest",
    "manifest_file",
    default="ember.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The manifest.",
)
@org_option
@app_option
@env_option
@click.option(
    "--auto-rollback",
    is_flag=True,
    help="If the rollout halts (new instances fail or miss the deadline), release the "
    "previous release again.",
)
@click.option(
    "--wait/--detach",
    default=True,
    help="Wait until the rollout converges (default), or return once the release is promoted.",
)
@click.option(
    "--timeout",
    callback=duration,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="DURATION",
    help="How long --wait waits (300, 90s, 5m); then exit 6.",
)
@json_option
@click.pass_context
def deploy(
    ctx: click.Context,
    image: str | None,
    manifest_file: Path,
    org: str | None,
    app: str | None,
    env: str | None,
    auto_rollback: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Deploy an image with the manifest to an environment as a new release and wait
    for its rollout; or act on the current rollout ('promote', 'abort')."""
    if ctx.invoked_subcommand is not None:
        _no_deploy_options(ctx)
        return
    if not image:
        raise MissingContext(
            "no image given", hint="pass --image PATH_OR_REFERENCE", detail={"field": "--image"}
        )
    try:
        text = manifest_file.read_text()
    except UnicodeDecodeError as exc:
        raise ValidationFailed(
            f"{manifest_file} is not UTF-8 text", detail={"field": "--manifest"}
        ) from exc
    except OSError as exc:
        raise ValidationFailed(
            f"cannot read {manifest_file}: {exc.strerror}",
            hint="run from your app's directory or pass --manifest FILE",
            detail={"field": "--manifest"},
        ) from exc
    manifest = parse_manifest(text, source=str(manifest_file))
    session = Session.load(org=org, app=app or manifest.app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)
    with session.client() as api:
        registry = _registry(api)
        repository = f"{org_name}/{app_name}"
        digest = _image_into_registry(image, registry, repository, as_json)
        with step(f"Creating release of {repository}@{digest[:19]} in {env_name} …", quiet=as_json):
            result = api.deploy(
                org_name,
                app_name,
                env_name,
                repository=repository,
                digest=digest,
                manifest=text,
                auto_rollback=auto_rollback,
            )
        release = result.item
        if not as_json:
            if result.created:
                click.echo(
                    f"Release v{release.version} of {app_name} promoted in {env_name} "
                    f"(image {digest[:19]}…, manifest {release.manifest_hash[:19]}…)"
                )
            else:
                click.echo(
                    f"Release v{release.version} of {app_name} in {env_name} is identical "
                    "and already live; nothing to do"
                )
        if wait and result.created:
            outcome, status = wait_for_rollout(
                api, org_name, app_name, env_name, release.version, timeout=timeout, quiet=as_json
            )
            if not as_json:
                healthy = ", ".join(
                    f"{p.name} {p.healthy}/{p.desired} healthy" for p in status.processes
                )
                if outcome == "awaiting_promotion":
                    click.echo(
                        f"The canary of v{release.version} is healthy ({healthy}) and awaits "
                        "promotion: 'ember deploy promote' rolls it out to every instance, "
                        "'ember deploy abort' rolls back"
                    )
                else:
                    click.echo(f"v{release.version} is live: {healthy or 'no processes'}")
    if as_json:
        emit_model(release)


def _no_deploy_options(ctx: click.Context) -> None:
    """`ember deploy --image X promote` is a mistake: the options of a deploy say nothing
    about promoting or aborting."""
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)} cannot go before '{ctx.invoked_subcommand}'; "
            f"use 'ember deploy {ctx.invoked_subcommand} [OPTIONS]'",
            ctx,
        )


@deploy.command("promote")
@org_option
@app_option
@env_option
@json_option
def promote(org: str | None, app: str | None, env: str | None, as_json: bool) -> None:
    """Roll a canary that awaits promotion out to every instance."""
    session = Session.load(org=org, app=app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)
    with session.client() as api:
        rollout = api.promote_rollout(org_name, app_name, env_name)
    if as_json:
        emit_model(rollout)
    else:
        click.echo(
            f"Promoted v{rollout.release_version} in {env_name}: the rollout continues to "
            "every instance ('ember status' shows progress)"
        )


@deploy.command("abort")
@org_option
@app_option
@env_option
@json_option
def abort(org: str | None, app: str | None, env: str | None, as_json: bool) -> None:
    """Abort the active rollout: its new instances stop and the previous release is
    released again."""
    session = Session.load(org=org, app=app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)
    with session.client() as api:
        rollout = api.abort_rollout(org_name, app_name, env_name)
    if as_json:
        emit_model(rollout)
    elif rollout.previous_release:
        click.echo(
            f"Aborted the rollout of v{rollout.release_version} in {env_name}: its new "
            f"instances stop and v{rollout.previous_release} is released again"
        )
    else:
        click.echo(
            f"Aborted the rollout of v{rollout.release_version} in {env_name}: its new "
            "instances stop (there is no earlier release to return to)"
        )


def _registry(api: Client) -> str:
    url = api.platform().registry_url
    if not url:
        raise NoRegistry(
            "the control plane has no image registry configured",
            hint="'ember dev up' runs one; set EMBER_REGISTRY_URL for the API",
        )
    return url


@click.command()
@org_option
@app_option
@env_option
@json_option
def releases(org: str | None, app: str | None, env: str | None, as_json: bool) -> None:
    """The releases of an environment, newest first."""
    session = Session.load(org=org, app=app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)
    with session.client() as api:
        items = api.list_releases(org_name, app_name, env_name)
    if as_json:
        emit_model(items)
        return
    emit_table(
        None,
        ["VERSION", "STATUS", "IMAGE", "MANIFEST", "AUTHOR", "REASON", "CREATED"],
        [
            (
                f"v{r.version}",
                r.status,
                r.image.digest[7:19],
                r.manifest_hash[7:19],
                r.author,
                r.reason + (f" to v{r.rollback_of}" if r.rollback_of else ""),
                when(r.created_at),
            )
            for r in items
        ],
    )


@click.command()
@click.argument("version", required=False)
@org_option
@app_option
@env_option
@json_option
def rollback(
    version: str | None, org: str | None, app: str | None, env: str | None, as_json: bool
) -> None:
    """Release again what VERSION (vN; default: the one before the live one) released."""
    target = _version(version) if version else None
    session = Session.load(org=org, app=app, env=env)
    org_name, app_name, env_name = session.org(), session.app(), current_env(session)
    with session.client() as api:
        result = api.rollback(org_name, app_name, env_name, target)
    release = result.item
    if as_json:
        emit_model(release)
    elif result.created:
        emit_fields(
            {
                "release": f"v{release.version} promoted in {env_name}",
                "contents of": f"v{release.rollback_of}",
                "image": release.image.digest,
            }
        )
    else:
        click.echo(f"v{release.version} already has those contents and is live; nothing to do")


def _version(text: str) -> int:
    value = text[1:] if text[:1] in ("v", "V") else text
    if not value.isdigit() or int(value) < 1:
        raise ValidationFailed(
            f"invalid release version {text!r}", hint="like v3 or 3", detail={"field": "version"}
        )
    return int(value)
