"""A private single-node stack for a test: its own home, CLI config and ports, so test
stacks never collide with each other or with a developer's `ember dev up`."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.net import free_port


def stack_env(home: Path, *, agent: bool = False) -> dict[str, str]:
    """A private stack: its own home, CLI config, API port and registry port. Without
    ``agent`` its `ember dev up` starts no host agent (tests that simulate hosts, or run
    their own agent, must not get a real one beside)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    return {
        **base,
        "EMBER_DEV_AGENT": "1" if agent else "0",
        "EMBER_HOME": str(home),
        "EMBER_CONFIG": str(home / "cli.toml"),
        "EMBER_API_PORT": str(_port_for(home)),
        "EMBER_REGISTRY_PORT": str(_port_for(home, ".registry-port")),
    }


def _port_for(home: Path, name: str = ".port") -> int:
    cached = home / name
    if cached.exists():
        return int(cached.read_text())
    port = free_port()
    cached.write_text(str(port))
    return port
