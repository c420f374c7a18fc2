"""Release commands and queries: deploy (create + promote) and rollback, per (app, env).

Built on the tenancy service for visibility and on its ``execute`` for the
load-decide-append loop; releases have their own stream and projection.
"""

from __future__ import annotations

from ember.api.service import Row, Tenancy
from ember.core.errors import ValidationFailed
from ember.core.events import EventData
from ember.core.manifest import (
    ManifestInvalid,
    for_environment,
    manifest_hash,
    normalize,
    parse_manifest,
)
from ember.core.releases import (
    Contents,
    ReleaseCreated,
    ReleaseNotFound,
    check_image,
    decide_deploy,
    decide_rollback,
    fold_releases,
    releases_stream,
)
from ember.core.tenancy import Capability, Principal, Scope

PROJECTION = "releases"


class Releases:
    def __init__(self, tenancy: Tenancy) -> None:
        self.t = tenancy

    def authorize(
        self, who: Principal, org: str, app: str, env: str, cap: Capability, what: str
    ) -> Row:
        """The app's row when the caller sees the env (else not found) and, for anything
        but reading, holds ``cap`` on it (else forbidden)."""
        app_row = self.t.visible_app(who, org, app)
        self.t.visible_env(who, org, app, env)
        target = Scope(app_row["org_id"], app_row["app_id"], env)
        if cap is not Capability.READ:
            self.t.require(who, cap, target, what)
        return app_row

    def deploy(
        self,
        who: Principal,
        org: str,
        app: str,
        env: str,
        *,
        repository: str,
        digest: str,
        manifest_text: str,
        auto_rollback: bool = False,
    ) -> tuple[Row, bool]:
        """Create and promote a release; (release, False) when it is already live."""
        app_row = self.authorize(who, org, app, env, Capability.DEPLOY, "deploy")
        check_image(repository, digest)
        if repository != f"{org}/{app}":
            # Releases name images in the app's own repository only: another tenant's
            # repository would be pulled later with the platform's credentials.
            raise ValidationFailed(
                f"a release of {org}/{app} must use the image repository '{org}/{app}'",
                hint="'ember deploy' pushes the image there for you",
                detail={"field": "image.repository"},
            )
        manifest = for_environment(parse_manifest(manifest_text), env)
        if manifest.app != app:
            raise ManifestInvalid(
                f"the manifest is for app {manifest.app!r}, not {app!r}",
                hint="fix 'app' in ember.toml or deploy with --app",
                detail={"errors": [{"path": "app", "message": f"expected {app!r}"}]},
            )
        normalized = normalize(manifest)
        contents = Contents(repository, digest, manifest_hash(manifest), 0)
        state, events = self.t.execute(
            releases_stream(app_row["app_id"], env),
            fold_releases,
            lambda s: decide_deploy(
                s,
                app_id=app_row["app_id"],
                env=env,
                contents=contents,
                manifest=normalized,
                author=who.email,
                auto_rollback=auto_rollback,
            ),
            who.user_id,
            PROJECTION,
        )
        return self.get(who, org, app, env, _version(events, state.active)), bool(events)

    def rollback(
        self, who: Principal, org: str, app: str, env: str, target: int | None
    ) -> tuple[Row, bool]:
        app_row = self.authorize(who, org, app, env, Capability.DEPLOY, "roll back")
        state, events = self.t.execute(
            releases_stream(app_row["app_id"], env),
            fold_releases,
            lambda s: decide_rollback(s, target=target, author=who.email),
            who.user_id,
            PROJECTION,
        )
        return self.get(who, org, app, env, _version(events, state.active)), bool(events)

    def list(
        self, who: Principal, org: str, app: str, env: str, before: int | None, limit: int
    ) -> list[Row]:
        app_row = self.authorize(who, org, app, env, Capability.READ, "read")
        return self.t.query(
            "SELECT * FROM view_releases WHERE app_id = %s AND env = %s AND version < %s "
            "ORDER BY version DESC LIMIT %s",
            [app_row["app_id"], env, 2**31 - 1 if before is None else before, limit],
        )

    def get(self, who: Principal, org: str, app: str, env: str, version: int) -> Row:
        app_row = self.authorize(who, org, app, env, Capability.READ, "read")
        rows = self.t.query(
            "SELECT * FROM view_releases WHERE app_id = %s AND env = %s AND version = %s",
            [app_row["app_id"], env, version],
        )
        if not rows:
            raise ReleaseNotFound(
                f"no release v{version} in {app}/{env}",
                hint="'ember releases' lists them",
                detail={"version": version},
            )
        return rows[0]


def _version(events: list[EventData], active: int | None) -> int:
    """The version just released, or the live one when nothing was written."""
    if events:
        created = events[0]
        assert isinstance(created, ReleaseCreated)
        return created.version
    assert active is not None
    return active
