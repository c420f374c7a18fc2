"""Releases: an immutable (image digest, manifest hash, secrets version) promoted in an env.

Stream ``releases-<app_id>.<env>``: ``release.created`` (version N = the stream's N-th
release) followed by ``release.promoted``. Deploying what is already live creates nothing;
a rollback is a new release whose contents are those of an older one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from ember.core.errors import NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent

REGISTRY = EventRegistry()
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REPOSITORY_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


class ReleaseNotFound(NotFound):
    code = "release.not_found"


@REGISTRY.register
class ReleaseCreated(EventData):
    event_type = "release.created"
    app_id: str
    env: str
    version: int
    repository: str
    image_digest: str
    manifest_hash: str
    manifest: dict[str, Any]
    secrets_version: int = 0
    author: str
    reason: str  # "deploy" | "rollback"
    rollback_of: int | None = None


@REGISTRY.register
class ReleasePromoted(EventData):
    event_type = "release.promoted"
    app_id: str
    env: str
    version: int
    auto_rollback: bool = False
    """If its rollout halts, the controller promotes the previous release again."""


def releases_stream(app_id: str, env: str) -> str:
    return f"releases-{app_id}.{env}"


@dataclasses.dataclass(frozen=True)
class Contents:
    """What makes two releases the same release."""

    repository: str
    image_digest: str
    manifest_hash: str
    secrets_version: int


@dataclasses.dataclass
class ReleasesState:
    releases: dict[int, ReleaseCreated] = dataclasses.field(default_factory=dict)
    active: int | None = None

    @property
    def latest(self) -> int:
        return max(self.releases, default=0)

    def contents(self, version: int) -> Contents:
        r = self.releases[version]
        return Contents(r.repository, r.image_digest, r.manifest_hash, r.secrets_version)


def fold_releases(events: Iterable[RecordedEvent]) -> ReleasesState:
    state = ReleasesState()
    for e in events:
        if e.type == "release.created":
            created = ReleaseCreated.model_validate(e.data)
            state.releases[created.version] = created
        elif e.type == "release.promoted":
            state.active = int(e.data["version"])
    return state


def check_image(repository: str, digest: str) -> None:
    if not REPOSITORY_RE.match(repository or "") or len(repository) > 255:
        raise ValidationFailed(
            f"invalid image repository {repository!r}",
            hint="lowercase path components like 'acme/hello'",
            detail={"field": "image.repository"},
        )
    if not DIGEST_RE.match(digest or ""):
        raise ValidationFailed(
            f"invalid image digest {digest!r}",
            hint="a pinned digest looks like sha256:<64 hex digits>",
            detail={"field": "image.digest"},
        )


def decide_deploy(
    state: ReleasesState,
    *,
    app_id: str,
    env: str,
    contents: Contents,
    manifest: dict[str, Any],
    author: str,
    auto_rollback: bool = False,
) -> list[EventData]:
    """A new release promoted now, or nothing when the live release is identical."""
    if state.active is not None and state.contents(state.active) == contents:
        return []
    version = state.latest + 1
    return [
        ReleaseCreated(
            app_id=app_id,
            env=env,
            version=version,
            repository=contents.repository,
            image_digest=contents.image_digest,
            manifest_hash=contents.manifest_hash,
            manifest=manifest,
            secrets_version=contents.secrets_version,
            author=author,
            reason="deploy",
        ),
        ReleasePromoted(app_id=app_id, env=env, version=version, auto_rollback=auto_rollback),
    ]


def decide_rollback(state: ReleasesState, *, target: int | None, author: str) -> list[EventData]:
    """A new release with the contents of ``target`` (default: the one before the live
    release), or nothing when those contents are already live."""
    if state.active is None:
        raise ReleaseNotFound(
            "nothing to roll back: no release is live", hint="deploy first with 'ember deploy'"
        )
    if target is None:
        older = [v for v in state.releases if v < state.active]
        if not older:
            raise ReleaseNotFound(
                f"v{state.active} is the first release; there is nothing before it",
                detail={"version": state.active},
            )
        target = max(older)
    if target not in state.releases:
        raise ReleaseNotFound(
            f"no release v{target}", hint="'ember releases' lists them", detail={"version": target}
        )
    source = state.releases[target]
    if state.contents(state.active) == state.contents(target):
        return []
    version = state.latest + 1
    return [
        source.model_copy(
            update={
                "version": version,
                "author": author,
                "reason": "rollback",
                "rollback_of": target,
            }
        ),
        ReleasePromoted(app_id=source.app_id, env=source.env, version=version),
    ]
