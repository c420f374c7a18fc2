"""`ember deploy`, `ember releases`, `ember rollback`.

deploy: validate ember.toml locally, get the image into the platform registry by digest
(push a local OCI layout or archive, or copy from another registry), then create and
promote a release. Deploying what is live already creates nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ember.cli.output import emit_fields, emit_model, emit_table, step, when
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


def _env(session: Session) -> str:
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


@click.command()
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
    "--detach", is_flag=True, help="Return once the release is promoted (today deploy always does)."
)
@json_option
def deploy(
    image: str | None,
    manifest_file: Path,
    org: str | None,
    app: str | None,
    env: str | None,
    detach: bool,
    as_json: bool,
) -> None:
    """Deploy an image with the manifest to an environment as a new release."""
    del detach  # deploy ends at "release promoted" until the scheduler and agents exist
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
    org_name, app_name, env_name = session.org(), session.app(), _env(session)
    with session.client() as api:
        registry = _registry(api)
        repository = f"{org_name}/{app_name}"
        digest = _image_into_registry(image, registry, repository, as_json)
        with step(f"Creating release of {repository}@{digest[:19]} in {env_name} …", quiet=as_json):
            result = api.deploy(
                org_name, app_name, env_name, repository=repository, digest=digest, manifest=text
            )
    release = result.item
    if as_json:
        emit_model(release)
        return
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
    org_name, app_name, env_name = session.org(), session.app(), _env(session)
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
    org_name, app_name, env_name = session.org(), session.app(), _env(session)
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
