"""Take a host agent's footprint off the machine: its VMs, taps, routes and nftables table.

`ember server agent` leaves its VMs running when it stops (a restarted agent adopts them).
Stopping a whole single-node stack (`ember dev down`) must leave nothing behind, so after
the agent process is gone :func:`teardown` stops every VM the agent's local state records
(the guest gets its kill signal, as for any stop), deletes the instance taps and the
host routes, and removes the ``inet ember`` table.

The local records stay, marked exited with ``stop_requested``: the next agent start
reports those instances ``stopped`` (not ``failed`` — nothing crashed, so the restart
policy and rollout failure limits are untouched) and the controller replaces them, which
is how a restarted stack gets its instances back. Images and the node identity stay too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from ember.agent.converge import LocalStatus
from ember.agent.net.addressing import AddressPlan
from ember.agent.net.firewall import Firewall
from ember.agent.net.store import LeaseStore
from ember.agent.net.taps import TapNetwork
from ember.agent.state import StateStore
from ember.agent.vmm.base import VmmDriver, VmNotFound, VmSpec, VmState

__all__ = ["TeardownReport", "teardown"]

REASON = "stopped with the host ('ember dev down')"


@dataclasses.dataclass(frozen=True)
class TeardownReport:
    vms_stopped: tuple[str, ...]
    taps_deleted: tuple[str, ...]
    firewall_removed: bool


def _adopt(driver: VmmDriver, store: StateStore, vm_id: str, instance_id: str) -> bool:
    """Is the instance's VM still running? (adopting it makes it known to the driver)."""
    spec = VmSpec(
        vm_id=vm_id,
        kernel=Path("/dev/null"),  # adopt reads the driver's records, not the boot files
        initrd=None,
        kernel_args="",
        vcpus=1,
        memory_mb=128,
        drives=(),
        workdir=store.vm_run_dir(instance_id),
    )
    handle = driver.adopt(spec)
    return handle is not None and handle.state is VmState.RUNNING


def teardown(
    data_dir: Path,
    *,
    driver: VmmDriver,
    taps: TapNetwork | None = None,
    firewall: Firewall | None = None,
) -> TeardownReport:
    """Stop the VMs of the agent whose data dir is ``data_dir`` and remove its network
    footprint. Idempotent; call it only once the agent process has exited."""
    store = StateStore(data_dir)
    state = store.load()
    stopped: list[str] = []
    for iid, record in sorted(state.instances.items()):
        if record.status is LocalStatus.EXITED:
            continue
        code = record.exit_code
        # PREPARING too: an agent killed between starting the VMM and recording it
        # leaves a running VM behind a record that still says preparing.
        if _adopt(driver, store, record.vm_id, iid):
            with contextlib.suppress(VmNotFound):
                code = driver.stop(record.vm_id, timeout_s=record.kill_timeout_s).exit_code
            stopped.append(iid)
        state = state.with_instance(
            dataclasses.replace(
                record,
                status=LocalStatus.EXITED,
                exit_code=code,
                stop_requested=True,
                reason=record.reason or REASON,
            )
        )
    store.save(state)

    taps = taps or TapNetwork()
    deleted: list[str] = []
    removed = False
    if state.host_id is not None:  # an agent that never enrolled set nothing up
        plan = AddressPlan.for_host(state.host_id)
        # Only this agent's taps (its lease file names them): another agent on the same
        # machine keeps its own. The leases stay recorded until the restarted agent
        # forgets their instances; only the kernel objects go.
        for lease in LeaseStore(store.leases_path).load(plan).leases.values():
            if taps.delete(lease.tap):
                deleted.append(lease.tap)
        taps.unprepare_host(plan)
        firewall = firewall or Firewall()
        if firewall.dump():
            firewall.remove()
            removed = True
    return TeardownReport(tuple(stopped), tuple(deleted), removed)
