"""Releases through the HTTP API on real Postgres: deploy, identical redeploy, list,
rollback, and the usual auth rules."""

from __future__ import annotations

from tests.support.api import Api, Tenant

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def manifest(app: str, port: int = 8080, extra: str = "") -> str:
    return f"""schema_version = 1
app = "{app}"
[processes]
web = "httpd -f -p {port}"
[[services]]
process = "web"
internal_port = {port}
protocol = "tcp"
{extra}"""


def releases_path(t: Tenant) -> str:
    return f"/v1/orgs/{t.org}/apps/{t.app}/envs/{t.env}"


def deploy(
    api: Api,
    t: Tenant,
    digest: str,
    text: str | None = None,
    expect: int = 201,
    token: str | None = None,
) -> dict:
    body = {
        "image": {"repository": f"{t.org}/{t.app}", "digest": digest},
        "manifest": text or manifest(t.app),
    }
    return api.call("POST", releases_path(t) + "/releases", token or t.token, expect, body)


def test_deploy_creates_and_promotes_and_identical_redeploys_change_nothing(
    api: Api, tenant: Tenant
) -> None:
    first = deploy(api, tenant, D1)
    assert (first["version"], first["status"], first["reason"]) == (1, "active", "deploy")
    assert first["image"]["digest"] == D1 and first["manifest_hash"].startswith("sha256:")
    assert first["manifest"]["app"] == tenant.app and first["author"] == tenant.email
    before = api.event_count()
    again = deploy(api, tenant, D1, expect=200)
    assert again == first and api.event_count() == before

    second = deploy(api, tenant, D1, manifest(tenant.app, 9090))  # same image, new manifest
    assert second["version"] == 2 and second["manifest_hash"] != first["manifest_hash"]
    listed = api.call("GET", releases_path(tenant) + "/releases", tenant.token, 200)["items"]
    assert [(r["version"], r["status"]) for r in listed] == [(2, "active"), (1, "superseded")]
    shown = api.call("GET", releases_path(tenant) + "/releases/1", tenant.token, 200)
    assert shown["manifest"]["services"][0]["internal_port"] == 8080


def test_rollback_makes_a_new_release_with_the_old_contents(api: Api, tenant: Tenant) -> None:
    v1 = deploy(api, tenant, D1)
    deploy(api, tenant, D2)
    back = api.call("POST", releases_path(tenant) + "/rollback", tenant.token, 201, {})
    assert (back["version"], back["reason"], back["rollback_of"]) == (3, "rollback", 1)
    assert back["image"] == v1["image"] and back["manifest_hash"] == v1["manifest_hash"]
    before = api.event_count()
    same = api.call("POST", releases_path(tenant) + "/rollback", tenant.token, 200, {"version": 1})
    assert same["version"] == 3 and api.event_count() == before
    to_v2 = api.call("POST", releases_path(tenant) + "/rollback", tenant.token, 201, {"version": 2})
    assert to_v2["image"]["digest"] == D2 and to_v2["version"] == 4
    missing = api.call(
        "POST", releases_path(tenant) + "/rollback", tenant.token, 404, {"version": 99}
    )
    assert missing["error"]["code"] == "release.not_found"


def test_nothing_to_roll_back_is_a_clear_404(api: Api, tenant: Tenant) -> None:
    body = api.call("POST", releases_path(tenant) + "/rollback", tenant.token, 404, {})
    assert body["error"]["code"] == "release.not_found"


def test_invalid_releases_are_refused_and_write_nothing(api: Api, tenant: Tenant) -> None:
    before = api.event_count()
    bad_manifest = deploy(api, tenant, D1, manifest(tenant.app) + "\nbogus = 1\n", 422)
    assert bad_manifest["error"]["code"] == "manifest.invalid"
    paths = [e["path"] for e in bad_manifest["error"]["detail"]["errors"]]
    assert paths == ["services[0].bogus"]  # TOML: a key after [[services]] belongs to it
    other_app = deploy(api, tenant, D1, manifest("someone-else"), 422)
    assert other_app["error"]["code"] == "manifest.invalid"
    bad_digest = deploy(api, tenant, "sha256:" + "g" * 64, expect=422)
    assert bad_digest["error"]["code"] in {"validation.failed", "request.invalid"}
    assert api.event_count() == before


def test_deploy_needs_the_deploy_capability_and_hides_other_tenants(
    api: Api, tenant: Tenant
) -> None:
    viewer_id = tenant.add_member("viewer@example.com", "viewer")
    viewer = api.mint(viewer_id)
    refused = deploy(api, tenant, D1, expect=403, token=viewer)
    assert refused["error"]["code"] == "auth.forbidden"
    api.call("GET", releases_path(tenant) + "/releases", viewer, 200)

    other = api.tenant("other")
    hidden = deploy(api, tenant, D1, expect=404, token=other.token)
    assert hidden["error"]["code"] == "org.not_found"
    api.call("GET", releases_path(tenant) + "/releases", other.token, 404)


def test_platform_tells_clients_where_the_registry_is(api: Api) -> None:
    body = api.call("GET", "/v1/platform", None, 200)
    assert set(body) == {"version", "registry_url"}


def test_tenancy_and_releases_views_survive_redelivery_and_rebuild(
    api: Api, tenant: Tenant
) -> None:
    deploy(api, tenant, D1)
    deploy(api, tenant, D2)
    api.call("POST", releases_path(tenant) + "/rollback", tenant.token, 201, {})
    runner = api.svc.runner
    names = ("tenancy", "releases")
    live = {n: runner.digest(n) for n in names}
    api.scalar("UPDATE projection_checkpoints SET xid = '0', position = 0 RETURNING 1")
    runner.catch_up()  # every event delivered a second time
    assert {n: runner.digest(n) for n in names} == live
    runner.rebuild()
    assert {n: runner.digest(n) for n in names} == live


def test_a_release_uses_its_own_apps_repository_only(api: Api, tenant: Tenant) -> None:
    before = api.event_count()
    body = {"image": {"repository": "someone/else", "digest": D1}, "manifest": manifest(tenant.app)}
    refused = api.call("POST", releases_path(tenant) + "/releases", tenant.token, 422, body)
    assert refused["error"]["detail"] == {"field": "image.repository"}
    assert api.event_count() == before


def test_racing_deploys_get_unique_versions_and_never_conflict(api: Api, tenant: Tenant) -> None:
    import threading

    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def one(i: int) -> None:
        barrier.wait()
        body = {
            "image": {
                "repository": f"{tenant.org}/{tenant.app}",
                "digest": "sha256:" + f"{i:x}" * 64,
            },
            "manifest": manifest(tenant.app),
        }
        r = api.client.post(releases_path(tenant) + "/releases", json=body, headers=tenant.headers)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [201] * 6
    listed = api.call("GET", releases_path(tenant) + "/releases", tenant.token, 200)["items"]
    assert sorted(r["version"] for r in listed) == [1, 2, 3, 4, 5, 6]
    assert [r["status"] for r in listed].count("active") == 1
