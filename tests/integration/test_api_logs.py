"""Workload logs over HTTP on a real Postgres: agents ship lines of their own instances
(node identities, signed requests), users read an environment's lines with filters and
follow them with a long-poll, retention prunes, bad input gets stable 4xx codes, and logs
never enter the event log.

Instances are placed by appending the controller's and the scheduler's events (as
tests.support.hosts.place does, here with a process name of our choosing).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from ember.api.app import ApiSettings, create_app
from ember.core.hosts import InstanceAssigned, host_stream
from ember.core.instances import InstanceCreated, InstanceSpec
from ember.core.tenancy import Capability, Scope
from ember.core.workloads import workload_stream
from ember.store.logs import Retention
from ember.wire import logs as wl
from tests.support.api import Api, Tenant, auth
from tests.support.hosts import append, enroll_node, operator_token

T0 = dt.datetime(2026, 11, 27, 11, 0, tzinfo=dt.UTC)


@pytest.fixture
def op(api: Api) -> str:
    return operator_token(api)


@pytest.fixture
def nodes(api: Api, op: str) -> dict[str, httpx.Auth]:
    return {h: enroll_node(api, op, h) for h in ("h1", "h2")}


def place(api: Api, tenant: Tenant, host_id: str, instance_id: str, process: str = "web") -> None:
    spec = InstanceSpec(
        release_version=1,
        repository=f"{tenant.org}/{tenant.app}",
        image_digest="sha256:" + "a" * 64,
        memory_mb=256,
        cpus=0.5,
    )
    app_id = tenant.app_id
    created = InstanceCreated(
        instance_id=instance_id,
        app_id=app_id,
        env=tenant.env,
        process=process,
        spec=spec,
        spec_hash=spec.spec_hash,
    )
    append(api, workload_stream(app_id, tenant.env), created)
    assigned = InstanceAssigned(
        host_id=host_id,
        instance_id=instance_id,
        app_id=app_id,
        env=tenant.env,
        process=process,
        memory_mb=256,
        cpus=0.5,
    )
    append(api, host_stream(host_id), assigned)
    api.svc.runner.catch_up("scheduling")


def lines(*texts: str, ts: dt.datetime = T0, stream: str = "app") -> list[dict[str, Any]]:
    return [{"ts": ts.isoformat(), "stream": stream, "line": t} for t in texts]


def ship(
    api: Api,
    who: httpx.Auth | str,
    host_id: str,
    instance_id: str,
    body: Any,
    expect: int = 202,
) -> dict[str, Any]:
    """``body``: JSON, or a str sent as it is (JSON that Python cannot encode)."""
    path = f"/v1/hosts/{host_id}/instances/{instance_id}/logs"
    kw: dict[str, Any] = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, str)
        else {"json": body}
    )
    if isinstance(who, str):
        kw["headers"] = {**kw.get("headers", {}), **auth(who)}
    else:
        kw["auth"] = who
    r = api.client.post(path, **kw)
    assert r.status_code == expect, r.text
    out: dict[str, Any] = r.json()
    return out


def read(api: Api, tenant: Tenant, expect: int = 200, token: str | None = None, **q: Any) -> Any:
    path = f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs/{tenant.env}/logs"
    r = api.client.get(path, params=q, headers=auth(token or tenant.token))
    assert r.status_code == expect, r.text
    return r.json()


def texts(page: dict[str, Any]) -> list[str]:
    return [i["line"] for i in page["items"]]


def code(body: dict[str, Any]) -> str:
    return str(body["error"]["code"])


# -- shipping -------------------------------------------------------------------------------


def test_a_node_ships_its_instances_lines_and_the_user_reads_them(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_a")
    assert read(api, tenant) == {"items": [], "cursor": "0"}
    events = api.event_count()
    accepted = ship(
        api,
        nodes["h1"],
        "h1",
        "ins_a",
        {
            "lines": [
                *lines("[    0.5123] Linux version 6.1", stream="kernel"),
                *lines("ember-init: starting web", stream="init"),
                *lines("listening on :8080", "  indented, unicode: é ✓", ""),
            ]
        },
    )
    assert accepted == {"instance_id": "ins_a", "accepted": 5}
    assert api.event_count() == events, "logs are not events"

    page = read(api, tenant)
    assert [(i["stream"], i["line"]) for i in page["items"]] == [
        ("kernel", "[    0.5123] Linux version 6.1"),
        ("init", "ember-init: starting web"),
        ("app", "listening on :8080"),
        ("app", "  indented, unicode: é ✓"),
        ("app", ""),
    ]
    first = page["items"][0]
    assert (first["process"], first["instance_id"]) == ("web", "ins_a")
    assert dt.datetime.fromisoformat(first["ts"]) == T0
    ids = [i["id"] for i in page["items"]]
    assert ids == sorted(ids) and page["cursor"] == str(ids[-1])
    wl.LogPage.model_validate(page)
    row = api.scalar("SELECT org_id || ' ' || host_id FROM instance_logs LIMIT 1")
    assert row == f"{tenant.org_id} h1"


def test_only_the_instances_own_host_ships_for_it(
    api: Api, tenant: Tenant, op: str, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_a")
    body = {"lines": lines("hello")}
    # Another host's node: not for host h1 (403), and for its own host no such instance.
    assert code(ship(api, nodes["h2"], "h1", "ins_a", body, 403)) == "auth.forbidden"
    assert code(ship(api, nodes["h2"], "h2", "ins_a", body, 404)) == "instance.not_found"
    assert code(ship(api, nodes["h1"], "h1", "ins_nope", body, 404)) == "instance.not_found"
    # A user (even the app's owner) is no agent; without credentials nobody is.
    assert code(ship(api, tenant.token, "h1", "ins_a", body, 403)) == "auth.forbidden"
    r = api.client.post("/v1/hosts/h1/instances/ins_a/logs", json=body)
    assert r.status_code == 401
    assert read(api, tenant)["items"] == []
    # A platform operator may act for any host.
    assert ship(api, op, "h1", "ins_a", body)["accepted"] == 1


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        ({"lines": []}, 422, "request.invalid", "body.lines"),
        ({"lines": lines("x") * 1001}, 422, "request.invalid", "body.lines"),
        ({"lines": lines("x" * 8193)}, 422, "request.invalid", "body.lines.0.line"),
        ({"lines": lines("a\x00b")}, 422, "logs.invalid", "lines.0.line"),
        (
            '{"lines": [{"ts": "2026-11-27T11:00:00Z", "line": "x"},'
            ' {"ts": "2026-11-27T11:00:00Z", "line": "\\ud800"}]}',
            422,
            "request.invalid",
            "body.lines.1.line",
        ),
        ({"lines": lines("x" * 8000) * 40}, 422, "logs.batch_too_large", "lines"),
        (
            {"lines": [{"ts": "2026-11-27T11:00:00", "line": "x"}]},
            422,
            "request.invalid",
            "body.lines.0.ts",
        ),
        ({"lines": lines("x", stream="stderr")}, 422, "request.invalid", "body.lines.0.stream"),
        (
            {"lines": [{**lines("x")[0], "level": "info"}]},
            422,
            "request.invalid",
            "body.lines.0.level",
        ),
        ({"line": "x"}, 422, "request.invalid", "body.lines"),
    ],
)
def test_bad_batches_get_stable_codes_and_store_nothing(
    api: Api,
    tenant: Tenant,
    nodes: dict[str, httpx.Auth],
    body: Any,
    status: int,
    error: str,
    field: str,
) -> None:
    place(api, tenant, "h1", "ins_a")
    err = ship(api, nodes["h1"], "h1", "ins_a", body, status)["error"]
    assert err["code"] == error
    if error == "request.invalid":
        assert field in [e["loc"] for e in err["detail"]["errors"]]
    else:
        assert err["detail"]["field"] == field
    assert api.scalar("SELECT count(*) FROM instance_logs") == 0


# -- reading ----------------------------------------------------------------------------------


def test_reads_filter_by_process_instance_and_since_and_page_by_cursor(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_web1")
    place(api, tenant, "h2", "ins_web2")
    place(api, tenant, "h2", "ins_work", process="worker")
    later = T0 + dt.timedelta(minutes=10)
    ship(api, nodes["h1"], "h1", "ins_web1", {"lines": lines("w1 old", ts=T0)})
    ship(api, nodes["h2"], "h2", "ins_web2", {"lines": lines("w2 old", ts=T0)})
    ship(api, nodes["h2"], "h2", "ins_work", {"lines": lines("job 1", "job 2", ts=later)})
    ship(api, nodes["h1"], "h1", "ins_web1", {"lines": lines("w1 new", ts=later)})

    everything = read(api, tenant)
    assert texts(everything) == ["w1 old", "w2 old", "job 1", "job 2", "w1 new"]
    head = everything["cursor"]
    assert texts(read(api, tenant, process="web")) == ["w1 old", "w2 old", "w1 new"]
    assert texts(read(api, tenant, process="worker")) == ["job 1", "job 2"]
    assert texts(read(api, tenant, instance="ins_web1")) == ["w1 old", "w1 new"]
    assert texts(read(api, tenant, process="web", instance="ins_work")) == []
    since = (T0 + dt.timedelta(minutes=5)).isoformat()
    assert texts(read(api, tenant, since=since)) == ["job 1", "job 2", "w1 new"]
    assert texts(read(api, tenant, since="2026-11-27T12:05:00+01:00")) == texts(
        read(api, tenant, since=since)
    ), "an offset is honoured"

    # Without after: the newest `limit`; with it: forward from the cursor, oldest first.
    newest = read(api, tenant, limit=2)
    assert texts(newest) == ["job 2", "w1 new"] and newest["cursor"] == head
    first_id = everything["items"][0]["id"]
    page = read(api, tenant, after=str(first_id), limit=2)
    assert texts(page) == ["w2 old", "job 1"]
    page = read(api, tenant, after=page["cursor"], limit=2)
    assert texts(page) == ["job 2", "w1 new"]
    done = read(api, tenant, after=page["cursor"], limit=2)
    assert done == {"items": [], "cursor": head}
    # A filter that matches nothing still moves the cursor to the newest line.
    assert read(api, tenant, process="nope", after=str(first_id)) == {"items": [], "cursor": head}


def test_another_org_and_other_scopes_get_not_found(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_a")
    ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("secret")})
    other = api.tenant("rival")
    assert code(read(api, tenant, 404, token=other.token)).endswith("not_found")
    # A token scoped to another env of the app is as good as another tenant's.
    api.call(
        "POST",
        f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs",
        tenant.token,
        201,
        {"name": "staging"},
    )
    scoped = api.mint(
        tenant.user_id,
        scope=Scope(tenant.org_id, tenant.app_id, "staging"),
        caps=frozenset({Capability.READ}),
    )
    assert code(read(api, tenant, 404, token=scoped)) == "env.not_found"
    # A read-only token scoped to this env reads it (the capability `ember status` needs).
    viewer = api.mint(
        tenant.user_id,
        scope=Scope(tenant.org_id, tenant.app_id, tenant.env),
        caps=frozenset({Capability.READ}),
    )
    assert texts(read(api, tenant, token=viewer)) == ["secret"]
    # A node identity reads no user's logs.
    path = f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs/{tenant.env}/logs"
    assert api.client.get(path, auth=nodes["h1"]).status_code == 403


def test_an_env_made_again_under_the_same_name_starts_empty(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_a")
    ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("from the old env")})
    envs = f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs"
    api.call("DELETE", f"{envs}/{tenant.env}", tenant.token, 204)
    assert code(read(api, tenant, 404)) == "env.not_found"
    api.call("POST", envs, tenant.token, 201, {"name": tenant.env})
    assert read(api, tenant)["items"] == []


@pytest.mark.parametrize(
    ("query", "error", "field"),
    [
        ({"limit": 0}, "request.invalid", "query.limit"),
        ({"limit": 1001}, "request.invalid", "query.limit"),
        ({"after": "yesterday"}, "request.invalid", "query.after"),
        ({"after": "1" * 20}, "request.invalid", "query.after"),
        ({"after": "9" * 19}, "logs.invalid", "after"),
        ({"after": "1", "wait": 31}, "request.invalid", "query.wait"),
        ({"wait": 1}, "logs.invalid", "wait"),
        ({"since": "2026-11-27T11:00:00"}, "request.invalid", "query.since"),
        ({"since": "10m"}, "request.invalid", "query.since"),
        ({"process": "x" * 64}, "request.invalid", "query.process"),
    ],
)
def test_bad_read_parameters_get_stable_codes(
    api: Api, tenant: Tenant, query: dict[str, Any], error: str, field: str
) -> None:
    err = read(api, tenant, 422, **query)["error"]
    assert err["code"] == error
    if error == "request.invalid":
        assert field in [e["loc"] for e in err["detail"]["errors"]]
    else:
        assert err["detail"]["field"] == field


# -- following ----------------------------------------------------------------------------------


def _follow(api: Api, tenant: Tenant, out: list[Any], **q: Any) -> threading.Thread:
    def go() -> None:
        out.append(read(api, tenant, **q))

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _until_waiting(api: Api, n: int = 1) -> None:
    feed = api.app.state.logs.feed
    for _ in range(2000):
        if feed.waiting() >= n:
            return
        threading.Event().wait(0.005)
    raise AssertionError("the follower never waited")


def test_a_follower_wakes_on_a_new_line_of_its_env_only(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    place(api, tenant, "h1", "ins_a")
    place(api, tenant, "h1", "ins_w", process="worker")
    other = api.tenant("other")
    place(api, other, "h2", "ins_other")
    cursor = read(api, tenant)["cursor"]

    # Nothing new: the wait runs out with nothing, and the same cursor.
    assert read(api, tenant, after=cursor, wait=0.2) == {"items": [], "cursor": cursor}

    got: list[Any] = []
    follower = _follow(api, tenant, got, after=cursor, wait=25, process="worker")
    _until_waiting(api)
    # Lines of another env, and of another process of this env, do not answer it...
    ship(api, nodes["h2"], "h2", "ins_other", {"lines": lines("not yours")})
    ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("web chatter")})
    # ...a matching line does.
    ship(api, nodes["h1"], "h1", "ins_w", {"lines": lines("job done")})
    follower.join(30)
    assert not follower.is_alive()
    (page,) = got
    assert texts(page) == ["job done"]
    assert read(api, tenant, after=page["cursor"], wait=0.1)["items"] == []


def test_writers_of_one_env_commit_in_id_order_so_followers_skip_nothing(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    """Writer A holds its insert uncommitted; writer B must wait for it, or B's line would
    commit first with a bigger id and a reader past it would never see A's."""
    place(api, tenant, "h1", "ins_a")
    start = read(api, tenant)["cursor"]
    app_id = tenant.app_id
    with psycopg.connect(api.database_url) as a:
        a.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 3))", (f"logs:{app_id}/prod",))
        a.execute(
            "INSERT INTO instance_logs (org_id, app_id, env, process, instance_id, host_id, "
            "stream, ts, line) VALUES ('o', %s, 'prod', 'web', 'ins_a', 'h1', 'app', now(), 'A')",
            (app_id,),
        )
        shipped: list[Any] = []
        b = threading.Thread(
            target=lambda: shipped.append(
                ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("B")})
            )
        )
        b.start()
        with api.db.connection() as conn:
            for _ in range(2000):  # until B waits on the lock (or, wrongly, has finished)
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()
                if (waiting and waiting[0]) or not b.is_alive():
                    break
                threading.Event().wait(0.005)
        assert b.is_alive() and not shipped, "B did not wait for A"
        mid = read(api, tenant, after=start)
        assert mid == {"items": [], "cursor": start}
        a.commit()
    b.join(10)
    assert texts(read(api, tenant, after=mid["cursor"])) == ["A", "B"]


def test_a_writer_that_waits_too_long_for_its_env_is_told_to_ship_again_later(
    api: Api, tenant: Tenant, nodes: dict[str, httpx.Auth]
) -> None:
    """Writers queued on one env's lock each hold a pooled connection: past the lock
    timeout the API answers 503 logs.busy (the agent ships again next pass) rather than
    draining the pool for every other request."""
    place(api, tenant, "h1", "ins_a")
    with psycopg.connect(api.database_url) as holder:
        holder.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 3))", (f"logs:{tenant.app_id}/prod",)
        )
        body = ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("late")}, expect=503)
        assert body["error"]["code"] == "logs.busy"
        holder.rollback()
    assert texts(read(api, tenant)) == []  # nothing half-written
    ship(api, nodes["h1"], "h1", "ins_a", {"lines": lines("late")})
    assert texts(read(api, tenant)) == ["late"]


# -- retention ------------------------------------------------------------------------------------


@pytest.fixture
def small(database_url: str) -> Iterator[Api]:
    """The API keeping 5 lines per env and pruning on every batch."""
    retention = Retention(keep_lines=5, keep_days=1, prune_every=1)
    app = create_app(ApiSettings(database_url, log_retention=retention))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, app, database_url)


def test_retention_keeps_the_newest_lines_per_env_and_drops_old_ones(small: Api) -> None:
    api = small
    op = operator_token(api)
    t1, t2 = api.tenant("one"), api.tenant("two")
    place(api, t1, "h1", "ins_1")
    place(api, t2, "h1", "ins_2")
    ship(api, op, "h1", "ins_2", {"lines": lines("two a", "two b")})
    ship(api, op, "h1", "ins_1", {"lines": lines(*(f"one {i}" for i in range(8)))})
    assert texts(read(api, t1)) == [f"one {i}" for i in range(3, 8)]
    assert texts(read(api, t2)) == ["two a", "two b"], "another env keeps its lines"

    # Lines received more than keep_days ago go, whichever env they are in.
    with api.db.connection() as conn:
        conn.execute(
            "UPDATE instance_logs SET received_at = now() - interval '2 days' WHERE line = 'two a'"
        )
    ship(api, op, "h1", "ins_1", {"lines": lines("one 8")})
    assert texts(read(api, t1)) == ["one 4", "one 5", "one 6", "one 7", "one 8"]
    assert texts(read(api, t2)) == ["two b"]


def test_retention_settings_are_checked() -> None:
    with pytest.raises(Exception, match="keep_lines"):
        Retention(keep_lines=0)
    assert Retention(prune_every=1000).due(999, 1000) and not Retention().due(1001, 1999)
