"""`ember deploy`'s wait (ember.cli.rollout.wait_for_rollout) with the real client against
the real API on real Postgres. Each poll's pause (``sleep``) is where the world moves: a
controller step by the real reconciler and the agents' reports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ember.cli.rollout import RolloutFailed, RolloutTimeout, wait_for_rollout
from ember.client import Client
from tests.support.api import Api, Tenant
from tests.support.workloads import controller_step, instances, run_failed, run_healthy

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def manifest(app: str) -> str:
    # One replacement of a crashed instance, then the restart policy gives up (a halt).
    return (
        f'schema_version = 1\napp = "{app}"\n[processes]\nweb = "httpd -f -p 8080"\n'
        "[restart]\nmax_retries = 1\n"
    )


@pytest.fixture
def client(api: Api, tenant: Tenant) -> Iterator[Client]:
    # The TestClient's transport: requests reach the app in this process, lifespan running.
    with Client("http://testserver", tenant.token, transport=api.client._transport) as c:
        yield c


def deploy(client: Client, t: Tenant, digest: str, *, auto_rollback: bool = False) -> int:
    result = client.deploy(
        t.org,
        t.app,
        t.env,
        repository=f"{t.org}/{t.app}",
        digest=digest,
        manifest=manifest(t.app),
        auto_rollback=auto_rollback,
    )
    assert result.created
    return result.item.version


class Clock:
    def __init__(self, world: Callable[[], None] = lambda: None) -> None:
        self.now = 0.0
        self.world = world
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        self.world()


def wait(client: Client, t: Tenant, version: int, clock: Clock, timeout: float = 60) -> object:
    return wait_for_rollout(
        client,
        t.org,
        t.app,
        t.env,
        version,
        timeout=timeout,
        quiet=True,
        clock=clock,
        sleep=clock.sleep,
    )


def test_waits_until_the_new_release_converges(api: Api, tenant: Tenant, client: Client) -> None:
    version = deploy(client, tenant, D1)

    def world() -> None:
        controller_step(api, tenant)
        for iid in instances(api, tenant):
            run_healthy(api, tenant, iid)

    clock = Clock(world)
    outcome, status = wait(client, tenant, version, clock)  # type: ignore[misc]
    assert outcome == "converged" and status.converged
    assert [(p.name, p.healthy, p.desired) for p in status.processes] == [("web", 1, 1)]
    assert clock.sleeps >= 2  # rollout started, instance created, completed


def test_a_halted_rollout_ends_the_wait_with_its_reason(
    api: Api, tenant: Tenant, client: Client
) -> None:
    deploy(client, tenant, D1)
    controller_step(api, tenant)
    controller_step(api, tenant)
    run_healthy(api, tenant, instances(api, tenant)[0])
    controller_step(api, tenant)
    version = deploy(client, tenant, D2, auto_rollback=True)

    def world() -> None:  # every new instance crashes
        controller_step(api, tenant)
        for iid in instances(api, tenant):
            run_failed(api, tenant, iid, exit_code=3)

    with pytest.raises(RolloutFailed) as info:
        wait(client, tenant, version, Clock(world))
    message = info.value.message
    assert message.startswith("the rollout of v2 halted: 2 new instances failed")
    assert "rolling back to v1" in message and "exited with code 3" in message
    assert info.value.detail["phase"] == "halted"


def test_without_a_controller_the_wait_times_out_saying_so(
    api: Api, tenant: Tenant, client: Client
) -> None:
    version = deploy(client, tenant, D1)
    events = api.event_count()
    with pytest.raises(RolloutTimeout) as info:
        wait(client, tenant, version, Clock(), timeout=5)
    assert "no rollout of v1 started within 5s: the controller may not be running" in (
        info.value.message
    )
    assert api.event_count() == events  # waiting only reads
