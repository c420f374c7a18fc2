"""The agent's local state in its data directory (JSON, written atomically).

``<data dir>/state.json`` holds the host id once enrolled and one record per instance the
agent started (its VM id, address, tap, image, start time, what it last observed and
reported, its health verdict and the per-boot token of its in-guest check results). A
restarted agent reads it to adopt its running VMs (``VmmDriver.adopt``) instead of
starting them again. The node's private key lives beside it in
``<data dir>/node.key`` (``ember.client.node_auth.NodeIdentity.load_or_create``); the
address leases in ``<data dir>/net/leases.json`` (``ember.agent.net.store.LeaseStore``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ember.agent.converge import LocalStatus, LocalVm
from ember.agent.health import Verdict
from ember.core.errors import ValidationFailed

__all__ = ["AgentState", "InstanceRecord", "StateInvalid", "StateStore"]

VERSION = 1


class StateInvalid(ValidationFailed):
    code = "agent.state_invalid"


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    vm_id: str
    repository: str = ""
    image_digest: str = ""
    address: str | None = None
    tap: str | None = None
    started_at: float | None = None
    status: LocalStatus = LocalStatus.PREPARING
    exit_code: int | None = None
    health: Verdict | None = None
    health_reason: str = ""
    stop_requested: bool = False
    reported: str | None = None
    reason: str = ""
    kill_timeout_s: float = 5.0
    check_token: str = ""
    """The config drive's ``check-token``: only console lines carrying it are the init's
    exec check results (docs/specs/guest-config.md §4)."""

    def local_vm(self) -> LocalVm:
        return LocalVm(
            instance_id=self.instance_id,
            status=self.status,
            exit_code=self.exit_code,
            health=self.health,
            health_reason=self.health_reason,
            stop_requested=self.stop_requested,
            reported=self.reported,
            address=self.address,
            reason=self.reason,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = str(self.status)
        out["health"] = str(self.health) if self.health is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Any) -> InstanceRecord:
        if not isinstance(data, dict):
            raise StateInvalid("an instance record is not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            fields = {k: v for k, v in data.items() if k in names}
            fields["status"] = LocalStatus(fields.get("status", LocalStatus.PREPARING))
            if "health" not in data and data.get("healthy"):  # a record of an older agent
                fields["health"] = Verdict.HEALTHY
            if fields.get("health") is not None:
                fields["health"] = Verdict(fields["health"])
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise StateInvalid(f"bad instance record: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class AgentState:
    host_id: str | None = None
    """Set once enrolment succeeded: later starts skip enrolment."""
    instances: dict[str, InstanceRecord] = dataclasses.field(default_factory=dict)

    def with_instance(self, record: InstanceRecord) -> AgentState:
        return dataclasses.replace(self, instances={**self.instances, record.instance_id: record})

    def without_instance(self, instance_id: str) -> AgentState:
        rest = {k: v for k, v in self.instances.items() if k != instance_id}
        return dataclasses.replace(self, instances=rest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "host_id": self.host_id,
            "instances": {k: v.to_dict() for k, v in sorted(self.instances.items())},
        }

    @classmethod
    def from_dict(cls, data: Any) -> AgentState:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateInvalid(f"not an agent state of version {VERSION}")
        host_id = data.get("host_id")
        if host_id is not None and not isinstance(host_id, str):
            raise StateInvalid("host_id is not a string")
        raw = data.get("instances") or {}
        if not isinstance(raw, dict):
            raise StateInvalid("instances is not an object")
        records = {k: InstanceRecord.from_dict(v) for k, v in raw.items()}
        return cls(host_id=host_id, instances=records)


class StateStore:
    """``<data dir>/state.json``: ``load`` (empty state when absent) and atomic ``save``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "state.json"

    @property
    def identity_path(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def leases_path(self) -> Path:
        return self.data_dir / "net" / "leases.json"

    def vm_dir(self, instance_id: str) -> Path:
        return self.data_dir / "vms" / instance_id

    def vm_run_dir(self, instance_id: str) -> Path:
        """The VMM driver's own directory of an instance (pid files, sockets, the exit
        record): where the agent starts the VM and where adoption finds it again."""
        return self.vm_dir(instance_id) / "run"

    def load(self) -> AgentState:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return AgentState()
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateInvalid(f"{self.path} is not JSON: {exc}") from exc
        return AgentState.from_dict(data)

    def save(self, state: AgentState) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"
        try:
            with open(tmp, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
