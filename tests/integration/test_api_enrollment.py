"""Agent enrolment and node-signed requests over HTTP on a real Postgres (ADR-0015):
one-time tokens (operators only, stored hashed), enrolment (once per token, retry-safe,
racing requests), signed agent requests, what a node may not do, stale or tampered
signatures, key rotation, and the scheduling views surviving a rebuild."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import httpx
import pytest

from ember.client.node_auth import NodeAuth, NodeIdentity
from ember.core import tokens
from ember.core.enrollment import EnrollmentTokenCreated, enrollment_stream
from ember.core.hosts import host_stream
from ember.core.node_auth import MAX_SKEW_S
from tests.support.api import Api, Tenant, auth
from tests.support.hosts import (
    HOST,
    append,
    enroll_body,
    enroll_node,
    enroll_token,
    operator_token,
    place,
)

REFUSED = "enrollment token invalid, expired or used"


@pytest.fixture
def op(api: Api) -> str:
    return operator_token(api)


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err: dict[str, Any] = response.json()["error"]
    assert err["code"] == code, err
    return err


def enroll(api: Api, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return api.client.post("/v1/agents/enroll", json=body, headers=headers or {})


def signed(api: Api, node: httpx.Auth, method: str, path: str, body: Any = None) -> httpx.Response:
    return api.client.request(method, path, json=body, auth=node)


# -- enrolment tokens ----------------------------------------------------------------------


def test_only_operators_create_enrollment_tokens_and_only_hashes_are_stored(
    api: Api, op: str, tenant: Tenant
) -> None:
    path = "/v1/hosts/enrollment-tokens"
    events = api.event_count()
    error(api.client.post(path, json={}, headers=tenant.headers), 403, "auth.forbidden")
    error(api.client.post(path, json={}), 401, "auth.unauthorized")
    for bad, code in (
        ({"expires_in_s": 59}, "request.invalid"),
        ({"expires_in_s": 7 * 86400 + 1}, "request.invalid"),
        ({"host_id": "Bad_Host"}, "host.invalid"),
        ({"surprise": 1}, "request.invalid"),
    ):
        error(api.client.post(path, json=bad, headers=auth(op)), 422, code)
    assert api.event_count() == events

    before = dt.datetime.now(dt.UTC)
    created = api.call("POST", path, op, 201, {"host_id": "h1", "expires_in_s": 600})
    secret = created["token"]
    assert tokens.looks_valid(secret) and tokens.kind_of(secret) is tokens.TokenKind.AGENT
    assert created["host_id"] == "h1"
    expires = dt.datetime.fromisoformat(created["expires_at"])
    assert before + dt.timedelta(seconds=599) <= expires <= before + dt.timedelta(seconds=601)
    default = api.call("POST", path, op, 201, {})
    assert default["host_id"] is None
    assert dt.datetime.fromisoformat(default["expires_at"]) > before + dt.timedelta(seconds=3590)

    stream = api.svc.log.read_stream(enrollment_stream(tokens.digest(secret)))
    assert [e.type for e in stream] == ["host.enrollment_token_created"]
    assert stream[0].data["token_hash"] == tokens.digest(secret)
    assert stream[0].data["created_by"] == stream[0].metadata["actor"]
    assert stream[0].data["created_by"].startswith("usr_")
    assert api.scalar("SELECT count(*) FROM events WHERE data::text LIKE %s", f"%{secret}%") == 0
    # A replayed Idempotency-Key cannot show the secret again.
    key = {"Idempotency-Key": "enrol-1"}
    api.call("POST", path, op, 201, {}, headers=key)
    replay = api.client.post(path, json={}, headers={**auth(op), **key})
    assert "ember_agt_" not in replay.text
    error(replay, 409, "request.secret_not_replayable")


# -- enrolment -----------------------------------------------------------------------------


def test_enroll_binds_the_key_and_the_node_signs_its_agent_requests(api: Api, op: str) -> None:
    identity = NodeIdentity.generate()
    token = enroll_token(api, op, "h1")
    body = enroll_body(token, "h1", identity, labels={"disk": "ssd"}, address="10.0.0.1")
    r = enroll(api, body)
    assert (r.status_code, r.json()) == (201, {"host_id": "h1"})

    types = [e.type for e in api.svc.log.read_stream(enrollment_stream(tokens.digest(token)))]
    assert types == ["host.enrollment_token_created", "host.enrolled"]
    stream = api.svc.log.read_stream(host_stream("h1"))
    assert [e.type for e in stream] == ["host.registered", "host.identity_bound"]
    assert stream[1].data == {"host_id": "h1", "public_key": identity.public_key_b64}
    assert stream[1].metadata["actor"] == "host:h1"
    shown = api.call("GET", "/v1/hosts/h1", op, 200)
    assert shown["public_key"] == identity.public_key_b64
    assert (shown["labels"], shown["address"], shown["vcpus"]) == ({"disk": "ssd"}, "10.0.0.1", 4)
    assert shown["last_seen"] is not None, "enrolling counts as a heartbeat"

    node = NodeAuth(identity, "h1")
    events = api.event_count()
    assert (
        signed(api, node, "POST", "/v1/hosts/h1/heartbeat", {"report": {"vms": 0}}).status_code
        == 204
    )
    assert api.scalar("SELECT report FROM host_heartbeats WHERE host_id = 'h1'") == {"vms": 0}
    # No body at all is signed too (the hash of nothing).
    assert signed(api, node, "POST", "/v1/hosts/h1/heartbeat").status_code == 204
    assert api.event_count() == events
    place(api, "h1", "ins_a")
    alloc = signed(api, node, "GET", "/v1/hosts/h1/allocations")
    assert alloc.status_code == 200 and [a["instance_id"] for a in alloc.json()["items"]] == [
        "ins_a"
    ]
    # A query string is part of what is signed (an unknown parameter is ignored here).
    assert signed(api, node, "GET", "/v1/hosts/h1/allocations?x=%2F&y=1").status_code == 200
    report = {"host_id": "h1", "state": "starting", "address": "fd00::a"}
    r = signed(api, node, "POST", "/v1/instances/ins_a/reports", report)
    assert r.status_code == 202 and r.json()["state"] == "starting"
    assert api.svc.log.read_stream("instance-ins_a")[0].metadata["actor"] == "host:h1"
    again = signed(api, node, "PUT", "/v1/hosts/h1", {**HOST, "memory_mb": 16384})
    assert again.status_code == 200 and again.json()["memory_mb"] == 16384
    # The operator's token keeps working on the same routes, exactly as before.
    api.call("POST", "/v1/hosts/h1/heartbeat", op, 204, {})
    api.call("GET", "/v1/hosts/h1/allocations", op, 200)


def test_a_token_works_once_and_a_retry_answers_200_writing_nothing(api: Api, op: str) -> None:
    identity, other = NodeIdentity.generate(), NodeIdentity.generate()
    token = enroll_token(api, op)
    assert enroll(api, enroll_body(token, "h1", identity)).status_code == 201
    events = api.event_count()
    # The agent lost the answer and sends the same request again.
    retry = enroll(api, enroll_body(token, "h1", identity))
    assert (retry.status_code, retry.json()) == (200, {"host_id": "h1"})
    assert api.event_count() == events
    for body in (
        enroll_body(token, "h1", other),  # the same token, another key
        enroll_body(token, "h2", identity),  # another host
        enroll_body(token, "h2", other),
    ):
        assert error(enroll(api, body), 401, "auth.unauthorized")["message"] == REFUSED
    assert api.event_count() == events
    assert api.scalar("SELECT count(*) FROM view_hosts") == 1


def test_unknown_expired_foreign_and_wrong_host_tokens_are_refused_alike(
    api: Api, op: str, tenant: Tenant
) -> None:
    identity = NodeIdentity.generate()
    expired = tokens.generate(tokens.TokenKind.AGENT)
    append(
        api,
        enrollment_stream(tokens.digest(expired)),
        EnrollmentTokenCreated(
            token_hash=tokens.digest(expired),
            host_id=None,
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1),
            created_by="test",
        ),
    )
    for_h1 = enroll_token(api, op, "h1")
    events = api.event_count()
    for secret, host_id in (
        (expired, "h1"),
        (for_h1, "h2"),  # made for another host
        (tokens.generate(tokens.TokenKind.AGENT), "h1"),  # well-formed, never issued
        (tenant.token, "h1"),  # a user's API token is no enrolment token
        ("not-a-token", "h1"),
    ):
        # An Authorization header does not help: enrolment looks at the body only.
        r = enroll(api, enroll_body(secret, host_id, identity), headers=auth(op))
        assert error(r, 401, "auth.unauthorized")["message"] == REFUSED, secret
    assert api.event_count() == events
    assert api.scalar("SELECT count(*) FROM view_hosts") == 0
    assert enroll(api, enroll_body(for_h1, "h1", identity)).status_code == 201


def test_bad_input_names_the_field_and_leaves_the_token_unused(api: Api, op: str) -> None:
    identity = NodeIdentity.generate()
    token = enroll_token(api, op)
    events = api.event_count()
    key = identity.public_key_b64
    # The same 32 bytes with the last character's 2 spare bits set: another spelling.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    noncanonical = key[:-1] + alphabet[alphabet.index(key[-1]) | 1]
    for change, code, field in (
        ({"memory_mb": 64}, "host.invalid", "memory_mb"),
        ({"host_id": "Bad_Host"}, "host.invalid", "host_id"),
        ({"public_key": noncanonical}, "host.invalid", "public_key"),
        ({"public_key": key[:-1]}, "request.invalid", "body.public_key"),
        ({"public_key": None}, "request.invalid", "body.public_key"),
        ({"token": None}, "request.invalid", "body.token"),
    ):
        r = enroll(api, {**enroll_body(token, "h1", identity), **change})
        assert r.status_code == 422, (change, r.text)
        err = r.json()["error"]
        if err["code"] == "request.invalid":
            assert field in [e["loc"] for e in err["detail"]["errors"]]
        else:
            assert (err["code"], err["detail"]["field"]) == (code, field), err
    assert api.event_count() == events
    assert enroll(api, enroll_body(token, "h1", identity)).status_code == 201


def test_racing_enrolments_with_one_token_enrol_exactly_one(api: Api, op: str) -> None:
    """Each racer claims another host, so only the token's own stream version keeps the
    token single-use (the host streams do not collide)."""
    token = enroll_token(api, op)
    racers = [(f"h{i}", NodeIdentity.generate()) for i in range(8)]
    barrier = threading.Barrier(len(racers))
    results: list[tuple[int, str, NodeIdentity]] = []

    def go(host_id: str, identity: NodeIdentity) -> None:
        barrier.wait()
        r = enroll(api, enroll_body(token, host_id, identity))
        results.append((r.status_code, host_id, identity))

    threads = [threading.Thread(target=go, args=racer) for racer in racers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [201] + [401] * (len(racers) - 1), statuses
    _, host_id, winner = next(r for r in results if r[0] == 201)
    assert api.svc.query("SELECT host_id, public_key FROM view_hosts", []) == [
        {"host_id": host_id, "public_key": winner.public_key_b64}
    ]
    types = [e.type for e in api.svc.log.read_stream(host_stream(host_id))]
    assert types == ["host.registered", "host.identity_bound"]
    used = api.svc.log.read_stream(enrollment_stream(tokens.digest(token)))
    assert [e.type for e in used] == ["host.enrollment_token_created", "host.enrolled"]
    assert used[1].data["host_id"] == host_id
    assert api.scalar("SELECT count(*) FROM events WHERE type LIKE 'host.%%'") == 4


# -- what a node may not do ----------------------------------------------------------------


def test_a_node_acts_for_its_own_host_and_reaches_nothing_else(
    api: Api, op: str, tenant: Tenant
) -> None:
    node = enroll_node(api, op, "h1")
    enroll_node(api, op, "h2")
    place(api, "h2", "ins_b", app_id=tenant.app_id)
    events = api.event_count()
    beats = api.scalar("SELECT max(last_seen) FROM host_heartbeats")
    forbidden: list[tuple[str, str, Any]] = [
        # Another host's agent routes.
        ("POST", "/v1/hosts/h2/heartbeat", {}),
        ("GET", "/v1/hosts/h2/allocations", None),
        ("PUT", "/v1/hosts/h2", HOST),
        ("PUT", "/v1/hosts/h9", HOST),
        ("POST", "/v1/instances/ins_b/reports", {"host_id": "h2", "state": "healthy"}),
        # Operator routes, even for its own host.
        ("GET", "/v1/hosts", None),
        ("GET", "/v1/hosts/h1", None),
        ("GET", "/v1/hosts/h2", None),
        ("POST", "/v1/hosts/h1/cordon", None),
        ("POST", "/v1/hosts/enrollment-tokens", {}),
        ("GET", "/v1/edge/snapshot", None),
        # Tenant routes: a node has no orgs, no roles and makes no tokens.
        ("GET", "/v1/whoami", None),
        ("GET", "/v1/orgs", None),
        ("POST", "/v1/orgs", {"name": "node-org"}),
        ("GET", f"/v1/orgs/{tenant.org}", None),
        ("GET", f"/v1/orgs/{tenant.org}/apps", None),
        ("GET", f"/v1/orgs/{tenant.org}/apps/{tenant.app}/envs/{tenant.env}/status", None),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/tokens", {"name": "escalate"}),
    ]
    for method, path, body in forbidden:
        r = signed(api, node, method, path, body)
        error(r, 403, "auth.forbidden")
    # Its own host id in the body of a report about another host's instance: not found.
    r = signed(
        api, node, "POST", "/v1/instances/ins_b/reports", {"host_id": "h1", "state": "healthy"}
    )
    error(r, 404, "instance.not_found")
    assert api.event_count() == events
    assert api.scalar("SELECT max(last_seen) FROM host_heartbeats") == beats
    assert api.scalar("SELECT count(*) FROM view_orgs WHERE name = 'node-org'") == 0


def test_stale_replayed_and_tampered_requests_are_refused(api: Api, op: str) -> None:
    identity = NodeIdentity.generate()
    token = enroll_token(api, op, "h1")
    assert enroll(api, enroll_body(token, "h1", identity)).status_code == 201
    api.call("PUT", "/v1/hosts/h3", op, 201, HOST)  # registered, but never enrolled
    now = time.time()
    path = "/v1/hosts/h1/heartbeat"

    def at(offset: float, host_id: str = "h1", key: NodeIdentity = identity) -> NodeAuth:
        return NodeAuth(key, host_id, clock=lambda: now + offset)

    assert signed(api, at(-MAX_SKEW_S + 5), "POST", path, {}).status_code == 204
    assert signed(api, at(MAX_SKEW_S - 5), "POST", path, {}).status_code == 204
    for offset in (-MAX_SKEW_S - 5, MAX_SKEW_S + 5, -86400):
        err = error(signed(api, at(offset), "POST", path, {}), 401, "auth.unauthorized")
        assert "clock" in err["message"]

    # A captured request: its header replayed with another body, path or method fails.
    captured = httpx.Request("POST", f"http://testserver{path}", json={"report": {"a": 1}})
    next(at(0).auth_flow(captured))
    header = {"Authorization": captured.headers["Authorization"]}
    ok = api.client.post(
        path, content=captured.content, headers={**header, "Content-Type": "application/json"}
    )
    assert ok.status_code == 204
    for method, url, body in (
        ("POST", path, {"report": {"a": 2}}),
        ("POST", "/v1/hosts/h1/heartbeat?x=1", {"report": {"a": 1}}),
        ("GET", "/v1/hosts/h1/allocations", None),
    ):
        r = api.client.request(method, url, json=body, headers=header)
        error(r, 401, "auth.unauthorized")
    # Another key, a host without an identity, an unknown host, garbage.
    stranger = NodeIdentity.generate()
    for node, url in (
        (at(0, key=stranger), path),
        (at(0, "h3"), "/v1/hosts/h3/heartbeat"),
        (at(0, "ghost"), "/v1/hosts/ghost/heartbeat"),
    ):
        error(signed(api, node, "POST", url, {}), 401, "auth.unauthorized")
    for value in ("EmberNode", "EmberNode h1:1:abc", f"EmberNode h1:{int(now)}", "embernode ::"):
        r = api.client.post(path, json={}, headers={"Authorization": value})
        error(r, 401, "auth.unauthorized")
    assert api.scalar("SELECT report FROM host_heartbeats WHERE host_id = 'h1'") == {"a": 1}


def test_re_enrolment_rotates_the_key(api: Api, op: str) -> None:
    old, new = NodeIdentity.generate(), NodeIdentity.generate()
    assert enroll(api, enroll_body(enroll_token(api, op), "h1", old)).status_code == 201
    path = "/v1/hosts/h1/heartbeat"
    assert signed(api, NodeAuth(old, "h1"), "POST", path, {}).status_code == 204

    # A token for any host cannot take over a host that has an identity (403, unused) ...
    anyhost = enroll_token(api, op)
    events = api.event_count()
    error(enroll(api, enroll_body(anyhost, "h1", new)), 403, "auth.forbidden")
    assert api.event_count() == events
    # ... it still enrols a new host.
    assert enroll(api, enroll_body(anyhost, "h2", NodeIdentity.generate())).status_code == 201

    # A token made for h1 replaces the key; the old one stops working at once.
    assert enroll(api, enroll_body(enroll_token(api, op, "h1"), "h1", new)).status_code == 201
    error(signed(api, NodeAuth(old, "h1"), "POST", path, {}), 401, "auth.unauthorized")
    assert signed(api, NodeAuth(new, "h1"), "POST", path, {}).status_code == 204
    types = [e.type for e in api.svc.log.read_stream(host_stream("h1"))]
    assert types == ["host.registered", "host.identity_bound", "host.identity_bound"]
    # The same key again with yet another token: the token is used, the host unchanged.
    assert enroll(api, enroll_body(enroll_token(api, op, "h1"), "h1", new)).status_code == 201
    assert [e.type for e in api.svc.log.read_stream(host_stream("h1"))] == types

    live, rebuilt = api.svc.runner.verify("scheduling")["scheduling"]
    assert live == rebuilt
    assert (
        api.scalar("SELECT public_key FROM view_hosts WHERE host_id = 'h1'") == new.public_key_b64
    )
