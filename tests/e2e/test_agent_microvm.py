"""The real host agent with a real microVM (QEMU) on a private dev stack: `ember deploy` of
the hello-http sample ends with a VM serving its page, `ember status` shows it healthy with
an address, and `ember scale web=0` stops it. Needs root (taps, nftables, cgroups)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_qemu_boot import guest  # noqa: F401  (the session fixture)
from tests.support.agentstack import (
    SAMPLE,
    SAMPLE_PAGE,
    AgentStack,
    fetch_page,
    hello_http_image,  # noqa: F401  (the module fixture)
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]


def test_agent_runs_hello_http_in_a_microvm(
    guest: dict[str, Path],  # noqa: F811
    hello_http_image: Path,  # noqa: F811
) -> None:
    stack = AgentStack(Path(tempfile.mkdtemp(prefix="ember-agent-e2e-")), guest["kernel"].parent)
    try:
        stack.up()
        stack.start_agent()
        stack.wait_enrolled()
        project = stack.create_app("hello-http", (SAMPLE / "ember.toml").read_text())
        started = time.monotonic()
        stack.deploy(project, hello_http_image)
        print(f"deploy to healthy: {time.monotonic() - started:.1f}s")
        status: Any = stack.status("hello-http")
        live = [i for i in status["instances"] if i["state"] == "healthy"]
        assert len(live) == 1, status
        instance = live[0]
        assert instance["host_id"] == stack.host_id and instance["address"], instance
        assert fetch_page(instance["address"]) == SAMPLE_PAGE
        assert list(stack.qemus().values()) == [instance["instance_id"]]

        stack.run("scale", "web=0", "--app", "hello-http", "--env", "prod")

        def stopped() -> bool:
            state = stack.instances("hello-http")[instance["instance_id"]]["state"]
            return state == "stopped" and not stack.qemus() and not stack.taps()

        # Once the instance is stopped the agent forgets it: its tap goes too.
        wait_for("the VM to stop", stopped, 60, describe=stack.agent_log)
    finally:
        left = stack.close()
        print(stack.agent_log())  # shown when the test fails
        stack.remove_home()
    assert left.agent_exit == 0, f"the agent did not exit cleanly on SIGTERM: {left}"
    assert left.clean, f"left behind: {left}"
