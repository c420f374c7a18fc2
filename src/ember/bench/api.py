"""`make bench-api`: control-plane API latency and throughput over real HTTP.

One uvicorn worker serves the API (a subprocess, as in production) on a throwaway
cluster with default durability; this script generates the load with keep-alive httpx
clients in threads, all at the same concurrency. Three phases run interleaved in every
round, so a noisy machine moves them together:

- static:     GET /healthz (no auth, no database): the server's ceiling on this machine
- get_app:    GET /v1/orgs/{org}/apps/{app} (token lookup, membership, one app read)
- create_app: POST /v1/orgs/{org}/apps with a new name (an event append, then the
              tenancy view folds it before the answer: read-your-writes)

Figures are medians over rounds; get_app throughput is also given as a ratio to the
static one. Raw per-round samples are in ``config``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ember.bench.common import bench_cluster, median, percentile, run_and_report

CONCURRENCY = 8


def serve(port: int) -> None:
    """The server process: one uvicorn worker, as `ember server api` runs it."""
    import uvicorn

    from ember.api.app import ApiSettings, create_app

    app = create_app(ApiSettings(os.environ["EMBER_DATABASE_URL"]))
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, access_log=False, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(conninfo: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "EMBER_DATABASE_URL": conninfo}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.bench.api", "--serve", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not become ready in 30 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mint_token(conninfo: str) -> str:
    """The first token comes from the service itself (the API needs one to be called)."""
    from ember.api.service import Tenancy
    from ember.core.catalog import REGISTRY
    from ember.core.tenancy import Capability, Scope
    from ember.store.db import Database
    from ember.store.eventlog import EventLog
    from ember.store.projections import ProjectionRunner
    from ember.store.views import all_projections

    with Database(conninfo, max_size=2) as db:
        svc = Tenancy(db, EventLog(db, REGISTRY), ProjectionRunner(db, REGISTRY, all_projections()))
        user = svc.ensure_user("bench@example.com", "bench")
        secret, _ = svc.issue_token(
            user["user_id"], "bench", scope=Scope(), capabilities=frozenset(Capability)
        )
    return secret


def load(
    base: str,
    headers: dict[str, str],
    seconds: float,
    request: Callable[[httpx.Client, int, int], httpx.Response],
    expect: int,
) -> tuple[float, list[float]]:
    """``CONCURRENCY`` threads, each with its own keep-alive client, calling ``request``
    until the deadline; return requests/s and every latency in ms."""
    latencies: list[list[float]] = [[] for _ in range(CONCURRENCY)]
    errors: list[str] = []
    barrier = threading.Barrier(CONCURRENCY + 1)
    deadline = [0.0]

    def worker(w: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            request(client, w, -1)  # connect before the clock starts
            barrier.wait()
            for i in itertools.count():
                if time.monotonic() >= deadline[0]:
                    return
                t0 = time.perf_counter()
                r = request(client, w, i)
                latencies[w].append((time.perf_counter() - t0) * 1000)
                if r.status_code != expect:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(CONCURRENCY)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + 3600
    barrier.wait()
    start = time.monotonic()
    deadline[0] = start + seconds
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(f"unexpected answer during the benchmark: {errors[0]}")
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, flat


def run(quick: bool) -> dict[str, Any]:
    rounds, seconds = (3, 2.5) if quick else (5, 5.0)
    samples: dict[str, list[float]] = {
        "static_rps": [],
        "get_app_rps": [],
        "create_app_rps": [],
        "create_app_p50_ms": [],
        "create_app_p99_ms": [],
        "get_app_p50_ms": [],
    }
    create_latencies: list[list[float]] = []
    with bench_cluster() as cluster, api_server(cluster.conninfo()) as base:
        auth = {"Authorization": f"Bearer {mint_token(cluster.conninfo())}"}
        with httpx.Client(base_url=base, headers=auth) as c:
            assert c.post("/v1/orgs", json={"name": "bench"}).status_code == 201
            assert c.post("/v1/orgs/bench/apps", json={"name": "web"}).status_code == 201
        serial = itertools.count()

        def static(client: httpx.Client, _w: int, _i: int) -> httpx.Response:
            return client.get("/healthz")

        def get_app(client: httpx.Client, _w: int, _i: int) -> httpx.Response:
            return client.get("/v1/orgs/bench/apps/web")

        def create_app(client: httpx.Client, _w: int, i: int) -> httpx.Response:
            if i < 0:  # the warm-up call of a worker: an existing app (200)
                return client.post("/v1/orgs/bench/apps", json={"name": "web"})
            return client.post("/v1/orgs/bench/apps", json={"name": f"a{next(serial)}"})

        # Warm up every path once (imports, pools, plan caches) before measuring.
        load(base, auth, 0.5, static, 200)
        load(base, auth, 0.5, get_app, 200)
        for _ in range(rounds):
            rps, _lat = load(base, {}, seconds, static, 200)
            samples["static_rps"].append(round(rps, 1))
            rps, lat = load(base, auth, seconds, get_app, 200)
            samples["get_app_rps"].append(round(rps, 1))
            samples["get_app_p50_ms"].append(round(median(lat), 2))
            rps, lat = load(base, auth, seconds, create_app, 201)
            samples["create_app_rps"].append(round(rps, 1))
            samples["create_app_p50_ms"].append(round(median(lat), 2))
            samples["create_app_p99_ms"].append(round(percentile(lat, 99), 2))
            create_latencies.append([round(x, 2) for x in lat])
    static_rps, get_rps = median(samples["static_rps"]), median(samples["get_app_rps"])
    return {
        "create_app_p50_ms": round(median(samples["create_app_p50_ms"]), 2),
        "create_app_p99_ms": round(median(samples["create_app_p99_ms"]), 2),
        "create_app_rps": round(median(samples["create_app_rps"]), 1),
        "get_app_rps": round(get_rps, 1),
        "get_app_p50_ms": round(median(samples["get_app_p50_ms"]), 2),
        "static_rps": round(static_rps, 1),
        "rps_ratio_vs_static": round(get_rps / static_rps, 3),
        "config": {
            "server": "1 uvicorn worker (subprocess), pool_size 10",
            "client": f"{CONCURRENCY} threads in this script (same machine), one keep-alive "
            "httpx client each",
            "concurrency": CONCURRENCY,
            "rounds": rounds,
            "seconds_per_phase": seconds,
            "order_per_round": ["static", "get_app", "create_app"],
            "durability": "fsync=on, synchronous_commit=on (PostgreSQL defaults)",
            "samples": samples,
            "create_app_latencies_ms": create_latencies,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/api.json"))
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    run_and_report(
        "api",
        run,
        quick=args.quick,
        out=args.out,
        summary=(
            "create_app_p50_ms",
            "create_app_p99_ms",
            "create_app_rps",
            "get_app_rps",
            "static_rps",
            "rps_ratio_vs_static",
            "wall_seconds",
        ),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
