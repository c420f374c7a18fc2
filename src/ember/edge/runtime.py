"""Clients of HAProxy's two control sockets (Unix sockets, blocking, short timeouts).

* :class:`RuntimeAPI`: the worker's ``stats socket`` (``level admin``): servers and maps.
  Commands run in one connection in interactive (``prompt``) mode, one at a time, so the
  first failure stops the batch before later commands act on a half-applied state.
* :class:`MasterCLI`: the master's ``-S`` socket: ``reload`` and ``show proc``.

HAProxy answers every command with free text; :func:`outcome` knows which answers mean
success for the commands :mod:`ember.edge.plan` produces.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ember.edge.errors import HAProxyUnavailable
from ember.edge.plan import Op, RuntimeCommand

__all__ = ["MasterCLI", "Outcome", "ProcInfo", "RuntimeAPI", "outcome"]

PROMPT = b"\n> "
DEFAULT_TIMEOUT_S = 5.0


class Outcome(enum.Enum):
    OK = "ok"
    BUSY = "busy"  # del server: the server still has connections; retry later
    FAILED = "failed"


_OK_ANSWERS: dict[Op, tuple[str, ...]] = {
    Op.ADD_SERVER: ("New server registered.",),
    Op.DEL_SERVER: ("Server deleted.",),
    Op.SET_ADDR: ("IP changed from", "no need to change the addr", "port changed from"),
}


def outcome(command: RuntimeCommand, answer: str) -> Outcome:
    text = answer.strip()
    if command.op is Op.DEL_SERVER and "still has connections" in text:
        return Outcome.BUSY
    if command.op is Op.DEL_SERVER and "No such server" in text:
        return Outcome.OK  # already gone: the goal of the command holds
    expected = _OK_ANSWERS.get(command.op)
    if expected is None:
        return Outcome.OK if text == "" else Outcome.FAILED
    return Outcome.OK if text.startswith(expected) else Outcome.FAILED


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise HAProxyUnavailable(f"cannot connect to {path}: {exc}") from exc
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class RuntimeAPI:
    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    def execute(self, line: str) -> str:
        """One command in its own connection (non-interactive mode); its whole answer."""
        with _connect(self.path, self.timeout) as sock:
            try:
                sock.sendall(line.encode() + b"\n")
                # The master CLI answers only once the client half-closes (as socat does).
                sock.shutdown(socket.SHUT_WR)
                return _read_to_eof(sock).decode("utf-8", "replace")
            except OSError as exc:
                raise HAProxyUnavailable(f"{self.path}: {line!r}: {exc}") from exc

    def run(self, commands: Sequence[RuntimeCommand]) -> list[tuple[RuntimeCommand, Outcome, str]]:
        """Run ``commands`` in order over one connection; stop after the first FAILED one.
        Returns (command, outcome, answer) for each command that ran."""
        results: list[tuple[RuntimeCommand, Outcome, str]] = []
        if not commands:
            return results
        with _connect(self.path, self.timeout) as sock:
            try:
                sock.sendall(b"prompt\n")
                buf = _read_prompt(sock, b"")[1]
                for command in commands:
                    sock.sendall(command.line.encode() + b"\n")
                    answer, buf = _read_prompt(sock, buf)
                    result = outcome(command, answer)
                    results.append((command, result, answer.strip()))
                    if result is Outcome.FAILED:
                        break
                sock.sendall(b"quit\n")
            except OSError as exc:
                raise HAProxyUnavailable(f"{self.path}: {exc}") from exc
        return results

    def show_info(self) -> dict[str, str]:
        return _key_values(self.execute("show info").splitlines())

    def ready(self) -> bool:
        try:
            return "Pid" in self.show_info()
        except HAProxyUnavailable:
            return False


def _read_prompt(sock: socket.socket, buf: bytes) -> tuple[str, bytes]:
    """Read until the next prompt: (the answer before it, what was read after it)."""
    while PROMPT not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("connection closed before the prompt")
        buf += chunk
    answer, _, rest = buf.partition(PROMPT)
    return answer.decode("utf-8", "replace"), rest


def _key_values(lines: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """The master's ``show proc``."""

    master_pid: int
    reloads: int
    failed_reloads: int
    workers: tuple[int, ...]
    """Current worker pids (normally one)."""
    old_workers: tuple[int, ...]
    """Workers of previous generations still serving established connections."""


_MASTER_LINE = re.compile(r"^(\d+)\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]")
_WORKER_LINE = re.compile(r"^(\d+)\s+worker\s")


def parse_show_proc(text: str) -> ProcInfo:
    master = reloads = failed = 0
    workers: list[int] = []
    old: list[int] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("# workers"):
            section = "workers"
        elif line.startswith("# old workers"):
            section = "old"
        elif line.startswith("#"):
            section = "" if not line.startswith("#<PID>") else section
        elif m := _MASTER_LINE.match(line):
            master, reloads, failed = int(m[1]), int(m[2]), int(m[3])
        elif m := _WORKER_LINE.match(line):
            (workers if section == "workers" else old).append(int(m[1]))
    return ProcInfo(master, reloads, failed, tuple(workers), tuple(old))


class MasterCLI:
    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout

    def execute(self, line: str) -> str:
        with _connect(self.path, self.timeout) as sock:
            try:
                sock.sendall(line.encode() + b"\n")
                # The master CLI answers only once the client half-closes (as socat does).
                sock.shutdown(socket.SHUT_WR)
                return _read_to_eof(sock).decode("utf-8", "replace")
            except OSError as exc:
                raise HAProxyUnavailable(f"{self.path}: {line!r}: {exc}") from exc

    def show_proc(self) -> ProcInfo:
        return parse_show_proc(self.execute("show proc"))

    def reload(self) -> None:
        """Ask the master to reload (it re-executes itself; the connection just closes)."""
        self.execute("reload")

    def wait_proc(self, timeout: float) -> ProcInfo:
        """``show proc`` once the master answers again (it does not while it re-executes)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.show_proc()
            except HAProxyUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
