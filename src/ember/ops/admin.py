"""`ember admin`: operator commands that work on the control-plane database directly."""

from __future__ import annotations

import click

from ember.cli.output import emit_fields, emit_json, emit_table
from ember.core.errors import EmberError, ValidationFailed
from ember.core.events import ZERO, Cursor
from ember.core.tenancy import (
    Capability,
    Role,
    UserNotFound,
    check_capabilities,
    check_name,
)
from ember.ops.context import OpsContext, json_option, pass_ops
from ember.store import migrations
from ember.store.eventlog import dumps


@click.group()
def admin() -> None:
    """Operate the control plane: migrations, projections, the event log."""


@admin.command()
@json_option
@pass_ops
def migrate(ops: OpsContext) -> None:
    """Apply pending database migrations (safe to run any time)."""
    applied = migrations.migrate(ops.database_url)
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    if ops.as_json:
        emit_json({"applied": names})
    else:
        click.echo("Applied: " + ", ".join(names) if names else "Database schema is up to date.")


@admin.group()
def projections() -> None:
    """Inspect, run and rebuild projections (the views built from the event log)."""


@projections.command("status")
@json_option
@pass_ops
def projections_status(ops: OpsContext) -> None:
    """Each projection's cursor and how many events it has yet to fold."""
    rows = ops.projections().status()
    if ops.as_json:
        emit_json(
            [{"name": s.name, "cursor": str(s.cursor), "lag_events": s.lag_events} for s in rows]
        )
    else:
        emit_table(
            None, ["PROJECTION", "CURSOR", "LAG"], [(s.name, s.cursor, s.lag_events) for s in rows]
        )


@projections.command("run")
@click.argument("name", required=False)
@json_option
@pass_ops
def projections_run(ops: OpsContext, name: str | None) -> None:
    """Fold every readable event into the views once, then stop."""
    totals = ops.projections().catch_up(name)
    _print_totals(ops, totals, "folded")


@projections.command("rebuild")
@click.argument("name", required=False)
@json_option
@pass_ops
def projections_rebuild(ops: OpsContext, name: str | None) -> None:
    """Empty the views and replay the whole event log (all projections, or NAME)."""
    runner = ops.projections()
    totals = runner.rebuild(name)
    if ops.as_json:
        emit_json({n: {"events": c, "digest": runner.digest(n)} for n, c in totals.items()})
    else:
        for n, c in totals.items():
            click.echo(f"Rebuilt {n} from {c} events (digest {runner.digest(n)[:16]})")


@projections.command("verify")
@click.argument("name", required=False)
@json_option
@pass_ops
def projections_verify(ops: OpsContext, name: str | None) -> None:
    """Check that the live views equal a rebuild from zero (changes nothing).

    Exits 1 when a view has drifted: rebuild it with 'ember admin projections rebuild'.
    """
    results = ops.projections().verify(name)
    drifted = sorted(n for n, (live, rebuilt) in results.items() if live != rebuilt)
    if ops.as_json:
        emit_json({n: {"live": a, "rebuilt": b, "ok": a == b} for n, (a, b) in results.items()})
    else:
        for n, (live, rebuilt) in results.items():
            verdict = "ok" if live == rebuilt else "DRIFTED"
            click.echo(f"{n}: {verdict} (live {live[:16]}, rebuilt {rebuilt[:16]})")
    if drifted:
        raise ViewsDrifted(
            f"views differ from a rebuild: {', '.join(drifted)}",
            hint="run 'ember admin projections rebuild' and report the bug",
            detail={"projections": drifted},
        )


class ViewsDrifted(EmberError):
    code = "projection.drifted"


@admin.group()
def events() -> None:
    """Read the event log."""


@events.command("list")
@click.option(
    "--after", "after", default=str(ZERO), show_default=True, help="Cursor to read after."
)
@click.option("--stream", "stream_id", default=None, help="Only this stream, in version order.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
@pass_ops
def events_list(ops: OpsContext, after: str, stream_id: str | None, limit: int) -> None:
    """Events in commit-safe order (or one stream's events)."""
    log = ops.event_log()
    cursor = Cursor.parse(after)
    if stream_id and cursor != ZERO:
        raise ValidationFailed(
            "--after and --stream do not combine: a stream is read by version",
            detail={"field": "--after"},
        )
    page = (
        log.read_stream(stream_id, limit=limit) if stream_id else log.read_all(cursor, limit=limit)
    )
    if ops.as_json:
        for event in page:
            click.echo(dumps(event))
        return
    emit_table(
        None,
        ["CURSOR", "STREAM", "VER", "TYPE", "RECORDED"],
        [
            (
                e.cursor,
                e.stream_id,
                e.stream_version,
                e.type,
                e.recorded_at.isoformat(timespec="seconds"),
            )
            for e in page
        ],
    )


@events.command("tail")
@click.option("--after", "after", default=None, help="Cursor to read after (default: now).")
@json_option
@pass_ops
def events_tail(ops: OpsContext, after: str | None) -> None:
    """Follow the event log live (Ctrl-C to stop); one JSON line per event."""
    log = ops.event_log()
    cursor = Cursor.parse(after) if after else log.head()
    try:
        for event in log.subscribe(cursor):
            click.echo(dumps(event))
    except KeyboardInterrupt:
        pass


@events.command("streams")
@click.option("--kind", default=None, help="Only streams of this kind (the part before '-').")
@json_option
@pass_ops
def events_streams(ops: OpsContext, kind: str | None) -> None:
    """Every stream with its version and last event (from the 'streams' view)."""
    with ops.db.connection() as conn:
        rows = conn.execute(
            "SELECT stream_id, kind, version, last_type, last_recorded_at FROM view_streams "
            "WHERE %(k)s::text IS NULL OR kind = %(k)s ORDER BY stream_id",
            {"k": kind},
        ).fetchall()
    if ops.as_json:
        emit_json(
            [
                {
                    "stream_id": r[0],
                    "kind": r[1],
                    "version": r[2],
                    "last_type": r[3],
                    "last_recorded_at": r[4].isoformat(),
                }
                for r in rows
            ]
        )
    else:
        emit_table(
            None,
            ["STREAM", "KIND", "VERSION", "LAST EVENT", "AT"],
            [(r[0], r[1], r[2], r[3], r[4].isoformat(timespec="seconds")) for r in rows],
        )


def _print_totals(ops: OpsContext, totals: dict[str, int], verb: str) -> None:
    if ops.as_json:
        emit_json(totals)
    else:
        emit_fields({name: f"{count} events {verb}" for name, count in totals.items()})


@admin.command("create-user")
@click.option("--email", required=True, help="The user's email (their identity).")
@click.option("--name", default="", help="Display name.")
@click.option(
    "--org",
    default=None,
    help="Also make the user a member of this org (created, owned by them, if it does not exist).",
)
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.OWNER.value,
    show_default=True,
    help="Role in --org.",
)
@click.option(
    "--operator",
    is_flag=True,
    help="Also make the user a platform operator (hosts); never revokes it.",
)
@json_option
@pass_ops
def create_user(
    ops: OpsContext, email: str, name: str, org: str | None, role: str, operator: bool
) -> None:
    """Create a user (idempotent), optionally with an org membership."""
    svc = ops.tenancy()
    if org:
        check_name(org, "org")
    user = svc.ensure_user(email, name, actor="ember admin")
    if operator:
        user, _ = svc.set_operator(user["email"], True, actor="ember admin")
    out: dict[str, object] = {
        "user_id": user["user_id"],
        "email": user["email"],
        "operator": user["operator"],
    }
    if org:
        if svc.org_by_name(org) is None:
            svc.create_org(None, org, owner_id=user["user_id"])
        svc.operator_set_member(org, user["user_id"], Role(role), "ember admin")
        out.update(org=org, role=role)
    if ops.as_json:
        emit_json(out)
    else:
        emit_fields(out)


@admin.command("grant-operator")
@click.argument("email")
@click.option("--revoke", is_flag=True, help="Take the operator role away instead.")
@json_option
@pass_ops
def grant_operator(ops: OpsContext, email: str, revoke: bool) -> None:
    """Make the user EMAIL a platform operator (idempotent), or --revoke it.

    Operators manage hosts, through an unscoped token with the 'admin' capability; the
    change applies to the user's existing tokens on their next request.
    """
    user, changed = ops.tenancy().set_operator(email, not revoke, actor="ember admin")
    out = {
        "user_id": user["user_id"],
        "email": user["email"],
        "operator": user["operator"],
        "changed": changed,
    }
    if ops.as_json:
        emit_json(out)
    elif not changed:
        state = "is not" if revoke else "is already"
        click.echo(f"{user['email']} {state} a platform operator (nothing changed)")
    else:
        click.echo(f"{user['email']} {'is no longer' if revoke else 'is now'} a platform operator")


@admin.command("create-token")
@click.option("--email", required=True, help="Whose token.")
@click.option("--name", required=True, help="What the token is for, e.g. 'ci'.")
@click.option("--org", default=None, help="Limit the token to this org.")
@click.option("--app", default=None, help="Limit the token to this app (needs --org).")
@click.option("--env", default=None, help="Limit the token to this environment (needs --app).")
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    type=click.Choice([c.value for c in Capability]),
    help="Repeatable; default: all.",
)
@click.option("--expires-in-days", type=click.IntRange(1, 3650), default=None)
@json_option
@pass_ops
def create_token(
    ops: OpsContext,
    email: str,
    name: str,
    org: str | None,
    app: str | None,
    env: str | None,
    capabilities: tuple[str, ...],
    expires_in_days: int | None,
) -> None:
    """Issue an API token for a user. The secret is printed once; only its hash is kept."""
    svc = ops.tenancy()
    user = svc.user_by_email(email)
    if user is None:
        raise UserNotFound(
            f"no user with email {email!r}",
            hint="create it with 'ember admin create-user'",
            detail={"email": email},
        )
    scope = svc.scope_for(org, app, env, who=None)
    caps = check_capabilities(list(capabilities)) if capabilities else frozenset(Capability)
    secret, row = svc.issue_token(
        user["user_id"],
        name,
        scope=scope,
        capabilities=caps,
        expires_in_days=expires_in_days,
        actor="ember admin",
    )
    if ops.as_json:
        emit_json({"id": row["token_id"], "token": secret, "user_id": user["user_id"]})
    else:
        click.echo(secret)
        click.echo(f"(token {row['token_id']}: shown once, store it now)", err=True)
