"""Reading HAProxy's control sockets' answers (ember.edge.runtime): pure parts."""

from __future__ import annotations

import pytest

from ember.edge.plan import Op, RuntimeCommand
from ember.edge.runtime import Outcome, outcome, parse_show_proc

# `show proc` on the master CLI of Debian's 2.6, one reload after a connection was held.
SHOW_PROC = """\
#<PID>          <type>          <reloads>       <uptime>        <version>      
16623           master          3 [failed: 1]   0d00h00m08s     2.6.12-1+deb12u4
# workers
16676           worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
16626           worker          1               0d00h00m08s     2.6.12-1+deb12u4
16601           worker          2               0d00h00m09s     2.6.12-1+deb12u4
# programs

"""  # noqa: W291 - HAProxy pads the header line


def test_show_proc() -> None:
    info = parse_show_proc(SHOW_PROC)
    assert (info.master_pid, info.reloads, info.failed_reloads) == (16623, 3, 1)
    assert info.workers == (16676,)
    assert info.old_workers == (16626, 16601)


def cmd(op: Op) -> RuntimeCommand:
    return RuntimeCommand(op, f"{op.value} be/s")


@pytest.mark.parametrize(
    ("op", "answer", "expected"),
    [
        (Op.ADD_SERVER, "New server registered.\n", Outcome.OK),
        (Op.ADD_SERVER, "Already exists a server with the same name in backend.\n", Outcome.FAILED),
        (Op.DEL_SERVER, "Server deleted.\n", Outcome.OK),
        (
            Op.DEL_SERVER,
            "Server still has connections attached to it, cannot remove it.",
            Outcome.BUSY,
        ),
        (Op.DEL_SERVER, "No such server.\n", Outcome.OK),
        (
            Op.SET_ADDR,
            "IP changed from '10.0.0.1' to '10.0.0.2' by 'stats socket command'",
            Outcome.OK,
        ),
        (Op.SET_ADDR, "no need to change the addr, no need to change the port", Outcome.OK),
        (Op.SET_STATE, "\n", Outcome.OK),
        (Op.SET_STATE, "No such server.\n", Outcome.FAILED),
        (Op.DEL_MAP, "", Outcome.OK),
        (Op.DEL_MAP, "Key not found.\n", Outcome.FAILED),
        (Op.ADD_MAP, "Unknown map identifier. Please use #<id> or <file>.\n", Outcome.FAILED),
        (Op.ENABLE_HEALTH, "", Outcome.OK),
        (Op.ENABLE_HEALTH, "Unknown command.", Outcome.FAILED),
    ],
)
def test_answers(op: Op, answer: str, expected: Outcome) -> None:
    assert outcome(cmd(op), answer) is expected
