"""The agent's lease file: a :class:`LeaseTable` as JSON in its data directory, so a
restarted agent gives every instance the addresses and tap it had."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ember.agent.net.addressing import AddressPlan, LeaseTable
from ember.agent.net.errors import NetConfigInvalid

__all__ = ["LeaseStore"]


class LeaseStore:
    """``<data dir>/net/leases.json`` (or any path): ``load`` and atomic ``save``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, plan: AddressPlan) -> LeaseTable:
        """The saved table under ``plan`` (an empty table when no file exists yet)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return LeaseTable(plan)
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise NetConfigInvalid(f"{self.path} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise NetConfigInvalid(f"{self.path} does not hold a lease table")
        return LeaseTable.from_dict(plan, data)

    def save(self, table: LeaseTable) -> None:
        """Write ``table`` atomically (temporary file, fsync, rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = json.dumps(table.to_dict(), indent=2, sort_keys=True) + "\n"
        try:
            with open(tmp, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
