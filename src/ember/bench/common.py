"""Shared plumbing for benchmarks: a throwaway cluster, medians, the result file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ember.dev.postgres import LocalCluster
from ember.store import migrations


@contextlib.contextmanager
def bench_cluster(*settings: str) -> Iterator[LocalCluster]:
    """A fresh cluster with default durability (fsync on): what production would run."""
    root = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    cluster = LocalCluster(root, durable=True, settings=settings)
    try:
        cluster.init()
        cluster.start()
        cluster.ensure_database()
        migrations.migrate(cluster.conninfo())
        yield cluster
    finally:
        cluster.destroy()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def write_result(path: Path, name: str, result: dict[str, Any], *, quick: bool) -> None:
    body = {
        "benchmark": name,
        "quick": quick,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def run_and_report(
    name: str,
    run: Callable[[bool], dict[str, Any]],
    *,
    quick: bool,
    out: Path,
    summary: Sequence[str],
    errors: tuple[type[BaseException], ...] = (),
) -> dict[str, Any]:
    """A benchmark's ``main`` after its arguments: run it (timed into ``wall_seconds``),
    write ``out``, print the ``summary`` keys. One of ``errors`` ends the process with
    its message (and hint), not a traceback."""
    started = time.monotonic()
    try:
        result = run(quick)
    except errors as exc:
        hint = getattr(exc, "hint", None)
        sys.exit(f"bench-{name} failed: {exc}" + (f"\n  hint: {hint}" if hint else ""))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_result(out, name, result, quick=quick)
    for key in summary:
        print(f"{key:30} {result.get(key)}")
    return result
