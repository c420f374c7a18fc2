"""The control-plane API's behaviour over HTTP, on a real Postgres: CRUD and idempotent
creates, authentication, pagination, body limits, Idempotency-Key, request ids, health
and metrics, the error envelope, the last-owner rule and bad input (4xx, nothing written).
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ember.api.app import ApiSettings, create_app
from ember.core import tokens
from tests.support.api import Api, Tenant, auth

MiB = 1024 * 1024


def error_code(response: Any) -> str:
    return str(response.json()["error"]["code"])


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) - {"hint"} == {"code", "message", "detail"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["detail"], dict)
    return dict(body["error"])


# -- apps and environments ---------------------------------------------------------------


def test_app_and_env_lifecycle(api: Api, tenant: Tenant) -> None:
    o, t = tenant.org, tenant.token
    first = api.call("POST", f"/v1/orgs/{o}/apps", t, 201, {"name": "web"})
    assert first["name"] == "web" and first["org"] == o and first["envs"] == []
    assert first["id"].startswith("app_")
    # The same create again answers the same object with 200 and writes nothing.
    events = api.event_count()
    assert api.call("POST", f"/v1/orgs/{o}/apps", t, 200, {"name": "web"}) == first
    assert api.event_count() == events
    assert api.call("GET", f"/v1/orgs/{o}/apps/web", t, 200) == first

    env = api.call("POST", f"/v1/orgs/{o}/apps/web/envs", t, 201, {"name": "staging"})
    assert env["app"] == "web" and env["name"] == "staging"
    assert api.call("POST", f"/v1/orgs/{o}/apps/web/envs", t, 200, {"name": "staging"}) == env
    assert api.call("GET", f"/v1/orgs/{o}/apps/web/envs/staging", t, 200) == env
    api.call("POST", f"/v1/orgs/{o}/apps/web/envs", t, 201, {"name": "prod"})
    listed = api.call("GET", f"/v1/orgs/{o}/apps/web/envs", t, 200)
    assert [e["name"] for e in listed["items"]] == ["prod", "staging"]
    assert listed["next_cursor"] is None
    assert api.call("GET", f"/v1/orgs/{o}/apps/web", t, 200)["envs"] == ["prod", "staging"]
    apps = api.call("GET", f"/v1/orgs/{o}/apps", t, 200)
    assert [a["name"] for a in apps["items"]] == [tenant.app, "web"]

    # Delete an env: gone from the app and from GET; deleting it again is a 404.
    assert api.call("DELETE", f"/v1/orgs/{o}/apps/web/envs/staging", t, 204) is None
    r = api.client.get(f"/v1/orgs/{o}/apps/web/envs/staging", headers=auth(t))
    assert_envelope(r, 404, "env.not_found")
    r = api.client.delete(f"/v1/orgs/{o}/apps/web/envs/staging", headers=auth(t))
    assert_envelope(r, 404, "env.not_found")
    assert api.call("GET", f"/v1/orgs/{o}/apps/web", t, 200)["envs"] == ["prod"]

    # Delete the app: 404 afterwards, gone from the list; the name can be reused and the
    # new app (a new id) does not inherit the old one's envs.
    assert api.call("DELETE", f"/v1/orgs/{o}/apps/web", t, 204) is None
    assert_envelope(api.client.get(f"/v1/orgs/{o}/apps/web", headers=auth(t)), 404, "app.not_found")
    r = api.client.delete(f"/v1/orgs/{o}/apps/web", headers=auth(t))
    assert_envelope(r, 404, "app.not_found")
    assert [a["name"] for a in api.call("GET", f"/v1/orgs/{o}/apps", t, 200)["items"]] == [
        tenant.app
    ]
    again = api.call("POST", f"/v1/orgs/{o}/apps", t, 201, {"name": "web"})
    assert again["id"] != first["id"] and again["envs"] == []


def test_org_create_is_idempotent_and_a_taken_name_is_a_conflict(api: Api, tenant: Tenant) -> None:
    org = api.call("GET", f"/v1/orgs/{tenant.org}", tenant.token, 200)
    assert org["role"] == "owner"
    assert api.call("POST", "/v1/orgs", tenant.token, 200, {"name": tenant.org}) == org

    other = api.tenant("rival")
    events = api.event_count()
    r = api.client.post("/v1/orgs", json={"name": tenant.org}, headers=other.headers)
    err = assert_envelope(r, 409, "name.taken")
    assert err["detail"] == {"field": "name"}
    assert api.event_count() == events
    # The rival still cannot see the org it failed to take.
    r = api.client.get(f"/v1/orgs/{tenant.org}", headers=other.headers)
    assert_envelope(r, 404, "org.not_found")


def test_concurrent_identical_creates_never_answer_missing_or_5xx(api: Api, tenant: Tenant) -> None:
    """Racing identical creates: exactly one creates (201), the others answer the object
    (200) — a lost append race is decided again, never a 409, 404 or 500."""
    o, a = tenant.org, tenant.app
    api.user("racer@example.com")
    targets: dict[str, tuple[str, dict[str, str]]] = {
        "org": ("/v1/orgs", {"name": "raced-org"}),
        "app": (f"/v1/orgs/{o}/apps", {"name": "raced-app"}),
        "env": (f"/v1/orgs/{o}/apps/{a}/envs", {"name": "raced"}),
        "member": (f"/v1/orgs/{o}/members", {"email": "racer@example.com", "role": "viewer"}),
    }
    for kind, (path, body) in targets.items():
        statuses = race(
            8, lambda p=path, b=body: api.client.post(p, json=b, headers=tenant.headers)
        )
        counts = collections.Counter(s for s, _ in statuses)
        assert set(counts) <= {200, 201}, (kind, statuses)
        if kind in ("org", "app", "env"):
            assert counts[201] == 1, (kind, statuses)
    app = api.call("GET", f"/v1/orgs/{o}/apps/raced-app", tenant.token, 200)
    assert api.call("GET", f"/v1/orgs/{o}/apps", tenant.token, 200)["items"].count(app) == 1


def race(n: int, call: Callable[[], Any]) -> list[tuple[int, Any]]:
    barrier = threading.Barrier(n)
    out: list[tuple[int, Any]] = []

    def go() -> None:
        barrier.wait()
        r = call()
        out.append((r.status_code, r.json() if r.content else None))

    threads = [threading.Thread(target=go) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


# -- authentication -------------------------------------------------------------------------


def test_missing_and_garbled_tokens_are_401(api: Api, tenant: Tenant) -> None:
    path = f"/v1/orgs/{tenant.org}"
    cases: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Basic {tenant.token}"},  # right secret, wrong scheme
        # checksum broken (a different last character, whatever the last one was)
        {"Authorization": f"Bearer {tenant.token[:-1]}{'x' if tenant.token[-1] != 'x' else 'y'}"},
        {"Authorization": f"Bearer {tokens.generate()}"},  # well-formed, never issued
    ]
    for headers in cases:
        r = api.client.get(path, headers=headers)
        assert_envelope(r, 401, "auth.unauthorized")
        assert r.headers["www-authenticate"] == "Bearer", headers
    assert api.client.get(path, headers=tenant.headers).status_code == 200


def test_revoked_token_is_refused_on_the_next_request(api: Api, tenant: Tenant) -> None:
    created = api.call("POST", "/v1/tokens", tenant.token, 201, {"name": "ci"})
    secret, token_id = created["token"], created["id"]
    assert secret.startswith("ember_pat_") and created["hint"] == secret[-4:]
    assert api.call("GET", "/v1/whoami", secret, 200)["token"]["id"] == token_id
    # Only the hash is stored.
    assert api.scalar("SELECT count(*) FROM events WHERE data::text LIKE %s", f"%{secret}%") == 0

    api.call("DELETE", f"/v1/tokens/{token_id}", tenant.token, 204)
    r = api.client.get("/v1/whoami", headers=auth(secret))
    assert_envelope(r, 401, "auth.unauthorized")
    listed = api.call("GET", "/v1/tokens", tenant.token, 200)["items"]
    assert [t["revoked_at"] is not None for t in listed if t["id"] == token_id] == [True]
    # Revoking again is harmless; another user's (or a missing) token id is a 404.
    api.call("DELETE", f"/v1/tokens/{token_id}", tenant.token, 204)
    other = api.tenant("other")
    r = api.client.delete(f"/v1/tokens/{token_id}", headers=other.headers)
    assert_envelope(r, 404, "token.not_found")

    # A token can revoke itself: that very request succeeds, the next one does not.
    api.call("DELETE", "/v1/tokens/" + whoami_token_id(api, other.token), other.token, 204)
    assert_envelope(api.client.get("/v1/whoami", headers=other.headers), 401, "auth.unauthorized")


def whoami_token_id(api: Api, token: str) -> str:
    return str(api.call("GET", "/v1/whoami", token, 200)["token"]["id"])


def test_expired_token_is_401(api: Api, tenant: Tenant) -> None:
    secret = api.mint(tenant.user_id, expires_in_days=1, name="short")
    who = api.call("GET", "/v1/whoami", secret, 200)
    assert who["token"]["expires_at"] is not None
    api.expire(who["token"]["id"])
    r = api.client.get("/v1/whoami", headers=auth(secret))
    err = assert_envelope(r, 401, "auth.unauthorized")
    assert "expired" in err["message"]
    assert api.client.get("/v1/whoami", headers=tenant.headers).status_code == 200


# -- pagination ----------------------------------------------------------------------------


def walk(api: Api, path: str, token: str, limit: int) -> list[list[str]]:
    """Every page's names, following next_cursor until it is null."""
    pages: list[list[str]] = []
    cursor = None
    for _ in range(50):
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("GET", path + query, token, 200)
        pages.append([item["name"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("pagination never ended")


def test_pagination_follows_cursors_to_a_null_one(api: Api, tenant: Tenant) -> None:
    o, t = tenant.org, tenant.token
    names = sorted([tenant.app, "b1", "b2", "b3", "b4"])
    for name in names:
        if name != tenant.app:
            api.call("POST", f"/v1/orgs/{o}/apps", t, 201, {"name": name})
    pages = walk(api, f"/v1/orgs/{o}/apps", t, 2)
    assert pages == [names[0:2], names[2:4], names[4:5]]
    assert walk(api, f"/v1/orgs/{o}/apps", t, 200) == [names]
    # A cursor is the last name seen: a page starts after it.
    page = api.call("GET", f"/v1/orgs/{o}/apps?limit=2&cursor={names[1]}", t, 200)
    assert [a["name"] for a in page["items"]] == names[2:4]
    assert page["next_cursor"] == names[3]
    for bad in ("limit=0", "limit=201", "limit=x", "cursor=" + "c" * 201):
        r = api.client.get(f"/v1/orgs/{o}/apps?{bad}", headers=tenant.headers)
        assert_envelope(r, 422, "request.invalid")

    # Orgs and envs page the same way.
    for name in ("o2-org", "o3-org"):
        api.call("POST", "/v1/orgs", t, 201, {"name": name})
    assert walk(api, "/v1/orgs", t, 2) == [[tenant.org, "o2-org"], ["o3-org"]]
    for name in ("e1", "e2"):
        api.call("POST", f"/v1/orgs/{o}/apps/{tenant.app}/envs", t, 201, {"name": name})
    envs = walk(api, f"/v1/orgs/{o}/apps/{tenant.app}/envs", t, 1)
    assert [n for page in envs for n in page] == sorted(["e1", "e2", tenant.env])


def test_scoped_tokens_page_through_what_they_can_see(api: Api, tenant: Tenant) -> None:
    """A narrow token's listing is filtered before the page is cut: its one app must
    not be lost behind pages of apps it cannot see."""
    o = tenant.org
    for name in ("b-app", "c-app", "d-app"):
        api.call("POST", f"/v1/orgs/{o}/apps", tenant.token, 201, {"name": name})
    api.call("POST", f"/v1/orgs/{o}/apps/c-app/envs", tenant.token, 201, {"name": "zeta"})
    api.call("POST", f"/v1/orgs/{o}/apps/c-app/envs", tenant.token, 201, {"name": "alpha"})
    api.call("POST", "/v1/orgs", tenant.token, 201, {"name": "a-first-org"})

    def token(**scope: str) -> str:
        body = {"name": "narrow", **scope}
        return str(api.call("POST", "/v1/tokens", tenant.token, 201, body)["token"])

    app_token = token(org=o, app="c-app")
    assert walk(api, f"/v1/orgs/{o}/apps", app_token, 1) == [["c-app"], []]
    env_token = token(org=o, app="c-app", env="zeta")
    assert walk(api, f"/v1/orgs/{o}/apps/c-app/envs", env_token, 1) == [["zeta"], []]
    org_token = token(org=o)
    assert walk(api, "/v1/orgs", org_token, 1) == [[o], []]
    assert walk(api, "/v1/orgs", tenant.token, 1) == [["a-first-org"], [o], []]


# -- request limits, idempotency, request ids ------------------------------------------------


def test_body_over_one_mib_is_413_and_writes_nothing(api: Api, tenant: Tenant) -> None:
    path = f"/v1/orgs/{tenant.org}/apps"
    headers = {**tenant.headers, "content-type": "application/json"}
    big = b'{"name": "x", "pad": "' + b"a" * MiB + b'"}'
    events = api.event_count()

    r = api.client.post(path, content=big, headers=headers)
    err = assert_envelope(r, 413, "request.too_large")
    assert err["detail"] == {"max_bytes": MiB}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    r = api.client.post(path, content=chunks(), headers=headers)
    assert r.status_code == 413 and r.json() == {"error": err}
    assert api.event_count() == events

    # Exactly at the limit is not too large (the unknown field makes it a 422).
    at_limit = big[: MiB - 2] + b'"}'
    assert len(at_limit) == MiB
    r = api.client.post(path, content=at_limit, headers=headers)
    assert_envelope(r, 422, "request.invalid")
    assert api.event_count() == events


def test_idempotency_key_replays_and_rejects_reuse(api: Api, tenant: Tenant) -> None:
    path = f"/v1/orgs/{tenant.org}/apps"
    key = {"Idempotency-Key": "create-web-1"}
    first = api.client.post(path, json={"name": "web"}, headers={**tenant.headers, **key})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    events = api.event_count()

    replay = api.client.post(path, json={"name": "web"}, headers={**tenant.headers, **key})
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert api.event_count() == events

    reused = api.client.post(path, json={"name": "api"}, headers={**tenant.headers, **key})
    err = assert_envelope(reused, 422, "request.idempotency_key_reused")
    assert err["detail"] == {"idempotency_key": "create-web-1"}
    assert api.event_count() == events
    r = api.client.get(f"{path}/api", headers=tenant.headers)
    assert_envelope(r, 404, "app.not_found")

    # Keys belong to a token: another token's same key is a new request.
    body = {"name": "two", "capabilities": ["admin"]}
    other = api.call("POST", "/v1/tokens", tenant.token, 201, body)["token"]
    r = api.client.post(path, json={"name": "api"}, headers={**auth(other), **key})
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers


def test_token_creation_is_never_replayed(api: Api, tenant: Tenant) -> None:
    key = {**tenant.headers, "Idempotency-Key": "tok-1"}
    created = api.client.post("/v1/tokens", json={"name": "ci"}, headers=key)
    assert created.status_code == 201 and created.json()["token"].startswith("ember_pat_")
    stored = api.scalar("SELECT body::text FROM api_idempotency WHERE key = 'tok-1'")
    assert created.json()["token"] not in stored
    events = api.event_count()

    replay = api.client.post("/v1/tokens", json={"name": "ci"}, headers=key)
    err = assert_envelope(replay, 409, "request.secret_not_replayable")
    assert err["detail"] == {"id": created.json()["id"]}
    assert "token" not in replay.json() and created.json()["token"] not in replay.text
    assert api.event_count() == events
    names = [t["name"] for t in api.call("GET", "/v1/tokens", tenant.token, 200)["items"]]
    assert names.count("ci") == 1


def test_concurrent_idempotent_requests_do_not_starve_the_pool(database_url: str) -> None:
    """Each keyed request holds its lock on a connection while its work needs more: more
    keyed requests in flight than the pool has connections must still all complete."""
    app = create_app(ApiSettings(database_url, pool_size=2))
    with TestClient(app) as client:
        api = Api(client, app, database_url)
        tenant = api.tenant("busy")
        counter = iter(range(100))
        lock = threading.Lock()

        def call() -> Any:
            with lock:
                i = next(counter)
            headers = {**tenant.headers, "Idempotency-Key": f"k{i}"}
            body = {"name": f"app{i % 3}"}
            return client.post(f"/v1/orgs/{tenant.org}/apps", json=body, headers=headers)

        results = race(6, call)
    assert {status for status, _ in results} <= {200, 201, 409}, results
    assert sum(status == 201 for status, _ in results) == 3  # one per name


def test_request_id_is_echoed_or_minted(api: Api) -> None:
    r = api.client.get("/healthz", headers={"X-Request-Id": "abc.DEF-123_x"})
    assert r.headers["x-request-id"] == "abc.DEF-123_x"
    minted = api.client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted)
    assert api.client.get("/healthz").headers["x-request-id"] != minted
    # Unsafe ids are not reflected (log injection); errors carry the id too.
    r = api.client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = api.client.get("/v1/whoami", headers={"X-Request-Id": "err-1"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "err-1"


# -- health, metrics, the error envelope ------------------------------------------------------


def test_health_readiness_and_metrics(api: Api, tenant: Tenant) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}

    def requests_total(route: str, status: str) -> float:
        text = api.client.get("/metrics").text
        m = re.search(
            r'^ember_api_requests_total\{method="GET",route="'
            + re.escape(route)
            + r'",status="'
            + status
            + r'"\} (\S+)$',
            text,
            re.M,
        )
        return float(m.group(1)) if m else 0.0

    route = "/v1/orgs/{org}/apps/{app}"
    before = requests_total(route, "200")
    api.call("GET", f"/v1/orgs/{tenant.org}/apps/{tenant.app}", tenant.token, 200)
    api.call("GET", f"/v1/orgs/{tenant.org}/apps/{tenant.app}", tenant.token, 200)
    assert requests_total(route, "200") == before + 2
    api.client.get(f"/v1/orgs/{tenant.org}/apps/nope", headers=tenant.headers)
    assert requests_total(route, "404") == 1
    metrics = api.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "ember_api_request_seconds_bucket" in metrics.text


def test_unknown_route_and_wrong_method_use_the_envelope(api: Api, tenant: Tenant) -> None:
    r = api.client.get("/v1/nothing-here", headers=tenant.headers)
    assert r.json() == {"error": {"code": "route.not_found", "message": "Not Found", "detail": {}}}
    assert r.status_code == 404
    r = api.client.put(f"/v1/orgs/{tenant.org}", headers=tenant.headers)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json() == {
        "error": {"code": "method.not_allowed", "message": "Method Not Allowed", "detail": {}}
    }
    r = api.client.patch("/v1/orgs", headers=tenant.headers)
    assert_envelope(r, 405, "method.not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}


# -- members and the last owner ---------------------------------------------------------------


def test_members_and_the_last_owner(api: Api, tenant: Tenant) -> None:
    o, t = tenant.org, tenant.token
    members = f"/v1/orgs/{o}/members"
    me = tenant.user_id
    events = api.event_count()
    r = api.client.post(
        members, json={"email": tenant.email, "role": "admin"}, headers=tenant.headers
    )
    assert_envelope(r, 409, "org.last_owner")
    r = api.client.delete(f"{members}/{me}", headers=tenant.headers)
    assert_envelope(r, 409, "org.last_owner")
    assert api.event_count() == events
    assert api.call("GET", f"/v1/orgs/{o}", t, 200)["role"] == "owner"

    # An admin may manage members but not touch an owner.
    admin_id = tenant.add_member("ada@example.com", "admin")
    admin = api.mint(admin_id)
    r = api.client.post(
        members, json={"email": tenant.email, "role": "viewer"}, headers=auth(admin)
    )
    assert_envelope(r, 403, "auth.forbidden")
    r = api.client.delete(f"{members}/{me}", headers=auth(admin))
    assert_envelope(r, 403, "auth.forbidden")
    r = api.client.post(
        members, json={"email": "ada@example.com", "role": "owner"}, headers=auth(admin)
    )
    assert_envelope(r, 403, "auth.forbidden")
    viewer_id = tenant.add_member("vic@example.com", "viewer")
    changed = api.call(
        "POST", members, admin, 200, {"email": "vic@example.com", "role": "deployer"}
    )
    assert changed["role"] == "deployer" and changed["user_id"] == viewer_id
    # Setting the same role again writes nothing.
    events = api.event_count()
    api.call("POST", members, admin, 200, {"email": "vic@example.com", "role": "deployer"})
    assert api.event_count() == events
    api.call("DELETE", f"{members}/{viewer_id}", admin, 204)
    r = api.client.delete(f"{members}/{viewer_id}", headers=auth(admin))
    assert_envelope(r, 404, "member.not_found")

    # With a second owner, the first may step down; then the second is the last one.
    api.call("POST", members, t, 200, {"email": "ada@example.com", "role": "owner"})
    api.call("POST", members, t, 200, {"email": tenant.email, "role": "admin"})
    listed = api.call("GET", members, admin, 200)["items"]
    assert {(m["email"], m["role"]) for m in listed} == {
        ("acme@example.com", "admin"),
        ("ada@example.com", "owner"),
    }
    r = api.client.delete(f"{members}/{admin_id}", headers=auth(admin))
    assert_envelope(r, 409, "org.last_owner")
    r = api.client.post(
        members, json={"email": "nobody@example.com", "role": "viewer"}, headers=auth(admin)
    )
    assert_envelope(r, 404, "user.not_found")


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_is_422_and_writes_nothing(api: Api, tenant: Tenant) -> None:
    o, a = tenant.org, tenant.app
    api.user("real@example.com")
    json_cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/orgs", {"name": "Bad_Name"}, "validation.failed"),
        ("POST", "/v1/orgs", {"name": "-leading"}, "validation.failed"),
        ("POST", "/v1/orgs", {"name": "trailing-"}, "validation.failed"),
        ("POST", "/v1/orgs", {"name": "a" * 41}, "request.invalid"),
        ("POST", "/v1/orgs", {"name": ""}, "request.invalid"),
        ("POST", "/v1/orgs", {"name": "ok", "extra": 1}, "request.invalid"),
        ("POST", "/v1/orgs", {}, "request.invalid"),
        ("POST", "/v1/orgs", None, "request.invalid"),
        ("POST", "/v1/orgs", ["ok"], "request.invalid"),
        ("POST", f"/v1/orgs/{o}/apps", {"name": "UPPER"}, "validation.failed"),
        ("POST", f"/v1/orgs/{o}/apps", {"name": "x", "nmae": "y"}, "request.invalid"),
        ("POST", f"/v1/orgs/{o}/apps/{a}/envs", {"name": "e" * 21}, "request.invalid"),
        ("POST", f"/v1/orgs/{o}/apps/{a}/envs", {"name": "1st"}, "validation.failed"),
        (
            "POST",
            f"/v1/orgs/{o}/members",
            {"email": "real@example.com", "role": "god"},
            "request.invalid",
        ),
        ("POST", f"/v1/orgs/{o}/members", {"email": "real@example.com"}, "request.invalid"),
        (
            "POST",
            f"/v1/orgs/{o}/members",
            {"email": "no-at-sign", "role": "viewer"},
            "validation.failed",
        ),
        (
            "POST",
            f"/v1/orgs/{o}/members",
            {"email": "a\x00@b.c", "role": "viewer"},
            "validation.failed",
        ),
        ("POST", "/v1/tokens", {"name": "t", "capabilities": ["root"]}, "request.invalid"),
        ("POST", "/v1/tokens", {"name": "t", "capabilities": []}, "request.invalid"),
        ("POST", "/v1/tokens", {"name": "t", "expires_in_days": 0}, "request.invalid"),
        ("POST", "/v1/tokens", {"name": "t", "app": a}, "validation.failed"),
        ("POST", "/v1/tokens", {"name": "t", "org": o, "env": "prod"}, "validation.failed"),
    ]
    raw_cases: list[tuple[str, str, bytes, str]] = [
        ("POST", "/v1/orgs", b'{"name": ', "request.invalid"),  # malformed JSON
        ("POST", "/v1/orgs", b'{"name": "\xff\xfe"}', "request.invalid"),  # not UTF-8
        ("POST", f"/v1/orgs/{o}/apps", b"\x00\x01", "request.invalid"),
    ]
    path_cases = [  # a NUL can be in no name, id or cursor (and Postgres text refuses it)
        ("GET", f"/v1/orgs/{o}%00x"),
        ("DELETE", f"/v1/orgs/{o}/apps/{a}%00"),
        ("GET", f"/v1/orgs/{o}/apps?cursor=a%00b"),
        ("DELETE", "/v1/tokens/tok_%00"),
        ("DELETE", f"/v1/orgs/{o}/members/usr_%00"),
    ]
    events = api.event_count()
    for method, path, body, code in json_cases:
        r = api.client.request(method, path, json=body, headers=tenant.headers)
        err = assert_envelope(r, 422, code)
        assert err.get("hint") or err["detail"], (path, body)
    for method, path, content, code in raw_cases:
        headers = {**tenant.headers, "content-type": "application/json"}
        r = api.client.request(method, path, content=content, headers=headers)
        assert_envelope(r, 422, code)
    for method, path in path_cases:
        assert_envelope(
            api.client.request(method, path, headers=tenant.headers), 422, "request.invalid"
        )
    r = api.client.post(
        f"/v1/orgs/{o}/apps",
        json={"name": "k"},
        headers={**tenant.headers, "Idempotency-Key": "a\x00"},
    )
    assert_envelope(r, 422, "request.invalid")
    assert api.event_count() == events
    assert api.scalar("SELECT count(*) FROM api_idempotency") == 0
    # A scope naming something that does not exist is a 404, also when it is no valid name.
    # (A lone surrogate is valid JSON that UTF-8 cannot encode, and the 404 echoes it.)
    missing: list[tuple[dict[str, str], dict[str, str]]] = [
        ({"org": "no-such-org"}, {"org": "no-such-org"}),
        ({"org": "a\x00b"}, {"org": "a\x00b"}),
        ({"org": "\ud800"}, {"org": "\ud800"}),
        ({"org": o, "app": "Bad App"}, {"app": "Bad App"}),
    ]
    headers = {**tenant.headers, "content-type": "application/json"}
    for scope, detail in missing:
        body = json.dumps({"name": "t", **scope}).encode()  # ASCII: "\ud800" stays escaped
        r = api.client.post("/v1/tokens", content=body, headers=headers)
        assert r.status_code == 404, (scope, r.text)
        assert r.json()["error"]["detail"] == detail
    assert api.event_count() == events


def test_whoami_describes_the_caller(api: Api, tenant: Tenant) -> None:
    who = api.call("GET", "/v1/whoami", tenant.token, 200)
    assert who["email"] == tenant.email and who["user_id"] == tenant.user_id
    assert who["token"]["scope"] == {"org": None, "app": None, "env": None}
    assert who["token"]["capabilities"] == ["admin", "deploy", "exec", "read"]
    assert [(o["name"], o["role"]) for o in who["orgs"]] == [(tenant.org, "owner")]
    scoped = api.call(
        "POST",
        "/v1/tokens",
        tenant.token,
        201,
        {
            "name": "s",
            "org": tenant.org,
            "app": tenant.app,
            "env": tenant.env,
            "capabilities": ["deploy"],
        },
    )
    assert scoped["scope"] == {"org": tenant.org, "app": tenant.app, "env": tenant.env}
    assert scoped["capabilities"] == ["deploy", "read"]
    who = api.call("GET", "/v1/whoami", scoped["token"], 200)
    assert who["token"]["id"] == scoped["id"] and "token" not in who["token"]


@pytest.mark.parametrize("limit", [1, 3])
def test_token_listing_pages(api: Api, tenant: Tenant, limit: int) -> None:
    for i in range(3):
        api.call("POST", "/v1/tokens", tenant.token, 201, {"name": f"t{i}"})
    seen: list[str] = []
    cursor = None
    while True:
        q = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("GET", "/v1/tokens" + q, tenant.token, 200)
        seen += [t["name"] for t in page["items"]]
        assert len(page["items"]) <= limit
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == ["bootstrap", "t0", "t1", "t2"]
    assert all("token" not in t for t in page["items"])
    assert error_code(api.client.get("/v1/tokens")) == "auth.unauthorized"


def test_a_token_revokes_itself_or_narrower_tokens_only(api: Api, tenant: Tenant) -> None:
    narrow = api.call(
        "POST",
        "/v1/tokens",
        tenant.token,
        201,
        {"name": "narrow", "org": tenant.org, "app": tenant.app, "capabilities": ["read"]},
    )
    wide = api.call("GET", "/v1/whoami", tenant.token, 200)["token"]
    before = api.event_count()
    refused = api.call("DELETE", f"/v1/tokens/{wide['id']}", narrow["token"], 403)
    assert refused["error"]["code"] == "auth.forbidden"
    assert api.event_count() == before
    api.call("DELETE", f"/v1/tokens/{narrow['id']}", narrow["token"], 204)  # itself
    api.call("GET", "/v1/whoami", narrow["token"], 401)
    api.call("GET", "/v1/whoami", tenant.token, 200)


def test_a_viewer_learns_nothing_about_members_from_remove(api: Api, tenant: Tenant) -> None:
    viewer_id = tenant.add_member("viewer@example.com", "viewer")
    viewer = api.mint(viewer_id)
    for user_id in (tenant.user_id, "usr_doesnotexist"):
        body = api.call("DELETE", f"/v1/orgs/{tenant.org}/members/{user_id}", viewer, 403)
        assert body["error"]["code"] == "auth.forbidden"


def test_operator_scopes_resolve_names_and_refuse_unknown_ones(api: Api, tenant: Tenant) -> None:
    from ember.core.errors import ValidationFailed
    from ember.core.tenancy import AppNotFound, EnvNotFound, OrgNotFound, Scope

    svc = api.svc
    scope = svc.scope_for(tenant.org, tenant.app, tenant.env, who=None)
    assert scope == Scope(tenant.org_id, tenant.app_id, tenant.env)
    assert svc.scope_for(None, None, None, who=None) == Scope()
    for args, error in [
        (("nope", None, None), OrgNotFound),
        ((tenant.org, "nope", None), AppNotFound),
        ((tenant.org, tenant.app, "nope"), EnvNotFound),
        ((None, tenant.app, None), ValidationFailed),
    ]:
        with pytest.raises(error):
            svc.scope_for(*args, who=None)
