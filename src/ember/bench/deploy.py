"""`make bench-deploy`: ``ember deploy`` of an already-pushed image to the first page
served through the edge, against the same VM booted by a plain script in the same run;
and a rolling deploy under load, counting the requests it fails.

The stack is the one a user runs: ``ember dev up`` (PostgreSQL, registry, API,
controller, edge, host agent running QEMU microVMs) in a temporary ``EMBER_HOME`` with its
own ports, inside a private network namespace made for the run
(``ember-bench-deploy-PID``). The agent's firewall replaces table ``inet ember`` as a
whole and taps and routes are host-wide: in the host's namespace the benchmark would
rewrite the policy of any agent or test on the machine, and the bare boots below remove
that table. ``ember dev down`` stops the stack at the end (its VMs, taps and table too),
then the namespace and the temporary directory go, also when the run fails.

The guest is the sample app ``examples/hello-http`` (busybox httpd on :8080, 1 vCPU,
256 MB) built by :func:`ember.dev.examples.build`, on the platform kernel and initramfs of
``guest/build``. Everything lives in one app, ``bench``: its first deploy (the rollout
environment's, below) pushes the image to the stack's registry as ``local/bench``, so
every measured deploy pushes nothing but ``HEAD`` requests, and the agent's image store
holds the image's root filesystem from then on (warm).

* ``deploy_to_serving_s`` (5 samples, 2 with ``--quick``; the median): per sample a fresh
  environment of ``bench`` with a TCP route (``--port auto``, process ``web``, backend
  port 8080), created before the clock starts (the edge listens on the port by then).
  Clock: ``ember deploy --image LAYOUT --detach`` is launched → the first ``200`` with the
  sample's page through the edge port on 127.0.0.1, fetched every 20 ms from the launch
  on. ``--detach`` returns once the release is promoted; waiting for the rollout instead
  would only add the CLI's polling to a clock that stops at the first served page anyway
  (``deploy_cli_returned_s`` says when it returned). Then the environment is scaled to 0
  and the bench waits until the agent has removed the VM and its tap.
  ``deploy_phases_s`` says where the time went, in seconds after the launch (medians):
  the CLI returned, and the stack's event log recorded the release promoted, the
  instance created by the controller, placed by the scheduler, reported starting and
  healthy by the agent; the page was served.
* ``bare_boot_to_serving_s``: :class:`ember.bench.boot.BareBoots` (``bench/bare-boot.sh``:
  QEMU with the qemu driver's own command line) on the same kernel, initramfs, a copy of
  the same root filesystem and the same instance spec, prepared before the clock. Clock:
  the script is launched → the page is fetched over the tap.
* ``deploy_overhead_ratio`` = deploy / bare (medians; goal <= 1.5). Rounds alternate
  which of the two goes first.
* ``rollout_failed_requests`` (goal 0): environment ``rollout`` at 3 instances (2 with
  ``--quick``) of a manifest that serves its ``VERSION``
  (:func:`ember.dev.examples.versioned_hello_http_manifest`: rolling, max surge 1, max
  unavailable 0) behind a TCP route. A client thread requests ``/version`` through the
  edge back to back (a new connection each) while ``ember deploy`` of ``VERSION=2`` runs
  to completion (it waits for the rollout), and on until every instance is of v2 and the
  edge has served v2. A failed request: a connection error or timeout, a status other than
  200, or a body that is neither ``v1`` nor ``v2``. ``rollout_requests`` is how many were
  sent.

Every tap's IPv6 neighbour discovery retransmits every 10 ms instead of every second, for
both kinds of boot (as in ``make bench-boot``): a fetch sent before the guest's network is
up is otherwise retried only a second later, which would quantise both figures.

Needs root (a network namespace, taps, nftables, cgroups).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ember.bench.boot import (
    GUEST_DIR,
    PAGE,
    SAMPLE,
    SAMPLE_DIR,
    BareBoots,
    BenchFailed,
    build_sample,
    cleanup,
    ensure_guest,
    fast_retries_on_taps,
    fetch,
    prepare_sample,
    private_netns,
    ratio,
    stats,
)
from ember.bench.common import median, run_and_report
from ember.client import Client
from ember.core.errors import EmberError
from ember.dev.examples import versioned_hello_http_manifest
from ember.wire.workloads import Status, StatusInstance

EMBER = str(Path(sys.executable).parent / "ember")
APP = "bench"
PROCESS = "web"
BACKEND_PORT = 8080
HOST_ID = "bench-deploy"
ROLLOUT_ENV = "rollout"
GOAL_RATIO = 1.5
SAMPLES, QUICK_SAMPLES = 5, 2
ROLLOUT_INSTANCES, QUICK_ROLLOUT_INSTANCES = 3, 2
SERVE_TIMEOUT_S = 240.0
STEP_TIMEOUT_S = 240.0
RETRY_S = 0.02
"""How often the deploy samples try the edge port."""
REQUEST_TIMEOUT_S = 5.0
"""A rollout request that takes longer has failed."""
REQUEST_PAUSE_S = 0.01
"""Between two requests of the rollout client: back to back, but leaving the 2 cores a
breath for the VMs being rolled."""
VERSIONS = (b"v1\n", b"v2\n")
TERMINAL = frozenset({"stopped", "failed", "lost"})


T = TypeVar("T")

__all__ = [
    "GOAL_RATIO",
    "BenchFailed",
    "Outcome",
    "Samples",
    "deploy_phases",
    "report",
    "run",
    "sample_manifest",
    "stack_env",
    "tally",
]


# -- pure: manifests, the stack's environment, the figures ----------------------------------


def sample_manifest(text: str, app: str) -> str:
    """The sample's ``ember.toml`` (``text``) as the manifest of ``app``: only its app
    name changes, so the VM is the one bench-boot's bare boots run."""
    out, n = re.subn(r'(?m)^app = "[^"\n]*"$', f'app = "{app}"', text)
    if n != 1:
        raise BenchFailed(f"the sample's ember.toml has {n} 'app = ...' lines, expected 1")
    return out


def stack_env(
    base: Mapping[str, str], home: Path, *, api_port: int, registry_port: int
) -> dict[str, str]:
    """The environment of every ``ember`` command of the bench's stack: its own home, CLI
    config and ports, the host agent on; nothing of the caller's ``EMBER_*`` settings
    (they would point the commands at another stack)."""
    return {
        **{k: v for k, v in base.items() if not k.startswith("EMBER_")},
        "EMBER_HOME": str(home),
        "EMBER_CONFIG": str(home / "cli.toml"),
        "EMBER_API_PORT": str(api_port),
        "EMBER_REGISTRY_PORT": str(registry_port),
        "EMBER_DEV_AGENT": "1",
    }


PHASE_EVENTS = {
    "release.promoted": "release_promoted",
    "instance.created": "instance_created",
    "instance.assigned": "instance_assigned",
    "instance.starting": "starting_reported",
    "instance.healthy": "healthy_reported",
}
"""The events of a deploy, by the phase each marks: the API promoted the release, the
controller created the instance, the scheduler placed it, the agent reported it starting
and then healthy."""


def deploy_phases(
    launched_wall: float,
    events: Iterable[tuple[str, dt.datetime]],
    *,
    cli_returned: float | None,
    served: float,
) -> dict[str, float]:
    """Seconds after ``ember deploy`` was launched (``launched_wall``, epoch seconds) at
    which each phase of :data:`PHASE_EVENTS` was recorded (the first event of its type
    in ``events``: ``(type, recorded_at)`` of the env's releases, the instance and its
    placement), the CLI returned and the page was served (both already relative), in
    that order of time."""
    out = {"served_through_edge": served}
    if cli_returned is not None:
        out["cli_returned"] = cli_returned
    for event_type, recorded_at in sorted(events, key=lambda e: e[1]):
        name = PHASE_EVENTS.get(event_type)
        if name is not None and name not in out:
            out[name] = recorded_at.timestamp() - launched_wall
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: kv[1])}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request of the rollout client: the HTTP status and body, or the error."""

    status: int | None
    body: bytes = b""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body in VERSIONS


def tally(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """How many requests were sent and failed, which versions answered (in order of first
    appearance, with their counts), and the first few failures."""
    failures = [o for o in outcomes if not o.ok]
    versions = collections.Counter(
        o.body.decode("utf-8", "replace").strip() for o in outcomes if o.ok
    )
    return {
        "requests": len(outcomes),
        "failed": len(failures),
        "versions": dict(versions),
        "last_version": outcomes[-1].body.decode("utf-8", "replace").strip()
        if outcomes and outcomes[-1].ok
        else None,
        "first_failures": [
            o.error or f"HTTP {o.status}: {o.body[:80].decode('utf-8', 'replace')!r}"
            for o in failures[:5]
        ],
    }


@dataclasses.dataclass
class Samples:
    """What the rounds measured (seconds)."""

    deploy: list[float] = dataclasses.field(default_factory=list)
    bare: list[float] = dataclasses.field(default_factory=list)
    cli_returned: list[float] = dataclasses.field(default_factory=list)
    phases: list[dict[str, float]] = dataclasses.field(default_factory=list)
    first: list[str] = dataclasses.field(default_factory=list)
    """Which went first in each round."""
    rollout: dict[str, Any] = dataclasses.field(default_factory=dict)
    """:func:`tally` of the rollout's requests, plus ``instances`` and ``seconds``."""


def report(samples: Samples, config: Mapping[str, Any]) -> dict[str, Any]:
    """The result file's body (without what :func:`ember.bench.common.write_result` adds)."""
    deploy, bare = median(samples.deploy), median(samples.bare)
    overhead = ratio(deploy, bare)
    rollout = samples.rollout
    phase_names = sorted({k for p in samples.phases for k in p})
    phases = {
        name: round(median([p[name] for p in samples.phases if name in p]), 3)
        for name in phase_names
    }
    result: dict[str, Any] = {
        "deploy_to_serving_s": round(deploy, 3),
        "bare_boot_to_serving_s": round(bare, 3),
        "deploy_overhead_ratio": overhead,
        "deploy_overhead_s": round(deploy - bare, 3),
        "goal_deploy_overhead_ratio": GOAL_RATIO,
        "deploy_cli_returned_s": round(median(samples.cli_returned), 3),
        "deploy_phases_s": dict(sorted(phases.items(), key=lambda kv: kv[1])),
        "rollout_failed_requests": rollout.get("failed"),
        "rollout_requests": rollout.get("requests"),
        "rollout_instances": rollout.get("instances"),
        "rollout_seconds": rollout.get("seconds"),
        "rollout_versions_served": rollout.get("versions"),
        "runs": len(samples.deploy),
        "stats_s": {"deploy": stats(samples.deploy), "bare": stats(samples.bare)},
        "config": {
            **config,
            "samples": {
                "deploy_s": [round(x, 3) for x in samples.deploy],
                "bare_s": [round(x, 3) for x in samples.bare],
                "ratios_per_round": [
                    ratio(d, b) for d, b in zip(samples.deploy, samples.bare, strict=True)
                ],
                "first_per_round": samples.first,
                "deploy_phases_s": samples.phases,
                "rollout_first_failures": rollout.get("first_failures", []),
            },
        },
    }
    result["goals"] = {
        f"deploy_overhead_ratio<={GOAL_RATIO}": overhead is not None and overhead <= GOAL_RATIO,
        "rollout_failed_requests==0": rollout.get("failed") == 0
        and (rollout.get("requests") or 0) > 0,
        "rollout_served_v1_then_v2": set(rollout.get("versions") or {}) == {"v1", "v2"}
        and rollout.get("last_version") == "v2",
        "every_round_measured_both": len(samples.deploy) == len(samples.bare) > 0,
    }
    return result


# -- waiting -----------------------------------------------------------------------------------


def poll_until(
    what: str,
    cond: Callable[[], T | None],
    timeout_s: float = STEP_TIMEOUT_S,
    *,
    interval_s: float = 0.2,
    describe: Callable[[], object] | None = None,
) -> T:
    """``cond()`` until it is truthy (returned); :class:`BenchFailed` naming ``what`` (and
    ``describe()``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f": {describe()}" if describe is not None else ""
            raise BenchFailed(f"timed out after {timeout_s:.0f} s waiting for {what}{more}")
        time.sleep(interval_s)


def listening(port: int) -> bool:
    """The edge accepts connections on 127.0.0.1:``port`` (its listener exists)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def request(port: int, path: str) -> Outcome:
    """``GET path`` through the edge on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return Outcome(response.status, response.read())
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(None, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the stack ---------------------------------------------------------------------------------


class DevStack:
    """``ember dev up`` in ``home`` (call it inside the private namespace), driven by the
    ``ember`` CLI for what the benchmark measures and by the typed client for the
    bookkeeping around it (one process start less per step on 2 busy cores)."""

    def __init__(self, home: Path) -> None:
        from ember.dev import registry
        from ember.dev.commands import SERVICES

        self.home = home
        self.env = stack_env(os.environ, home, api_port=free_port(), registry_port=free_port())
        self.services = SERVICES
        self.markers = {registry.NAME: registry.marker(home / "registry")}
        self.api_url = self.registry_url = self.org = self.token = ""
        self.agent = ""
        self.instance_ids: set[str] = set()
        self._db: Any = None
        """:class:`ember.store.db.Database` of the stack, once :meth:`phase_events` ran."""

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [EMBER, *args],
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ember(self, *args: str, timeout_s: float = STEP_TIMEOUT_S) -> str:
        """``ember ARGS``; its stdout. :class:`BenchFailed` with its stderr unless it
        exits 0."""
        proc = self.popen(*args)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise BenchFailed(f"'ember {' '.join(args)}' took over {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            raise BenchFailed(
                f"'ember {' '.join(args)}' exited {proc.returncode}: {err.strip()[-1500:]}"
            )
        return out

    def up(self) -> None:
        from ember.cli.config import load_file

        self.home.mkdir(parents=True, exist_ok=True)
        info = json.loads(self.ember("dev", "up", "--host-id", HOST_ID, "--json"))
        self.agent = str(info["agent"])
        if not self.agent.startswith(("started", "running")):
            raise BenchFailed(f"ember dev up started no host agent: {self.agent}")
        self.api_url, self.registry_url = info["api_url"], info["registry_url"]
        config = load_file(Path(self.env["EMBER_CONFIG"]))
        if not (config.token and config.org):
            raise BenchFailed(f"ember dev up left no token or org in {self.env['EMBER_CONFIG']}")
        self.token, self.org = config.token, config.org

    def down(self) -> None:
        """``ember dev down`` (stops the VMs, taps and table too); then SIGKILL for any
        service of the stack still running (a failed ``down``)."""
        from ember.dev.processes import Supervisor

        if self._db is not None:
            self._db.close()
            self._db = None
        with contextlib.suppress(subprocess.SubprocessError, OSError, BenchFailed):
            self.ember("dev", "down", "--json", timeout_s=120)
        sup = Supervisor(self.home, markers=self.markers)
        for name in self.services:
            if (pid := sup.pid(name)) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def client(self) -> Client:
        """The typed API client, as the local admin."""
        return Client(self.api_url, self.token, timeout=30)

    def phase_events(
        self, app_id: str, env: str, instance_id: str
    ) -> list[tuple[str, dt.datetime]]:
        """``(type, recorded_at)`` of the events of a deploy to a fresh ``env``: its
        releases, the instance's creation (workload stream), placement (host stream) and
        reports (its own stream), read from the stack's event log off the clock."""
        from ember.core.catalog import REGISTRY
        from ember.core.hosts import host_stream
        from ember.core.instances import instance_stream
        from ember.core.releases import releases_stream
        from ember.core.workloads import workload_stream
        from ember.dev.postgres import LocalCluster
        from ember.store.db import Database
        from ember.store.eventlog import EventLog

        if self._db is None:
            self._db = Database(LocalCluster(self.home / "postgres").conninfo())
        log = EventLog(self._db, REGISTRY)
        events = [
            *log.read_stream_all(releases_stream(app_id, env)),
            *log.read_stream_all(instance_stream(instance_id)),
            *(
                e
                for stream in (workload_stream(app_id, env), host_stream(HOST_ID))
                for e in log.read_stream_all(stream)
                if e.data.get("instance_id") == instance_id
            ),
        ]
        return [(e.type, e.recorded_at) for e in events]

    def agent_log(self) -> str:
        from ember.bench.boot_agent import tail

        return tail(self.home / "logs" / "agent.log", 3000)


class Env:
    """One environment of :data:`APP` on the stack."""

    def __init__(self, stack: DevStack, api: Client, name: str, projects: Path) -> None:
        self.stack, self.api, self.name = stack, api, name
        self.manifest = projects / name / "ember.toml"
        self.manifest.parent.mkdir(parents=True)
        api.create_env(stack.org, APP, name)
        self.app_id = api.get_app(stack.org, APP).id

    def status(self) -> Status:
        status = self.api.status(self.stack.org, APP, self.name)
        self.stack.instance_ids.update(i.instance_id for i in status.instances)
        return status

    def describe(self) -> str:
        status = self.status()
        rows = [
            f"{i.instance_id} {i.state} v{i.release_version} {i.reason}" for i in status.instances
        ]
        return f"{self.name}: {'; '.join(rows) or 'no instances'}; problems: {status.problems}"

    def live(self) -> list[StatusInstance]:
        return [i for i in self.status().instances if i.state not in TERMINAL]

    def deploy_argv(self, layout: Path, *extra: str) -> list[str]:
        return [
            *("deploy", "--image", str(layout), "--manifest", str(self.manifest)),
            *("--app", APP, "--env", self.name, "--json", *extra),
        ]

    def route(self) -> int:
        """A TCP route to ``web``:8080 on an edge port of the pool; once the edge listens."""
        route = self.api.create_route(
            self.stack.org,
            APP,
            self.name,
            kind="tcp",
            port="auto",
            process=PROCESS,
            backend_port=BACKEND_PORT,
        ).item
        port = int(route.port)
        poll_until(f"the edge to listen on :{port}", lambda: listening(port), 60, interval_s=0.05)
        return port

    def scale(self, count: int) -> None:
        self.api.scale(self.stack.org, APP, self.name, {PROCESS: {"count": count}})

    def healthy(self, count: int, version: int) -> list[StatusInstance]:
        """Wait until exactly ``count`` instances live, all healthy and of release
        ``version``."""

        def ready() -> list[StatusInstance] | None:
            live = self.live()
            good = [i for i in live if i.state == "healthy" and i.release_version == version]
            return good if len(good) == count == len(live) else None

        return poll_until(
            f"{self.name}: {count} healthy of v{version}", ready, describe=self.describe
        )

    def scale_to_zero(self) -> None:
        """Scale to 0 and wait until the agent has removed every VM and tap: nothing of
        this environment loads the machine or changes the firewall afterwards."""
        from ember.agent.net.taps import TapNetwork

        self.scale(0)
        poll_until(f"{self.name} to stop", lambda: not self.live(), describe=self.describe)
        taps = TapNetwork()
        poll_until(
            f"the agent to remove {self.name}'s taps",
            lambda: not taps.list_taps(),
            describe=lambda: [t.name for t in taps.list_taps()],
        )


# -- the measurements ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeploySample:
    seconds: float
    cli_returned: float | None
    phases: dict[str, float]


def deploy_sample(env: Env, layout: Path, page: bytes) -> DeploySample:
    """One fresh environment: route, ``ember deploy --detach`` → the page through the
    edge; then scaled to zero."""
    env.manifest.write_text(sample_manifest((SAMPLE_DIR / "ember.toml").read_text(), APP))
    port = env.route()
    launched_wall = time.time()
    launched = time.monotonic()
    proc = env.stack.popen(*env.deploy_argv(layout, "--detach"))
    cli_returned: float | None = None
    try:
        while True:
            if cli_returned is None and proc.poll() is not None:
                cli_returned = time.monotonic() - launched
                if proc.returncode != 0:
                    raise BenchFailed(
                        f"ember deploy exited {proc.returncode}: {proc.communicate()[1].strip()}"
                    )
            if fetch("127.0.0.1", port) == page:
                served = time.monotonic() - launched
                break
            if time.monotonic() - launched > SERVE_TIMEOUT_S:
                raise BenchFailed(
                    f"{env.name} was not served through the edge in {SERVE_TIMEOUT_S:.0f} s:"
                    f" {env.describe()}\nagent log: {env.stack.agent_log()}"
                )
            time.sleep(RETRY_S)
        _, err = proc.communicate(timeout=STEP_TIMEOUT_S)
        if proc.returncode != 0:
            raise BenchFailed(f"ember deploy exited {proc.returncode}: {err.strip()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    live = env.live()
    if len(live) != 1:
        raise BenchFailed(f"one instance was deployed, {len(live)} live: {env.describe()}")
    events = env.stack.phase_events(env.app_id, env.name, live[0].instance_id)
    phases = deploy_phases(launched_wall, events, cli_returned=cli_returned, served=served)
    env.scale_to_zero()
    return DeploySample(served, cli_returned, phases)


class RolloutClient:
    """A thread requesting ``/version`` through the edge back to back until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-deploy-client", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(request(self.port, "/version"))
            time.sleep(REQUEST_PAUSE_S)

    def __enter__(self) -> RolloutClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S * 2)

    def served(self, body: bytes) -> bool:
        return bool(self.outcomes) and self.outcomes[-1].body == body


def rollout(env: Env, layout: Path, instances: int) -> dict[str, Any]:
    """v1 at ``instances`` behind a TCP route (its deploy is the run's first: the push and
    the warm-up); then v2 rolled out while the client requests; the tally."""
    env.manifest.write_text(versioned_hello_http_manifest(APP, 1))
    env.scale(instances)  # before the first release: it starts them all at once
    port = env.route()
    env.stack.ember(*env.deploy_argv(layout, "--timeout", "5m"), timeout_s=600)
    env.healthy(instances, 1)
    poll_until("v1 through the edge", lambda: request(port, "/version").body == VERSIONS[0])

    env.manifest.write_text(versioned_hello_http_manifest(APP, 2))
    started = time.monotonic()
    with RolloutClient(port) as client:
        poll_until("the client's first answer", lambda: client.outcomes, 30, interval_s=0.01)
        # Without --detach: `ember deploy` returns when the rollout has completed.
        env.stack.ember(*env.deploy_argv(layout, "--timeout", "10m"), timeout_s=900)
        env.healthy(instances, 2)
        poll_until("v2 through the edge", lambda: client.served(VERSIONS[1]), 60, interval_s=0.05)
    seconds = time.monotonic() - started
    result = {**tally(client.outcomes), "instances": instances, "seconds": round(seconds, 1)}
    env.scale_to_zero()
    return result


# -- the run -----------------------------------------------------------------------------------


class Laps:
    """Where the run's wall-clock time went (seconds per named step)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def measure(
    samples: Samples, stack: DevStack, bare: BareBoots, layout: Path, root: Path, *, rounds: int
) -> None:
    """``rounds`` rounds of one deploy and one bare boot, alternating which goes first."""
    page = PAGE.read_bytes()
    with stack.client() as api:
        for n in range(rounds):
            deploy_first = n % 2 == 0
            started = time.monotonic()
            env = Env(stack, api, f"s{n}", root / "projects")
            if deploy_first:
                deployed = deploy_sample(env, layout, page)
            bare_s = bare.boot(f"bare{os.getpid()}x{n}", page)
            if not deploy_first:
                deployed = deploy_sample(env, layout, page)
            print(
                f"round {n}: deploy {deployed.seconds:.3f} s, bare {bare_s:.3f} s"
                f" (the round took {time.monotonic() - started:.1f} s)",
                file=sys.stderr,
            )
            samples.deploy.append(deployed.seconds)
            samples.bare.append(bare_s)
            if deployed.cli_returned is not None:
                samples.cli_returned.append(deployed.cli_returned)
            samples.phases.append(deployed.phases)
            samples.first.append("deploy" if deploy_first else "bare")


def run(quick: bool) -> dict[str, Any]:
    from ember.agent.vmm.qemu import QemuConfig, QemuDriver

    rounds = QUICK_SAMPLES if quick else SAMPLES
    instances = QUICK_ROLLOUT_INSTANCES if quick else ROLLOUT_INSTANCES
    samples = Samples()
    laps = Laps()
    with contextlib.ExitStack() as stack:  # unwinds in reverse, also on failure
        root = Path(tempfile.mkdtemp(prefix="ember-bench-deploy-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        ensure_guest()
        layout = root / "layout"
        built = build_sample(layout)
        laps.lap("build")
        stack.enter_context(private_netns(f"ember-bench-deploy-{os.getpid()}"))
        dev = DevStack(root / "home")
        stack.callback(lambda: cleanup(root, sorted(dev.instance_ids)))
        stack.enter_context(fast_retries_on_taps())
        stack.callback(dev.down)
        dev.up()
        laps.lap("stack_up")
        with dev.client() as api:
            api.create_app(dev.org, APP)
            samples.rollout = rollout(
                Env(dev, api, ROLLOUT_ENV, root / "projects"), layout, instances
            )
        laps.lap("rollout")
        print(f"rollout: {samples.rollout}", file=sys.stderr)
        sample, _ = prepare_sample(dev.registry_url, layout, built, root / "bare", 0)
        # The agent's own verdict, cached in its state dir: the same acceleration.
        driver = QemuDriver(QemuConfig(state_dir=dev.home / "agent" / "qemu"))
        accel = driver.accel(GUEST_DIR / "vmlinux", GUEST_DIR / "initrd.gz")
        bare = BareBoots(root / "bare" / "vms", sample, accel)
        stack.callback(bare.kill)
        laps.lap("bare_prepare")
        measure(samples, dev, bare, layout, root, rounds=rounds)
        laps.lap("rounds")
    laps.lap("teardown")
    config = {
        "sample": SAMPLE,
        "image": {"digest": built, "rootfs_bytes": sample.image.size_bytes},
        "vm": {"vcpus": 1, "memory_mb": sample.spec.memory_mb},
        "accel": accel,
        "accel_note": driver.accel_note,
        "rounds": f"{rounds}, alternating which goes first",
        "stack": "ember dev up (PostgreSQL, registry, API, controller, edge, host agent) in a"
        " temporary EMBER_HOME, in a private network namespace",
        "clock": {
            "deploy": "'ember deploy --image LAYOUT --detach' launched (fresh environment,"
            " TCP route listening already) -> first 200 with the page through the edge",
            "bare": "bench/bare-boot.sh boot launched -> page fetched over the tap",
        },
        "notes": [
            "Every measured deploy is of an already-pushed image: the run's first deploy"
            " (the rollout environment's v1) pushed it to local/bench, so each measured"
            " 'ember deploy' pushes nothing but HEAD requests; the agent's image cache"
            " holds its root filesystem (warm) from then on.",
            "Fresh environments of one app rather than fresh apps: the registry repository"
            " is per app (local/APP), so a fresh app would upload every blob again.",
            "--detach: the clock stops at the first page served through the edge, not when"
            " the CLI returns; waiting would only add the CLI's rollout polling to the"
            " machine's load (deploy_cli_returned_s: when the detached CLI returned).",
            "Neighbour discovery retransmits every 10 ms on every tap (both kinds of boot).",
            "Rollout: rolling, max_surge 1, max_unavailable 0; a client requests /version"
            " through the edge back to back (new connection each) from before"
            " 'ember deploy' of VERSION=2 until every instance is v2 and v2 was served.",
        ],
        "wall_phases_s": laps.laps,
    }
    return report(samples, config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/deploy.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-deploy needs root (a network namespace, taps, nftables, cgroups)")
    result = run_and_report(
        "deploy",
        run,
        quick=args.quick,
        out=args.out,
        summary=(
            "deploy_to_serving_s",
            "bare_boot_to_serving_s",
            "deploy_overhead_ratio",
            "deploy_overhead_s",
            "deploy_cli_returned_s",
            "deploy_phases_s",
            "rollout_failed_requests",
            "rollout_requests",
            "rollout_seconds",
            "goals",
            "wall_seconds",
        ),
        errors=(BenchFailed, EmberError),
    )
    print(f"{'ratios_per_round':30} {result['config']['samples']['ratios_per_round']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
