"""The HAProxy driver: runs one HAProxy in master-worker mode and moves it from snapshot to
snapshot without dropping established connections.

Use (the edge controller does this with every snapshot it lists or watches)::

    edge = HAProxy(Path("/var/lib/ember/edge"))
    edge.start(first_snapshot)         # or adopts an HAProxy already serving this directory
    result = edge.apply(next_snapshot) # runtime API when it can, seamless reload otherwise
    edge.stop()

Calls are blocking and short (a runtime batch takes milliseconds; a reload ~100-200 ms),
serialized by a lock; an asyncio controller wraps them in ``asyncio.to_thread``.

How a change is applied (:mod:`ember.edge.plan` decides which):

* **Runtime API** (``stats socket``, ``level admin``): server add/remove/address/state and
  map entries change in the running worker at once, and a new TLS hostname on an
  existing listener moves into one of the configuration's spare backends; established
  connections are not touched. A server HAProxy refuses to delete because it still
  carries connections stays *lingering* in maintenance and is deleted by a later
  ``apply``/``retry_lingering``. If
  any command fails, the driver falls back to a reload, which makes the worker match the
  snapshot whatever state the failed batch left.
* **Seamless reload**: the new configuration is written to a fresh generation directory
  (``gen/<n>/haproxy.cfg`` + ``gen/<n>/maps/``), checked with ``haproxy -c``, promoted to
  ``haproxy.cfg`` (the file the master was started with), and the master CLI's ``reload``
  re-executes the master, which starts a new worker that receives the listening sockets
  from the old one (no refused connection) while the old worker keeps its established
  connections until they end. The driver waits until the new worker answers on the
  runtime socket. A config ``haproxy -c`` refuses is never promoted (``ConfigRejected``);
  a reload the master reports as failed puts the previous ``haproxy.cfg`` back
  (``ReloadFailed``); in both cases the old worker keeps serving the last good snapshot.

Files under ``root``: ``haproxy.cfg`` (what the master loads), ``gen/<n>/`` (the last few
generations; the newest is the running one), ``run/master.sock`` (master CLI),
``run/admin.sock`` (runtime API), ``haproxy.log`` (HAProxy's own stderr). Nothing outside
``root`` is read or written: the Debian package's /etc/haproxy and its service are unused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from ember.core.edge import EdgeSnapshot
from ember.edge import haproxy_config
from ember.edge.errors import (
    ConfigRejected,
    HAProxyMissing,
    HAProxyUnavailable,
    ListenerUnavailable,
    ReloadFailed,
    StartFailed,
)
from ember.edge.plan import Op, Plan, Running, ServerRef, plan
from ember.edge.runtime import MasterCLI, Outcome, ProcInfo, RuntimeAPI

__all__ = ["ApplyResult", "HAProxy", "HAProxyOptions"]

UNIX_PATH_MAX = 107


@dataclasses.dataclass(frozen=True)
class HAProxyOptions:
    binary: str = "haproxy"
    nbthread: int | None = None
    maxconn: int | None = None
    hard_stop_after_ms: int | None = None
    """Cap on how long an old worker may keep established connections after a reload
    (None: until they close by themselves, bounded by the idle timeout)."""
    start_timeout_s: float = 10.0
    reload_timeout_s: float = 10.0
    check_timeout_s: float = 30.0
    keep_generations: int = 3
    spare_backends: int = 64
    """Empty backends in each configuration that new TLS routes on existing listeners
    take at run time, without a reload (see ember.edge.plan)."""
    preflight_binds: bool = True
    """Before a reload, test-bind the listeners the running worker does not have yet: a
    port another process holds or an address not on this host would fail the reload,
    and HAProxy pauses the old listeners for ~2 s while it retries the bind."""


@dataclasses.dataclass(frozen=True)
class ApplyResult:
    plan: Plan
    reloaded: bool
    commands_run: int
    lingering: frozenset[ServerRef]
    fallback: str | None
    """Set when runtime commands failed and a reload was done instead (what failed)."""
    seconds: float


class HAProxy:
    """One HAProxy (master + workers) serving the snapshots given to :meth:`apply`."""

    def __init__(self, root: Path, options: HAProxyOptions | None = None) -> None:
        self.root = root.absolute()
        self.options = options or HAProxyOptions()
        self.config_file = self.root / "haproxy.cfg"
        self.master_socket = self.root / "run" / "master.sock"
        self.runtime_socket = self.root / "run" / "admin.sock"
        self.log_file = self.root / "haproxy.log"
        if len(str(self.runtime_socket)) + 12 > UNIX_PATH_MAX:  # HAProxy adds ".<pid>.tmp"
            raise ValueError(f"{self.root} is too long for Unix socket paths under it")
        self.runtime = RuntimeAPI(self.runtime_socket)
        self.master = MasterCLI(self.master_socket)
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._master_pid: int | None = None
        self._running: Running | None = None
        self._generation = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, snapshot: EdgeSnapshot) -> ApplyResult:
        """Serve ``snapshot``. An HAProxy already answering on this directory's master
        socket (left by a previous controller) is adopted and reloaded with ``snapshot``;
        its established connections survive."""
        with self._lock:
            binary = shutil.which(self.options.binary)
            if binary is None:
                raise HAProxyMissing(
                    f"{self.options.binary!r} is not installed",
                    hint="install the Debian package: apt-get install haproxy"
                    " (make bootstrap does)",
                )
            self.root.mkdir(parents=True, exist_ok=True)
            self.master_socket.parent.mkdir(mode=0o700, exist_ok=True)
            self._generation = self._last_generation()
            adopted = self._adopt()
            if adopted is not None:
                self._master_pid = adopted.master_pid
                return self._apply_locked(snapshot, started=time.monotonic())
            t0 = time.monotonic()
            map_dir = self._write_generation(snapshot)
            self._spawn(binary)
            self._running = Running.loaded(snapshot, map_dir, self.options.spare_backends)
            return ApplyResult(
                Plan(reload_reasons=("started",)), True, 0, frozenset(), None, _since(t0)
            )

    def _adopt(self) -> ProcInfo | None:
        """The ``show proc`` of an HAProxy already serving this directory, if any."""
        if not self.master_socket.exists():
            return None
        # Socket files outlive a dead master; a live worker tells a stale master socket
        # from one whose master is still starting (it answers a few ms after the worker).
        deadline = time.monotonic() + (1.0 if self.runtime.ready() else 0.0)
        while True:
            try:
                info = self.master.show_proc()
                return info if info.master_pid else None
            except HAProxyUnavailable:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.01)

    def _spawn(self, binary: str) -> None:
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "-W",
                    "-S",
                    f"{self.master_socket},mode,600",
                    "-f",
                    str(self.config_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: the data plane outlives a controller that dies (the
                # next one adopts it), and a terminal's ^C does not reach it.
                start_new_session=True,
            )
        finally:
            log.close()
        self._master_pid = self._process.pid
        deadline = time.monotonic() + self.options.start_timeout_s
        while not (self.runtime.ready() and self._master_ready()):
            failure = None
            if self._process.poll() is not None:
                failure = f"haproxy exited with status {self._process.returncode}"
            elif time.monotonic() > deadline:
                self._kill()
                failure = f"haproxy did not answer within {self.options.start_timeout_s}s"
            if failure:
                self._process = self._master_pid = None
                raise StartFailed(failure, detail={"log": self._log_tail()})
            time.sleep(0.01)

    def _master_ready(self) -> bool:
        try:
            return self.master.show_proc().master_pid == self._master_pid
        except HAProxyUnavailable:
            return False

    def stop(self, *, grace_s: float = 0.0) -> None:
        """Stop HAProxy. With ``grace_s`` the workers first stop listening and get that long
        to finish their connections (soft stop); then they are terminated."""
        with self._lock:
            pid = self._master_pid
            if pid is None:
                return
            if grace_s > 0:
                _signal(pid, signal.SIGUSR1)
                self._wait_exit(pid, grace_s)
            _signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, 5.0):
                self._kill()
            self._master_pid = None
            self._process = None
            self._running = None

    def _kill(self) -> None:
        if self._master_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._master_pid, signal.SIGKILL)
            self._wait_exit(self._master_pid, 5.0)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif not _exists(pid):
                return True
            time.sleep(0.01)
        return False

    def alive(self) -> bool:
        if self._master_pid is None:
            return False
        if self._process is not None:
            return self._process.poll() is None
        return _exists(self._master_pid)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------

    @property
    def running(self) -> Running | None:
        """What the current worker serves (None before start)."""
        return self._running

    @property
    def master_pid(self) -> int | None:
        return self._master_pid

    def proc_info(self) -> ProcInfo:
        return self.master.show_proc()

    # -- applying snapshots -----------------------------------------------------------------

    def apply(self, snapshot: EdgeSnapshot) -> ApplyResult:
        """Make HAProxy serve ``snapshot`` (raises ``SnapshotInvalid`` before touching
        anything if it cannot be rendered; see ``haproxy_config.without_invalid_routes``)."""
        with self._lock:
            if self._master_pid is None:
                raise HAProxyUnavailable("haproxy is not started", hint="call start() first")
            return self._apply_locked(snapshot, started=time.monotonic())

    def retry_lingering(self) -> ApplyResult | None:
        """Retry deleting servers HAProxy kept for their connections (call periodically)."""
        with self._lock:
            if self._running is None or not self._running.lingering:
                return None
            return self._apply_locked(self._running.snapshot, started=time.monotonic())

    def _apply_locked(self, snapshot: EdgeSnapshot, *, started: float) -> ApplyResult:
        step = plan(self._running, snapshot)
        if step.reload:
            self._reload(snapshot)
            return ApplyResult(step, True, 0, frozenset(), None, _since(started))
        results = self.runtime.run(step.commands)
        failed = [(c, a) for c, o, a in results if o is Outcome.FAILED]
        if failed:
            command, answer = failed[0]
            self._reload(snapshot)
            return ApplyResult(
                step, True, len(results), frozenset(), f"{command.line}: {answer}", _since(started)
            )
        lingering = frozenset(
            c.server
            for c, o, _ in results
            if o is Outcome.BUSY and c.op is Op.DEL_SERVER and c.server is not None
        )
        assert self._running is not None  # a runtime plan needs a running worker
        self._running = step.running(snapshot, self._running.map_dir, lingering)
        return ApplyResult(step, False, len(results), lingering, None, _since(started))

    def spares_left(self) -> int | None:
        """Spare backends the running worker still has for new TLS routes (None: not
        started). When none is left, the next new hostname costs a reload."""
        with self._lock:
            return None if self._running is None else len(self._running.spares)

    def refill_spares(self) -> bool:
        """Reload with the snapshot being served, which renders every route in its own
        backend and the spares empty again. Meant for idle moments, so a later new
        hostname takes the fast runtime path; True when a reload happened."""
        with self._lock:
            if self._running is None:
                return False
            self._reload(self._running.snapshot)
            return True

    def unbindable(self, snapshot: EdgeSnapshot) -> tuple[tuple[str, int, str], ...]:
        """(address, port, reason) of each listener of ``snapshot`` that the running
        worker does not serve yet and that cannot be bound now. The controller can leave
        those routes out (and report them) instead of blocking every other change."""
        have = set()
        if self._running is not None:
            have = set(haproxy_config.listeners(self._running.snapshot))
        out = []
        for fe, listener in haproxy_config.listeners(snapshot).items():
            if fe not in have:
                reason = _bind_test(listener.address, listener.port)
                if reason:
                    out.append((listener.address, listener.port, reason))
        return tuple(out)

    def _reload(self, snapshot: EdgeSnapshot) -> None:
        if self.options.preflight_binds and (bad := self.unbindable(snapshot)):
            raise ListenerUnavailable(
                "cannot listen on "
                + ", ".join(f"{a} port {p} ({why})" for a, p, why in bad)
                + "; nothing was changed",
                detail={"listeners": [{"address": a, "port": p, "error": w} for a, p, w in bad]},
                hint="free the port, or configure the address on this host; the edge keeps"
                " serving the previous snapshot",
            )
        previous = self.config_file.read_bytes() if self.config_file.exists() else None
        map_dir = self._write_generation(snapshot)
        before = self.master.show_proc()
        self.master.reload()
        deadline = time.monotonic() + self.options.reload_timeout_s
        after = self._wait_reloaded(before, deadline)
        if after.failed_reloads > before.failed_reloads:
            if previous is not None:
                _atomic_write(self.config_file, previous)
            raise ReloadFailed(
                "haproxy refused the new configuration; the previous one keeps serving",
                detail={"log": self._log_tail(), "generation": self._generation},
            )
        self._wait_worker(after, deadline)
        self._running = Running.loaded(snapshot, map_dir, self.options.spare_backends)

    def _wait_reloaded(self, before: ProcInfo, deadline: float) -> ProcInfo:
        while True:
            try:
                info = self.master.show_proc()
                if info.reloads > before.reloads:
                    return info
            except HAProxyUnavailable:
                pass  # the master re-executes itself and answers again shortly
            if time.monotonic() > deadline:
                raise ReloadFailed("the haproxy master did not come back from the reload")
            time.sleep(0.005)

    def _wait_worker(self, info: ProcInfo, deadline: float) -> None:
        """Until the runtime socket is served by a current worker (not an old one)."""
        while True:
            with contextlib.suppress(HAProxyUnavailable, ValueError):
                if int(self.runtime.show_info().get("Pid", "0")) in info.workers:
                    return
            if time.monotonic() > deadline:
                raise ReloadFailed("the new haproxy worker did not answer after the reload")
            time.sleep(0.005)
            with contextlib.suppress(HAProxyUnavailable):
                info = self.master.show_proc()

    # -- generations ------------------------------------------------------------------------

    def _generations(self) -> Iterator[tuple[int, Path]]:
        gen = self.root / "gen"
        if gen.is_dir():
            for p in gen.iterdir():
                if p.name.isdigit():
                    yield int(p.name), p

    def _last_generation(self) -> int:
        return max((n for n, _ in self._generations()), default=0)

    def _write_generation(self, snapshot: EdgeSnapshot) -> str:
        """Render ``snapshot`` into a new generation, check it, promote it to
        ``haproxy.cfg``; returns its map directory."""
        self._generation += 1
        gen_dir = self.root / "gen" / str(self._generation)
        map_dir = gen_dir / "maps"
        map_dir.mkdir(parents=True, exist_ok=True)
        for name, content in haproxy_config.render_maps(snapshot).items():
            (map_dir / name).write_text(content)
        text = haproxy_config.render(
            snapshot,
            runtime_socket=str(self.runtime_socket),
            map_dir=str(map_dir),
            nbthread=self.options.nbthread,
            maxconn=self.options.maxconn,
            hard_stop_after_ms=self.options.hard_stop_after_ms,
            spare_backends=self.options.spare_backends,
        )
        candidate = gen_dir / "haproxy.cfg"
        candidate.write_text(text)
        self._check_config(candidate)
        _atomic_write(self.config_file, text.encode())
        self._prune_generations()
        return str(map_dir)

    def _check_config(self, path: Path) -> None:
        try:
            proc = subprocess.run(
                [self.options.binary, "-c", "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=self.options.check_timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigRejected(f"haproxy -c could not run: {exc}") from exc
        if proc.returncode != 0:
            path.rename(path.with_name("haproxy.cfg.rejected"))
            raise ConfigRejected(
                "haproxy -c refused the rendered configuration; the last good one keeps serving",
                detail={"output": (proc.stdout + proc.stderr)[-4000:], "config": str(path)},
                hint="a renderer bug: report it with the rejected config",
            )

    def _prune_generations(self) -> None:
        keep = max(1, self.options.keep_generations)
        for n, path in sorted(self._generations()):
            if n <= self._generation - keep:
                shutil.rmtree(path, ignore_errors=True)

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def _bind_test(address: str, port: int) -> str | None:
    """Why HAProxy could not bind ``address:port`` (it sets SO_REUSEADDR/SO_REUSEPORT and
    v6only like this), or None."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped by its parent) still "exists" for kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _since(t0: float) -> float:
    return time.monotonic() - t0
