"""``Client``: one method per route of the control-plane API (docs/specs/openapi.json).

Methods take plain names and return the wire models of ember.wire.models; an error
response raises the typed exception of ember.client.errors, and no answer at all raises
``Unreachable`` (httpx's exceptions never escape). Every POST carries an
``Idempotency-Key``, reused by the client's own retries, so a retry never does the work
twice.

List methods come in two forms: ``iter_*`` follows ``next_cursor`` lazily and ``list_*``
returns every item.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from ember import __version__
from ember.client.errors import (
    UNREACHABLE_HINT,
    ApiInternal,
    InvalidRequest,
    Unreachable,
    error_from_response,
)
from ember.core.tenancy import Capability, Role
from ember.wire import hosts as wh
from ember.wire import logs as wl
from ember.wire import models as w
from ember.wire import routes as wr
from ember.wire import workloads as ww

M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")

USER_AGENT = f"ember-cli/{__version__}"
_MAX_PAGES = 10_000


@dataclasses.dataclass(frozen=True)
class Created(Generic[T]):
    """What a create-or-get answered: the object, and whether this call created it
    (HTTP 201) or found it already there with the same parameters (HTTP 200)."""

    item: T
    created: bool


def path(*segments: str) -> str:
    """``/v1/orgs/<org>/...`` with every segment percent-encoded (a name is never a path)."""
    return "/" + "/".join(quote(s, safe="") for s in segments)


def check_base_url(base_url: str) -> httpx.URL:
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        url = None
        reason = str(exc)
    else:
        reason = "it needs http:// or https:// and a host"
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise InvalidRequest(
            f"invalid API URL {base_url!r}: {reason}",
            hint="use a URL like http://127.0.0.1:7070 (--api-url or EMBER_API_URL)",
            detail={"field": "api_url"},
        )
    return url


class Client:
    """A typed client of the control-plane API. Use as a context manager (or ``close()``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float = 10.0,
        *,
        retries: int = 2,
        page_size: int = 100,
        user_agent: str = USER_AGENT,
        transport: httpx.BaseTransport | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:
        """``token``: a user's API token (Bearer). ``auth``: instead of a token, how to
        authenticate each request — a host agent's ``ember.client.node_auth.NodeAuth``."""
        self.base_url = str(check_base_url(base_url)).rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.page_size = page_size
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if token and auth is None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            auth=auth,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- health ----------------------------------------------------------------------

    def ready(self) -> w.Health:
        return self._get("/readyz", w.Health)

    # -- identity and tokens ---------------------------------------------------------

    def whoami(self) -> w.WhoAmI:
        return self._get("/v1/whoami", w.WhoAmI)

    def iter_tokens(self) -> Iterator[w.Token]:
        return self._pages("/v1/tokens", w.Token)

    def list_tokens(self) -> list[w.Token]:
        return list(self.iter_tokens())

    def create_token(
        self,
        name: str,
        *,
        org: str | None = None,
        app: str | None = None,
        env: str | None = None,
        capabilities: Sequence[Capability | str] | None = None,
        expires_in_days: int | None = None,
    ) -> w.TokenCreated:
        """Create a token for the caller; the response holds the secret, once."""
        fields: dict[str, Any] = {
            "name": name,
            "org": org,
            "app": app,
            "env": env,
            "expires_in_days": expires_in_days,
        }
        if capabilities:
            fields["capabilities"] = list(capabilities)
        body = _body(w.TokenCreate, fields)
        response = self._request("POST", "/v1/tokens", json=body)
        return _parse(response, w.TokenCreated)

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", path("v1", "tokens", token_id))

    # -- orgs and members ------------------------------------------------------------

    def iter_orgs(self) -> Iterator[w.Org]:
        return self._pages("/v1/orgs", w.Org)

    def list_orgs(self) -> list[w.Org]:
        return list(self.iter_orgs())

    def get_org(self, org: str) -> w.Org:
        return self._get(path("v1", "orgs", org), w.Org)

    def create_org(self, name: str) -> Created[w.Org]:
        return self._create("/v1/orgs", w.OrgCreate, {"name": name}, w.Org)

    def iter_members(self, org: str) -> Iterator[w.Member]:
        return self._pages(path("v1", "orgs", org, "members"), w.Member)

    def list_members(self, org: str) -> list[w.Member]:
        return list(self.iter_members(org))

    def set_member(self, org: str, email: str, role: Role | str) -> w.Member:
        """Add a user to the org or change their role (idempotent)."""
        body = _body(w.MemberAdd, {"email": email, "role": role})
        response = self._request("POST", path("v1", "orgs", org, "members"), json=body)
        return _parse(response, w.Member)

    def remove_member(self, org: str, user_id: str) -> None:
        self._request("DELETE", path("v1", "orgs", org, "members", user_id))

    # -- apps ------------------------------------------------------------------------

    def iter_apps(self, org: str) -> Iterator[w.App]:
        return self._pages(path("v1", "orgs", org, "apps"), w.App)

    def list_apps(self, org: str) -> list[w.App]:
        return list(self.iter_apps(org))

    def get_app(self, org: str, app: str) -> w.App:
        return self._get(path("v1", "orgs", org, "apps", app), w.App)

    def create_app(self, org: str, name: str) -> Created[w.App]:
        return self._create(path("v1", "orgs", org, "apps"), w.AppCreate, {"name": name}, w.App)

    def delete_app(self, org: str, app: str) -> None:
        self._request("DELETE", path("v1", "orgs", org, "apps", app))

    # -- environments ----------------------------------------------------------------

    def iter_envs(self, org: str, app: str) -> Iterator[w.Env]:
        return self._pages(path("v1", "orgs", org, "apps", app, "envs"), w.Env)

    def list_envs(self, org: str, app: str) -> list[w.Env]:
        return list(self.iter_envs(org, app))

    def get_env(self, org: str, app: str, env: str) -> w.Env:
        return self._get(path("v1", "orgs", org, "apps", app, "envs", env), w.Env)

    def create_env(self, org: str, app: str, name: str) -> Created[w.Env]:
        return self._create(
            path("v1", "orgs", org, "apps", app, "envs"), w.EnvCreate, {"name": name}, w.Env
        )

    def delete_env(self, org: str, app: str, env: str) -> None:
        self._request("DELETE", path("v1", "orgs", org, "apps", app, "envs", env))

    # -- releases --------------------------------------------------------------------

    def platform(self) -> w.Platform:
        return self._get(path("v1", "platform"), w.Platform)

    def deploy(
        self,
        org: str,
        app: str,
        env: str,
        *,
        repository: str,
        digest: str,
        manifest: str,
        auto_rollback: bool = False,
    ) -> Created[w.ReleaseDetail]:
        return self._create(
            path("v1", "orgs", org, "apps", app, "envs", env, "releases"),
            w.ReleaseCreate,
            {
                "image": {"repository": repository, "digest": digest},
                "manifest": manifest,
                "auto_rollback": auto_rollback,
            },
            w.ReleaseDetail,
        )

    def iter_releases(self, org: str, app: str, env: str) -> Iterator[w.Release]:
        return self._pages(path("v1", "orgs", org, "apps", app, "envs", env, "releases"), w.Release)

    def list_releases(self, org: str, app: str, env: str) -> list[w.Release]:
        return list(self.iter_releases(org, app, env))

    def get_release(self, org: str, app: str, env: str, version: int) -> w.ReleaseDetail:
        return self._get(
            path("v1", "orgs", org, "apps", app, "envs", env, "releases", str(version)),
            w.ReleaseDetail,
        )

    def rollback(
        self, org: str, app: str, env: str, version: int | None
    ) -> Created[w.ReleaseDetail]:
        return self._create(
            path("v1", "orgs", org, "apps", app, "envs", env, "rollback"),
            w.RollbackRequest,
            {"version": version},
            w.ReleaseDetail,
        )

    # -- hosts and agents (platform operators) ------------------------------------------

    def register_host(
        self,
        host_id: str,
        *,
        vcpus: int,
        memory_mb: int,
        disk_mb: int = 0,
        labels: Mapping[str, str] | None = None,
        region: str = "",
        address: str = "",
    ) -> Created[wh.HostDetail]:
        """Register a host or update what it offers (PUT: idempotent)."""
        body = _body(
            wh.HostRegister,
            {
                "vcpus": vcpus,
                "memory_mb": memory_mb,
                "disk_mb": disk_mb,
                "labels": dict(labels or {}),
                "region": region,
                "address": address,
            },
        )
        response = self._request("PUT", path("v1", "hosts", host_id), json=body)
        return Created(_parse(response, wh.HostDetail), created=response.status_code == 201)

    def create_enrollment_token(
        self, *, host_id: str | None = None, expires_in_s: int = 3600
    ) -> wh.EnrollmentTokenCreated:
        """A one-time token a host's agent enrols with (for ``host_id``, or any host);
        the response holds the secret, once."""
        body = _body(wh.EnrollmentTokenCreate, {"host_id": host_id, "expires_in_s": expires_in_s})
        response = self._request("POST", "/v1/hosts/enrollment-tokens", json=body)
        return _parse(response, wh.EnrollmentTokenCreated)

    def enroll(
        self,
        token: str,
        *,
        host_id: str,
        public_key: str,
        vcpus: int,
        memory_mb: int,
        disk_mb: int = 0,
        labels: Mapping[str, str] | None = None,
        region: str = "",
        address: str = "",
    ) -> Created[wh.Enrolled]:
        """Trade a one-time enrolment token for the host's node identity (``public_key``:
        ``NodeIdentity.public_key_b64``). Sent without this client's credentials. A retry
        after a lost answer is safe: ``created`` is False then."""
        body = _body(
            wh.AgentEnroll,
            {
                "token": token,
                "host_id": host_id,
                "public_key": public_key,
                "vcpus": vcpus,
                "memory_mb": memory_mb,
                "disk_mb": disk_mb,
                "labels": dict(labels or {}),
                "region": region,
                "address": address,
            },
        )
        request = self.build_request("POST", "/v1/agents/enroll", json=body)
        request.headers.pop("Authorization", None)
        response = self._send(request, authenticated=False)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content)
        return Created(_parse(response, wh.Enrolled), created=response.status_code == 201)

    def heartbeat(self, host_id: str, report: Mapping[str, Any] | None = None) -> None:
        body = _body(wh.HostHeartbeat, {"report": dict(report or {})})
        self._request("POST", path("v1", "hosts", host_id, "heartbeat"), json=body)

    def iter_hosts(self) -> Iterator[wh.Host]:
        return self._pages("/v1/hosts", wh.Host)

    def list_hosts(self) -> list[wh.Host]:
        return list(self.iter_hosts())

    def get_host(self, host_id: str) -> wh.HostDetail:
        return self._get(path("v1", "hosts", host_id), wh.HostDetail)

    def cordon_host(self, host_id: str) -> wh.HostDetail:
        return self._host_action(host_id, "cordon")

    def uncordon_host(self, host_id: str) -> wh.HostDetail:
        return self._host_action(host_id, "uncordon")

    def drain_host(self, host_id: str) -> wh.HostDetail:
        return self._host_action(host_id, "drain")

    def _host_action(self, host_id: str, action: str) -> wh.HostDetail:
        response = self._request("POST", path("v1", "hosts", host_id, action))
        return _parse(response, wh.HostDetail)

    def host_allocations(self, host_id: str) -> wh.Allocations:
        """What the host's agent should run, with the cursor of that snapshot."""
        return self._get(path("v1", "hosts", host_id, "allocations"), wh.Allocations)

    def watch_allocations(
        self, host_id: str, cursor: str, wait: float = 0.0
    ) -> wh.AllocationChanges:
        """What changed in the host's allocations after ``cursor`` (a list's, or the last
        answer's), waiting up to ``wait`` seconds (at most 30) for a change. Raises
        :class:`ApiGone` (``allocations.cursor_expired``) when the cursor cannot be
        resumed from: list again (``host_allocations``) and watch from its cursor."""
        request = self.build_request(
            "GET",
            path("v1", "hosts", host_id, "allocations", "watch"),
            params={"cursor": cursor, "wait": wait},
        )
        # The server holds the answer up to ``wait``: allow that on top of the timeout.
        request.extensions["timeout"] = httpx.Timeout(self.timeout + wait).as_dict()
        response = self._send(request)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content)
        return _parse(response, wh.AllocationChanges)

    def report_instance(
        self,
        instance_id: str,
        *,
        host_id: str,
        state: str,
        exit_code: int | None = None,
        reason: str = "",
        address: str | None = None,
    ) -> wh.InstanceReportAccepted:
        """Report what the agent observed about an instance on its host (with
        ``starting`` / ``healthy``: the instance's IP ``address``, where edges reach it)."""
        body = _body(
            wh.InstanceReport,
            {
                "host_id": host_id,
                "state": state,
                "exit_code": exit_code,
                "reason": reason,
                "address": address,
            },
        )
        response = self._request("POST", path("v1", "instances", instance_id, "reports"), json=body)
        return _parse(response, wh.InstanceReportAccepted)

    def ship_logs(
        self, host_id: str, instance_id: str, lines: Sequence[wl.LogShipLine]
    ) -> wl.LogShipAccepted:
        """Ship console lines of an instance on the agent's host (at most
        ``wl.MAX_BATCH_LINES`` lines and ``wl.MAX_BATCH_BYTES`` bytes of text)."""
        body = _body(wl.LogShipRequest, {"lines": list(lines)})
        response = self._request(
            "POST", path("v1", "hosts", host_id, "instances", instance_id, "logs"), json=body
        )
        return _parse(response, wl.LogShipAccepted)

    # -- workloads: scale, restart, status, rollouts ----------------------------------

    def scale(
        self, org: str, app: str, env: str, processes: Mapping[str, Mapping[str, int]]
    ) -> ww.Formation:
        """Set ``{"web": {"count": 3}, "worker": {"memory_mb": 512}}``; the rest stays."""
        body = _body(ww.ScaleRequest, {"processes": {k: dict(v) for k, v in processes.items()}})
        response = self._request("POST", _env_path(org, app, env, "scale"), json=body)
        return _parse(response, ww.Formation)

    def restart(
        self, org: str, app: str, env: str, processes: Sequence[str] = ()
    ) -> ww.RestartAccepted:
        """Replace the instances of ``processes`` (all when empty), rolling."""
        body = _body(ww.RestartRequest, {"processes": list(processes)})
        response = self._request("POST", _env_path(org, app, env, "restart"), json=body)
        return _parse(response, ww.RestartAccepted)

    def status(self, org: str, app: str, env: str) -> ww.Status:
        return self._get(_env_path(org, app, env, "status"), ww.Status)

    def logs(
        self,
        org: str,
        app: str,
        env: str,
        *,
        process: str | None = None,
        instance: str | None = None,
        since: dt.datetime | None = None,
        after: str | None = None,
        limit: int = 100,
        wait: float = 0.0,
    ) -> wl.LogPage:
        """The env's console lines, oldest first: the newest ``limit`` ones, or with
        ``after`` (a page's cursor) those stored after it, waiting up to ``wait`` seconds
        (at most 30) for one when there is none yet."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("process", process), ("instance", instance), ("after", after)):
            if value is not None:
                params[name] = value
        if since is not None:
            params["since"] = since.isoformat()
        if wait > 0:
            params["wait"] = wait
        request = self.build_request("GET", _env_path(org, app, env, "logs"), params=params)
        # The server holds the answer up to ``wait``: allow that on top of the timeout.
        request.extensions["timeout"] = httpx.Timeout(self.timeout + wait).as_dict()
        response = self._send(request)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content)
        return _parse(response, wl.LogPage)

    def promote_rollout(
        self, org: str, app: str, env: str, rollout_id: str | None = None
    ) -> ww.Rollout:
        return self._rollout(org, app, env, "promote", rollout_id)

    def abort_rollout(
        self, org: str, app: str, env: str, rollout_id: str | None = None
    ) -> ww.Rollout:
        return self._rollout(org, app, env, "abort", rollout_id)

    def _rollout(
        self, org: str, app: str, env: str, action: str, rollout_id: str | None
    ) -> ww.Rollout:
        body = _body(ww.RolloutCommand, {"rollout_id": rollout_id})
        response = self._request("POST", _env_path(org, app, env, "rollout", action), json=body)
        return _parse(response, ww.Rollout)

    # -- routes, dedicated addresses, the edge's snapshot -------------------------------

    def iter_routes(self, org: str, app: str, env: str) -> Iterator[wr.Route]:
        return self._pages(_env_path(org, app, env, "routes"), wr.Route)

    def list_routes(self, org: str, app: str, env: str) -> list[wr.Route]:
        return list(self.iter_routes(org, app, env))

    def get_route(self, org: str, app: str, env: str, route_id: str) -> wr.Route:
        return self._get(_env_path(org, app, env, "routes", route_id), wr.Route)

    def create_route(
        self,
        org: str,
        app: str,
        env: str,
        *,
        kind: str = "tls",
        hostname: str | None = None,
        port: int | str | None = None,
        process: str,
        backend_port: int,
        proxy_protocol: str | None = None,
        ip: str | None = None,
    ) -> Created[wr.Route]:
        """A TLS route (``hostname``) or a TCP route (``kind="tcp"``, ``port`` a number or
        ``"auto"``); ``created`` is False when the environment had this route already."""
        return self._create(
            _env_path(org, app, env, "routes"),
            wr.RouteCreate,
            {
                "kind": kind,
                "hostname": hostname,
                "port": port,
                "process": process,
                "backend_port": backend_port,
                "proxy_protocol": proxy_protocol,
                "ip": ip,
            },
            wr.Route,
        )

    def delete_route(self, org: str, app: str, env: str, route_id: str) -> None:
        self._request("DELETE", _env_path(org, app, env, "routes", route_id))

    def iter_ips(self, org: str) -> Iterator[wr.IpAddress]:
        return self._pages(path("v1", "orgs", org, "ips"), wr.IpAddress)

    def list_ips(self, org: str) -> list[wr.IpAddress]:
        return list(self.iter_ips(org))

    def allocate_ipv4(self, org: str) -> wr.IpAddress:
        """A dedicated IPv4 address for the org (a paid add-on): a new one on every call
        (a retry of this call reuses its Idempotency-Key and allocates nothing more)."""
        body = _body(wr.IpAllocate, {"family": "ipv4"})
        response = self._request("POST", path("v1", "orgs", org, "ips"), json=body)
        return _parse(response, wr.IpAddress)

    def release_ip(self, org: str, address: str) -> None:
        self._request("DELETE", path("v1", "orgs", org, "ips", address))

    def edge_snapshot(self, after: str | None = None, wait: float = 0.0) -> wr.EdgeSnapshot:
        """Every route with its backends; with ``after`` (a snapshot's cursor) and
        ``wait`` (seconds, at most 30), answer when something changed after it, or when
        the wait runs out. ``.to_core()`` gives the ember.core.edge dataclasses."""
        params: dict[str, Any] = {}
        if after is not None:
            params = {"after": after, "wait": wait}
        request = self.build_request("GET", "/v1/edge/snapshot", params=params)
        # The server holds the answer up to ``wait``: allow that on top of the timeout.
        request.extensions["timeout"] = httpx.Timeout(self.timeout + wait).as_dict()
        response = self._send(request)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content)
        return _parse(response, wr.EdgeSnapshot)

    # -- plumbing --------------------------------------------------------------------

    def _get(self, url: str, model: type[M], params: Mapping[str, Any] | None = None) -> M:
        return _parse(self._request("GET", url, params=params), model)

    def _create(
        self, url: str, body_model: type[w.Body], fields: dict[str, Any], model: type[M]
    ) -> Created[M]:
        response = self._request("POST", url, json=_body(body_model, fields))
        return Created(_parse(response, model), created=response.status_code == 201)

    def _pages(self, url: str, model: type[M]) -> Iterator[M]:
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params: dict[str, Any] = {"limit": self.page_size}
            if cursor is not None:
                params["cursor"] = cursor
            data = _json(self._request("GET", url, params=params))
            items = data.get("items") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise ApiInternal(f"unexpected page from {url}: no 'items' list")
            for item in items:
                yield _validate(model, item, url)
            following = data.get("next_cursor")
            # An empty page with a cursor is legal (the server may filter what a scoped
            # token cannot see); only a missing or repeated cursor ends the walk.
            if not following or following == cursor:
                return
            cursor = str(following)
        raise ApiInternal(f"{url} returned more than {_MAX_PAGES} pages")

    def build_request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Request:
        """The request as it will be sent (no I/O): auth, User-Agent, and on POST a fresh
        ``Idempotency-Key`` that the retries of this one call reuse."""
        headers = {"Idempotency-Key": str(uuid.uuid4())} if method == "POST" else {}
        return self._http.build_request(method, url, params=params, json=json, headers=headers)

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        response = self._send(self.build_request(method, url, params=params, json=json))
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content)
        return response

    def _send(self, request: httpx.Request, *, authenticated: bool = True) -> httpx.Response:
        """Send, retrying only what cannot have reached the server or is safe to repeat
        (every method we use is: GET and DELETE are idempotent, POST carries a key).
        Timeouts are not retried: the caller chose how long to wait. ``authenticated``
        False skips the client's ``auth`` (a Bearer token is a header: drop it first)."""
        for attempt in range(self.retries + 1):
            try:
                if not authenticated:
                    return self._http.send(request, auth=None)
                return self._http.send(request)
            except httpx.UnsupportedProtocol as exc:
                raise InvalidRequest(
                    f"invalid API URL {self.base_url!r}: {exc}",
                    hint="use a URL like http://127.0.0.1:7070 (--api-url or EMBER_API_URL)",
                    detail={"field": "api_url"},
                ) from exc
            except httpx.TimeoutException as exc:
                raise Unreachable(
                    f"no answer from the control plane at {self.base_url} within "
                    f"{self.timeout:g}s ({type(exc).__name__})",
                    hint=UNREACHABLE_HINT,
                    detail={"api_url": self.base_url},
                ) from exc
            except httpx.TransportError as exc:
                if attempt < self.retries:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise Unreachable(
                    f"cannot reach the control plane at {self.base_url}: {exc}",
                    hint=UNREACHABLE_HINT,
                    detail={"api_url": self.base_url},
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns


def _env_path(org: str, app: str, env: str, *rest: str) -> str:
    return path("v1", "orgs", org, "apps", app, "envs", env, *rest)


def _body(model: type[w.Body], fields: dict[str, Any]) -> dict[str, Any]:
    """Check a request body against its wire model before sending it."""
    try:
        body = model.model_validate(fields)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidRequest(
            f"invalid {field}: {first.get('msg', 'invalid value')}",
            hint="fix the value; nothing was sent",
            detail={"field": field},
        ) from exc
    dumped: dict[str, Any] = body.model_dump(mode="json", exclude_none=True)
    return dumped


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ApiInternal(
            f"the API answered HTTP {response.status_code} with a body that is not JSON",
            request_id=response.headers.get("x-request-id"),
        ) from exc


def _parse(response: httpx.Response, model: type[M]) -> M:
    return _validate(model, _json(response), str(response.request.url.path))


def _validate(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ApiInternal(
            f"unexpected answer from {where}: not a valid {model.__name__}",
            hint="the CLI and the control plane may be different versions",
            detail={"errors": exc.errors(include_url=False, include_context=False)},
        ) from exc
