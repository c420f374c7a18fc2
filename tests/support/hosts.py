"""Hosts and instances for API tests: an operator's token, an enrolled host's node
identity (signing its requests), and an instance placed on a host the way the controller
and the scheduler record it (instance.created on the workload stream, instance.assigned
on the host's stream), folded into the views."""

from __future__ import annotations

from typing import Any

from ember.client.node_auth import NodeAuth, NodeIdentity
from ember.core.events import ANY, EventData, Metadata, NewEvent
from ember.core.hosts import InstanceAssigned, host_stream
from ember.core.instances import InstanceCreated, InstanceSpec
from ember.core.workloads import workload_stream
from tests.support.api import Api

HOST: dict[str, Any] = {"vcpus": 4, "memory_mb": 8192, "disk_mb": 100_000, "region": "fra"}


def operator_token(api: Api, email: str = "ops@example.com") -> str:
    """An unscoped, all-capabilities token of a platform operator."""
    user_id = api.user(email)
    api.svc.set_operator(email, True)
    return api.mint(user_id)


def enroll_token(api: Api, op: str, host_id: str | None = None, expires_in_s: int = 3600) -> str:
    """A one-time enrolment token, made by the operator whose token is ``op``."""
    body: dict[str, Any] = {"expires_in_s": expires_in_s}
    if host_id is not None:
        body["host_id"] = host_id
    created = api.call("POST", "/v1/hosts/enrollment-tokens", op, 201, body)
    return str(created["token"])


def enroll_body(token: str, host_id: str, identity: NodeIdentity, **facts: Any) -> dict[str, Any]:
    return {
        **HOST,
        **facts,
        "token": token,
        "host_id": host_id,
        "public_key": identity.public_key_b64,
    }


def enroll_node(api: Api, op: str, host_id: str, **facts: Any) -> NodeAuth:
    """Enrol ``host_id`` through the API with a new key; its requests' signer."""
    identity = NodeIdentity.generate()
    token = enroll_token(api, op, host_id)
    api.call("POST", "/v1/agents/enroll", None, 201, enroll_body(token, host_id, identity, **facts))
    return NodeAuth(identity, host_id)


def append(api: Api, stream: str, *events: EventData) -> None:
    api.svc.log.append(stream, ANY, [NewEvent.of(e, Metadata(actor="test")) for e in events])


def place(
    api: Api,
    host_id: str,
    instance_id: str,
    *,
    app_id: str = "app_x",
    env: str = "prod",
    memory_mb: int = 512,
) -> None:
    """What the controller and the scheduler write for one instance on ``host_id``."""
    spec = InstanceSpec(
        release_version=1,
        repository="acme/web",
        image_digest="sha256:" + "a" * 64,
        memory_mb=memory_mb,
        cpus=0.5,
    )
    created = InstanceCreated(
        instance_id=instance_id,
        app_id=app_id,
        env=env,
        process="web",
        spec=spec,
        spec_hash=spec.spec_hash,
    )
    append(api, workload_stream(app_id, env), created)
    assigned = InstanceAssigned(
        host_id=host_id,
        instance_id=instance_id,
        app_id=app_id,
        env=env,
        process="web",
        memory_mb=memory_mb,
        cpus=0.5,
    )
    append(api, host_stream(host_id), assigned)
    api.svc.runner.catch_up("scheduling")
