"""The per-VM supervisor of the ``qemu`` driver: ``python -m ember.agent.vmm.qemu_shim DIR``.

Like containerd's shim or conmon, it outlives the agent: the driver starts it, it
detaches (double fork, so the agent never has to reap it), starts QEMU as its own
child and then

* copies QEMU's stdout (the guest's serial console) into the console log, keeping it
  under a size cap: when the log reaches the cap it becomes ``LOG.1`` (replacing the
  previous one) and a new ``LOG`` starts, so a guest printing 1 GB costs at most two
  caps of disk;
* copies QEMU's stderr into ``DIR/qemu.log`` (capped the same way);
* watches the console for the platform init's ``ember-init: exit status N`` line;
* when QEMU exits, writes ``DIR/exit.json`` (QEMU's own exit status, the workload's exit
  status from the console, a boot failure reason) and removes the VM's cgroup.

Its input is ``DIR/launch.json`` (written by the driver); it announces QEMU's pid in
``DIR/state.json``. Standard library only, and nothing of Ember's is imported: it
starts in a few tens of milliseconds and keeps ~10 MB of memory per VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

EXIT_LINE = re.compile(rb"ember-init: exit status (\d+)")
FAIL_LINE = re.compile(rb"ember-init: boot failed: (.*)")
_LINE_MAX = 4096


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    tmp.replace(path)


class CappedLog:
    """A log file that never grows past ``cap`` bytes: the full file moves to ``.1``."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = max(cap, 4096)
        self.f: BinaryIO = path.open("ab")
        self.size = self.f.tell()

    def write(self, data: bytes) -> None:
        while data:
            if self.size >= self.cap:
                self.f.close()
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                self.f = self.path.open("ab")
                self.size = 0
            chunk = data[: self.cap - self.size]
            self.f.write(chunk)
            self.f.flush()
            self.size += len(chunk)
            data = data[len(chunk) :]

    def close(self) -> None:
        self.f.close()


class ConsoleWatch:
    """Finds the init's status lines in a byte stream (lines may span reads)."""

    def __init__(self) -> None:
        self.partial = b""
        self.exit_code: int | None = None
        self.boot_failure: str | None = None

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-_LINE_MAX:]
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = b""

    def _line(self, line: bytes) -> None:
        if b"ember-init: " not in line:
            return
        if m := EXIT_LINE.search(line):
            self.exit_code = int(m.group(1))
        elif m := FAIL_LINE.search(line):
            self.boot_failure = m.group(1).rstrip(b"\r").decode("utf-8", "replace")


def _child_setup(cgroup: str | None) -> None:
    """In the child, before exec: default signal dispositions (the shim ignores some),
    and the VMM runs inside its cgroup from its first byte."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if cgroup:
        with open(f"{cgroup}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))


def supervise(workdir: Path) -> int:
    launch = json.loads((workdir / "launch.json").read_text())
    console = CappedLog(Path(launch["console_log"]), int(launch["console_cap"]))
    errlog = CappedLog(workdir / "qemu.log", int(launch["console_cap"]))
    watch = ConsoleWatch()
    cgroup: str | None = launch.get("cgroup")
    started = time.time()
    try:
        proc = subprocess.Popen(
            launch["argv"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            preexec_fn=lambda: _child_setup(cgroup),  # noqa: PLW1509 - the shim has one thread
        )
    except OSError as exc:
        write_json(
            workdir / "exit.json", {"qemu_status": None, "exit_code": None, "error": str(exc)}
        )
        return 1
    write_json(
        workdir / "state.json",
        {
            "vm_id": launch["vm_id"],
            "qemu_pid": proc.pid,
            "qemu_start_ticks": start_ticks(proc.pid),
            "shim_pid": os.getpid(),
            "started_at": started,
        },
    )
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): (console, watch), proc.stderr.fileno(): (errlog, None)}
    while streams:
        ready, _, _ = select.select(list(streams), [], [])
        for fd in ready:
            data = os.read(fd, 65536)
            log, w = streams[fd]
            if not data:
                del streams[fd]
                continue
            log.write(data)
            if w is not None:
                w.feed(data)
    status = proc.wait()
    watch.close()
    console.close()
    errlog.close()
    write_json(
        workdir / "exit.json",
        {
            "qemu_status": status,
            "exit_code": watch.exit_code,
            "boot_failure": watch.boot_failure,
            "ended_at": time.time(),
        },
    )
    if cgroup:
        with contextlib.suppress(OSError):
            os.rmdir(cgroup)
    return 0


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces and parentheses.
    return int(stat.rsplit(")", 1)[1].split()[19])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ember.agent.vmm.qemu_shim VM_DIR", file=sys.stderr)  # noqa: T201
        return 2
    workdir = Path(args[0])
    # Detach: the first process exits at once (the driver waits for it), the second
    # is reparented to init (or the nearest subreaper) and lives as long as QEMU.
    if os.fork() > 0:
        return 0
    os.setsid()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM from a careless `kill` would lose the exit record: QEMU is stopped
    # through the driver (QMP, then SIGKILL), and the shim follows QEMU.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return supervise(workdir)
    except Exception as exc:  # noqa: BLE001 - the last word goes to a file nobody else writes
        with contextlib.suppress(OSError):
            (workdir / "shim.error").write_text(f"{type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
