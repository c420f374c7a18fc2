"""The allocation watch over HTTP on a real Postgres (list + watch, api.md "Agents"): a
watch long-polls until this host's allocations change — woken by the event log's
notification, also for the real controller's placements — and answers each changed
allocation once (added, modified, removed) with the cursor to resume from; other hosts'
changes do not answer it; resuming from every answer's cursor loses nothing; a cursor the
log cannot resume from is 410 ``allocations.cursor_expired`` (the client's ``ApiGone``),
a malformed one 422; who may watch is who may list. Last, the agent's own watcher
(ember.agent.watch over ClientControlPlane) follows the API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ember.agent.daemon import ClientControlPlane
from ember.agent.watch import AllocationWatch
from ember.client.api import Client
from ember.client.errors import ApiGone
from ember.core.errors import Conflict
from ember.core.events import Cursor
from ember.core.instances import InstanceLost, InstanceStopRequested, instance_stream
from ember.core.workloads import workload_stream
from tests.support.api import Api, Tenant, auth
from tests.support.hosts import HOST, append, enroll_node, operator_token, place
from tests.support.scheduling import World, manifest

Auth = str | httpx.Auth  # an operator's token, or a node's signer


@pytest.fixture
def op(api: Api) -> str:
    return operator_token(api)


def _get(api: Api, who: Auth, url: str) -> httpx.Response:
    if isinstance(who, str):
        return api.client.get(url, headers=auth(who))
    return api.client.get(url, auth=who)


def listing(api: Api, who: Auth, host: str) -> dict[str, Any]:
    r = _get(api, who, f"/v1/hosts/{host}/allocations")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def watch(
    api: Api, who: Auth, host: str, cursor: str | None, wait: float = 0, expect: int = 200
) -> dict[str, Any]:
    query = f"wait={wait}" if cursor is None else f"cursor={cursor}&wait={wait}"
    r = _get(api, who, f"/v1/hosts/{host}/allocations/watch?{query}")
    assert r.status_code == expect, r.text
    body: dict[str, Any] = r.json()
    return body


def in_background(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [
        (
            e["type"],
            e["allocation"]["instance_id"],
            e["allocation"]["state"],
            e["allocation"]["desired"],
        )
        for e in events
    ]


def report(api: Api, op: str, instance_id: str, host: str, state: str, **body: Any) -> None:
    api.call(
        "POST",
        f"/v1/instances/{instance_id}/reports",
        op,
        202,
        {"host_id": host, "state": state, **body},
    )


def stop_requested(api: Api, instance_id: str) -> None:
    append(
        api,
        workload_stream("app_x", "prod"),
        InstanceStopRequested(instance_id=instance_id, reason="scaled down"),
    )


def gone(response: httpx.Response, cursor: str) -> None:
    assert response.status_code == 410, response.text
    err = response.json()["error"]
    assert err["code"] == "allocations.cursor_expired", err
    assert "list" in err["hint"] and err["detail"] == {"cursor": cursor}


# -- waking up -----------------------------------------------------------------------------


@pytest.fixture
def world(api: Api) -> Iterator[World]:
    """The real controller (scheduler included) on the API's database."""
    w = World.create(api.database_url)
    yield w
    w.close()


def test_a_watch_answers_when_the_controller_places_an_instance_on_its_host(
    api: Api, op: str, world: World
) -> None:
    node = enroll_node(api, op, "h1")
    first = listing(api, node, "h1")
    assert first["items"] == []

    thread, answers = in_background(lambda: watch(api, node, "h1", first["cursor"], wait=20))
    thread.join(0.3)
    assert not answers, "the watch answered before anything changed"
    world.deploy(manifest(), image=1)
    for _ in range(5):  # the reconciler creates the instance, the scheduler places it
        world.controller.run_pass()
        if world.instances("assigned"):
            break
    (placed,) = world.instances("assigned")
    # Answered well before the 20 s ran out: woken by the placement, not by the clock.
    thread.join(15)
    assert answers, "the watch did not answer the placement"
    (body,) = answers
    assert summary(body["events"]) == [("added", placed["instance_id"], "assigned", "run")]
    assert body["events"][0]["allocation"]["spec"]["image_digest"] == placed["spec"]["image_digest"]
    assert Cursor.parse(body["cursor"]) > Cursor.parse(first["cursor"])
    # The events turned the first list into exactly the list at the answer's cursor.
    now = listing(api, node, "h1")
    assert [e["allocation"] for e in body["events"]] == now["items"]


def test_changes_on_other_hosts_do_not_answer_a_watch(api: Api, op: str) -> None:
    for host in ("h1", "h2"):
        api.call("PUT", f"/v1/hosts/{host}", op, 201, HOST)
    start = listing(api, op, "h1")["cursor"]
    thread, answers = in_background(lambda: watch(api, op, "h1", start, wait=1.5))
    thread.join(0.2)
    place(api, "h2", "ins_b")
    thread.join(10)
    (body,) = answers
    # It ran out with no events (an answer before that would carry one), having seen the
    # log move: the next watch resumes after h2's placement.
    assert body["events"] == []
    assert Cursor.parse(body["cursor"]) > Cursor.parse(start)
    assert watch(api, op, "h1", body["cursor"])["events"] == []
    assert summary(watch(api, op, "h2", start)["events"]) == [("added", "ins_b", "assigned", "run")]


def test_stopping_and_ended_allocations_show_up(api: Api, op: str) -> None:
    api.call("PUT", "/v1/hosts/h1", op, 201, HOST)
    place(api, "h1", "ins_a")
    place(api, "h1", "ins_b")
    cursor = listing(api, op, "h1")["cursor"]

    thread, answers = in_background(lambda: watch(api, op, "h1", cursor, wait=20))
    thread.join(0.2)
    stop_requested(api, "ins_a")  # the controller's: the feed folds it, no catch_up here
    thread.join(15)
    assert answers, "the watch did not answer the stop request"
    (body,) = answers
    assert summary(body["events"]) == [("modified", "ins_a", "stopping", "stop")]

    report(api, op, "ins_a", "h1", "stopped", exit_code=0)
    body = watch(api, op, "h1", body["cursor"], wait=20)
    assert summary(body["events"]) == [("removed", "ins_a", "stopped", "stop")]

    # The host was lost: the controller writes instance.lost on the instance's stream.
    append(
        api,
        instance_stream("ins_b"),
        InstanceLost(instance_id="ins_b", host_id="h1", reason="host down"),
    )
    body = watch(api, op, "h1", body["cursor"], wait=20)
    assert summary(body["events"]) == [("removed", "ins_b", "lost", "stop")]
    assert listing(api, op, "h1")["items"] == []


def test_a_watch_without_a_cursor_starts_from_the_current_allocations(api: Api, op: str) -> None:
    api.call("PUT", "/v1/hosts/h1", op, 201, HOST)
    # None yet: it waits for the first, as from the list's cursor.
    thread, answers = in_background(lambda: watch(api, op, "h1", None, wait=20))
    thread.join(0.2)
    assert not answers
    place(api, "h1", "ins_a")
    thread.join(15)
    assert answers, "the watch did not answer the placement"
    assert summary(answers[0]["events"]) == [("added", "ins_a", "assigned", "run")]
    # Some: each is added at once, at the list's cursor (Kubernetes' watch without a
    # resource version).
    place(api, "h1", "ins_b")
    body = watch(api, op, "h1", None, wait=20)
    listed = listing(api, op, "h1")
    assert [e["allocation"] for e in body["events"]] == listed["items"]
    assert {e["type"] for e in body["events"]} == {"added"} and len(listed["items"]) == 2
    assert body["cursor"] == listed["cursor"]


def test_resuming_from_every_cursor_loses_nothing(api: Api, op: str) -> None:
    for host in ("h1", "h2"):
        api.call("PUT", f"/v1/hosts/{host}", op, 201, HOST)
    listed = listing(api, op, "h1")
    mine: dict[str, Any] = {}
    cursors = [listed["cursor"]]
    seen: set[str] = set()

    def follow() -> list[tuple[str, str, str, str]]:
        body = watch(api, op, "h1", cursors[-1])
        for e in body["events"]:
            seen.add(e["allocation"]["instance_id"])
            if e["type"] == "removed":
                mine.pop(e["allocation"]["instance_id"])
            else:
                mine[e["allocation"]["instance_id"]] = e["allocation"]
        cursors.append(body["cursor"])
        assert (
            sorted(mine.values(), key=lambda a: a["instance_id"]) == listing(api, op, "h1")["items"]
        )
        return summary(body["events"])

    place(api, "h1", "ins_a")
    place(api, "h1", "ins_b")
    assert follow() == [
        ("added", "ins_a", "assigned", "run"),
        ("added", "ins_b", "assigned", "run"),
    ]
    place(api, "h2", "ins_c")
    report(api, op, "ins_a", "h1", "starting", address="fd00::a")
    assert follow() == [("modified", "ins_a", "starting", "run")]
    stop_requested(api, "ins_b")
    report(api, op, "ins_a", "h1", "healthy")
    place(api, "h1", "ins_d")
    assert follow() == [
        ("modified", "ins_a", "healthy", "run"),
        ("modified", "ins_b", "stopping", "stop"),
        ("added", "ins_d", "assigned", "run"),
    ]
    report(api, op, "ins_b", "h1", "stopped", exit_code=0)
    # Placed and ended between two watches: never the agent's, so no event at all.
    place(api, "h1", "ins_e")
    stop_requested(api, "ins_e")
    report(api, op, "ins_e", "h1", "stopped")
    assert follow() == [("removed", "ins_b", "stopped", "stop")]
    assert follow() == []
    assert "ins_e" not in seen and "ins_c" not in seen

    # At least once: watching again from an older cursor repeats changes, and applying
    # them again gives the same allocations.
    before = dict(mine)
    for e in watch(api, op, "h1", cursors[2])["events"]:
        if e["type"] == "removed":
            mine.pop(e["allocation"]["instance_id"], None)
        else:
            mine[e["allocation"]["instance_id"]] = e["allocation"]
    assert mine == before


# -- cursors that cannot be resumed from, bad input, who may watch --------------------------


def test_a_cursor_the_log_cannot_resume_from_is_gone(api: Api, op: str) -> None:
    api.call("PUT", "/v1/hosts/h1", op, 201, HOST)
    place(api, "h1", "ins_a")
    cursor = Cursor.parse(listing(api, op, "h1")["cursor"])
    another_database = f"{cursor.xid + 1000}-{cursor.position}"
    for bad in ("99999999999-1", another_database, "99999999999999999999-1"):
        gone(_get(api, op, f"/v1/hosts/h1/allocations/watch?cursor={bad}&wait=20"), bad)
    # The whole log is a window the watch reads: "0-0" works while the log is short...
    assert summary(watch(api, op, "h1", "0-0")["events"]) == [("added", "ins_a", "assigned", "run")]

    # ...but a cursor too far behind is gone: listing again is cheaper.
    hosts = api.app.state.hosts
    hosts.max_window = 3
    try:
        place(api, "h1", "ins_b")
        place(api, "h1", "ins_c")
        for old in ("0-0", str(cursor)):
            gone(_get(api, op, f"/v1/hosts/h1/allocations/watch?cursor={old}"), old)
        fresh = listing(api, op, "h1")["cursor"]
        assert watch(api, op, "h1", fresh)["events"] == []
    finally:
        hosts.max_window = 10_000

    # The client maps the 410 to ApiGone with the server's code: the caller lists again.
    with Client("http://testserver", op, transport=api.client._transport) as client:
        with pytest.raises(ApiGone) as caught:
            client.watch_allocations("h1", "99999999999-1", wait=5)
        assert caught.value.code == "allocations.cursor_expired" and caught.value.status == 410
        assert isinstance(caught.value, Conflict)
        listed = client.host_allocations("h1")
        assert client.watch_allocations("h1", listed.cursor).events == []


@pytest.mark.parametrize(
    "query",
    [
        "cursor=yesterday",
        "cursor=12-",
        "cursor=1-2-3",
        "cursor=",
        "cursor=-1-1",
        "cursor=0-0&wait=31",
        "cursor=0-0&wait=-1",
        "cursor=0-0&wait=soon",
    ],
)
def test_a_malformed_cursor_or_wait_is_422(api: Api, op: str, query: str) -> None:
    api.call("PUT", "/v1/hosts/h1", op, 201, HOST)
    r = api.client.get(f"/v1/hosts/h1/allocations/watch?{query}", headers=auth(op))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "request.invalid"
    field = "wait" if "wait=" in query and "cursor=0-0" in query else "cursor"
    assert err["detail"]["errors"][0]["loc"] == f"query.{field}"


def test_who_may_watch_is_who_may_list(api: Api, op: str, tenant: Tenant) -> None:
    node = enroll_node(api, op, "h1")
    other = enroll_node(api, op, "h2")
    place(api, "h1", "ins_a")
    cursor = listing(api, op, "h1")["cursor"]
    cases: list[tuple[Auth | None, str, int, str | None]] = [
        (node, "h1", 200, None),
        (op, "h1", 200, None),
        (other, "h1", 403, "auth.forbidden"),  # another host's node identity
        (tenant.token, "h1", 403, "auth.forbidden"),  # not an operator
        (None, "h1", 401, "auth.unauthorized"),
        (op, "ghost", 404, "host.not_found"),
    ]
    for who, host, status, code in cases:
        for path in (f"/v1/hosts/{host}/allocations", f"/v1/hosts/{host}/allocations/watch"):
            # A refusal answers at once, before any waiting: wait=20 would show.
            url = f"{path}?cursor={cursor}&wait={0 if status == 200 else 20}"
            r = api.client.get(url) if who is None else _get(api, who, url)
            assert r.status_code == status, (who, path, r.text)
            if code is not None:
                assert r.json()["error"]["code"] == code, (who, path, r.text)


# -- the agent's watcher against the API ----------------------------------------------------


def test_the_agents_watcher_follows_the_api(api: Api, op: str) -> None:
    node = enroll_node(api, op, "h1")
    changed = threading.Event()
    with Client("http://testserver", None, transport=api.client._transport, auth=node) as client:
        watcher = AllocationWatch(
            ClientControlPlane(client), "h1", on_change=changed.set, wait_s=20
        )
        watcher.start()
        try:
            assert changed.wait(10), "the first list never answered"
            assert watcher.current() == []
            changed.clear()
            place(api, "h1", "ins_a")
            assert changed.wait(10), "the watch did not deliver the placement"
            (alloc,) = watcher.current() or []
            assert (alloc.instance_id, alloc.state, alloc.desired) == ("ins_a", "assigned", "run")
            assert watcher.cursor == listing(api, op, "h1")["cursor"]
        finally:
            watcher.stop()
            # Its long-poll is still held; a change answers it, and the thread ends.
            place(api, "h1", "ins_b")
            assert watcher._thread is not None
            watcher._thread.join(10)
            assert not watcher._thread.is_alive()
