"""Background processes of the single-node stack (api, controller, registry), supervised
by pid files under ``$EMBER_HOME/run`` with logs under ``$EMBER_HOME/logs``.

`ember dev up` starts what is not running; `ember dev down` stops it (SIGTERM, then
SIGKILL after a grace period). A stale pid file (process gone, or the pid reused by
something that is not ours) counts as not running: a live pid is only ours when its
``/proc/PID/cmdline`` holds every byte string of the service's marker (``ember`` and
``server`` for Ember's own servers; ``markers`` gives other programs theirs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

EMBER_SERVER_MARKER = (b"ember", b"server")


class Supervisor:
    def __init__(self, home: Path, markers: Mapping[str, Sequence[bytes]] | None = None) -> None:
        self.home = home
        self.markers = dict(markers or {})
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def _pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of a running ``name``, or None."""
        try:
            pid = int(self._pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # Guard against pid reuse: the process must be the program we started.
        marker = self.markers.get(name, EMBER_SERVER_MARKER)
        return pid if all(part in cmdline for part in marker) else None

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> bool:
        """Start ``name`` unless it runs; return True when started now."""
        if self.pid(name) is not None:
            return False
        self.log_file(name).parent.mkdir(parents=True, exist_ok=True)
        self._pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log_file(name).open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # survives the terminal that ran `ember dev up`
                cwd="/",
            )
        self._pid_file(name).write_text(f"{proc.pid}\n")
        self._children[name] = proc
        return True

    def exited_early(self, name: str) -> bool:
        """Did a process we started in this run exit already? (A child's cmdline is not
        yet ours until it has exec'd, so ask the kernel through the child handle.)"""
        child = self._children.get(name)
        if child is not None:
            return child.poll() is not None
        return self.pid(name) is None

    def stop(self, name: str, grace_s: float = 10.0) -> bool:
        """Stop ``name``; return True when it was running."""
        pid = self.pid(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
