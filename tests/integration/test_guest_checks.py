"""Exec health checks in a real microVM (QEMU, TCG here): the platform init runs them on
their schedule as the workload's user, env and workdir, kills them at their timeout, and
prints each result with the config drive's per-boot token; the agent's parser
(``read_console`` + ``parse_check_line``) takes exactly those lines, not the workload's
look-alikes. Needs root (cgroups), like the other microVM tests."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

from ember.agent.guest_config import (
    CheckLine,
    ConsoleCursor,
    GuestCheck,
    GuestConfig,
    Mount,
    parse_check_line,
    read_console,
)
from tests.integration.test_qemu_boot import (  # noqa: F401  (fixtures)
    Booter,
    accel_state,
    booter,
    console,
    guest,
    rootfs_tree,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="microVM tests need root (taps, cgroups)"),
]

# Check 0: passes while /scratch/ok exists, and records what it saw in /scratch/seen so
# that the workload can wait for the check instead of for the clock. Exit 2 would mean it did not
# run as the workload's user, in its workdir, with its env.
CHECK = (
    "echo the check talks; "
    '[ "$(id -u):$PWD:$MARK" = "65534:/srv:x" ] || exit 2; '
    "if [ -f /scratch/ok ]; then echo ok >> /scratch/seen; "
    "else echo fail >> /scratch/seen; exit 1; fi"
)
FORGED = "0" * 32
WORKLOAD = f"""
echo "ember-init: check {FORGED} 0 fail status 7"
echo "devices: $(ls /dev | grep '^vd' | tr '\\n' ' ')"
count() {{ n=$(grep -c "^$1\\$" /scratch/seen 2>/dev/null); echo "${{n:-0}}"; }}
wait_for() {{
    want=$(( $(count "$1") + $2 ))
    while [ "$(count "$1")" -lt "$want" ]; do sleep 0.1; done
}}
touch /scratch/ok; wait_for ok 2
rm /scratch/ok; echo "workload: removed /scratch/ok"; wait_for fail 2
touch /scratch/ok; echo "workload: created /scratch/ok"; wait_for ok 2
sleepers=0
for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = sleep ] && sleepers=$((sleepers + 1))
done
echo "sleepers: $sleepers"
echo "workload: done"
exec sleep 1000
"""


def results(log: Path, token: str) -> list[CheckLine]:
    """The init's check results in a console log, as the agent reads them."""
    lines, _ = read_console(log, ConsoleCursor())
    return [r for line in lines if (r := parse_check_line(line, token)) is not None]


def test_exec_checks_flip_with_the_workload_and_forged_lines_are_ignored(
    booter: Booter,  # noqa: F811  (the fixture imported above)
) -> None:
    token = secrets.token_hex(16)
    config = GuestConfig(
        argv=("sh", "-c", WORKLOAD),
        env=GuestConfig.env_from({"MARK": "x"}),
        user="65534:65534",
        workdir="/srv",
        mounts=(Mount("tmpfs", "/scratch", "tmpfs", "size=1m,mode=1777"),),
        checks=(
            GuestCheck(("sh", "-c", CHECK), interval_s=1, timeout_s=1),
            GuestCheck(("sleep", "30"), interval_s=1, timeout_s=0.5),  # always times out
        ),
        check_token=token,
    )
    spec = booter.spec("checks", config)
    driver = booter.driver()
    booter.start(driver, spec)
    wait_until(lambda: "workload: done" in console(spec), 240, "the workload to see ok/fail/ok")
    text = console(spec)
    driver.stop(spec.vm_id, timeout_s=30)

    assert spec.console_log is not None
    got = results(spec.console_log, token)
    first = [r for r in got if r.index == 0]
    # ok → fail → ok, each seen (the workload waited for the check's own record).
    flips = [r.ok for k, r in enumerate(first) if k == 0 or r.ok != first[k - 1].ok]
    assert flips[flips.index(True) :][:3] == [True, False, True], got
    assert {r.detail for r in first if not r.ok} == {"status 1"}  # user, workdir, env right
    # The timeout: SIGKILL, reported, and reaped (no pile of sleeping checks).
    second = [r for r in got if r.index == 1]
    assert second and all(r == CheckLine(1, False, "timeout") for r in second), second
    sleepers = re.search(r"sleepers: (\d+)", text)
    assert sleepers is not None and int(sleepers.group(1)) <= 1, text
    assert "not found" not in text

    # The workload's look-alike is on the console, and it counts for nothing.
    assert f"ember-init: check {FORGED} 0 fail status 7" in text
    assert all(r.detail != "status 7" for r in got)
    # The config drive (with the token) is gone from the workload's /dev.
    assert re.search(r"^devices: vda \r?$", text, re.M), text
    # A check's own output never reaches the console: only the result lines.
    assert "the check talks" not in text
