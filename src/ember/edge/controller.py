"""``ember server edge``: list + watch the control plane's edge snapshot and keep the
local HAProxy serving it.

The loop: list the snapshot (``GET /v1/edge/snapshot``), start or adopt HAProxy with it,
then long-poll for the next change (``?after=<cursor>&wait=…``) and apply each new
snapshot (runtime API when possible, a seamless reload otherwise: ember.edge.haproxy).
A snapshot that only moved the cursor changes nothing. Listeners that cannot be bound on
this node (an address it does not have, a port another process holds) are left out and
logged rather than blocking every other route. When the control plane is unreachable the
edge keeps serving the last snapshot it applied and retries with backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ember.core.edge import EdgeSnapshot
from ember.core.errors import EmberError
from ember.edge.haproxy import ApplyResult, HAProxy

log = logging.getLogger("ember.edge")


SnapshotSource = Callable[[str | None, float], EdgeSnapshot]
"""``(after cursor or None, wait seconds) -> snapshot``: the list (after=None) and watch."""


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.applies = Counter("ember_edge_applies", "snapshots applied", ["how"], registry=r)
        self.apply_seconds = Histogram("ember_edge_apply_seconds", "one apply", registry=r)
        self.routes = Gauge("ember_edge_routes", "routes served", registry=r)
        self.skipped = Gauge("ember_edge_unbindable_listeners", "listeners left out", registry=r)
        self.errors = Counter("ember_edge_errors", "failed polls or applies", registry=r)


def servable(haproxy: HAProxy, snapshot: EdgeSnapshot) -> EdgeSnapshot:
    """``snapshot`` without the listeners this node cannot bind (logged)."""
    bad = {(address, port): why for address, port, why in haproxy.unbindable(snapshot)}
    for (address, port), why in sorted(bad.items()):
        log.warning(
            "edge: cannot bind %s:%d (%s); its routes are not served here", address, port, why
        )
    if not bad:
        return snapshot
    keep = tuple(r for r in snapshot.routes if (r.address, r.port) not in bad)
    return dataclasses.replace(snapshot, routes=keep)


@dataclasses.dataclass
class EdgeController:
    source: SnapshotSource
    haproxy: HAProxy
    metrics: EdgeMetrics = dataclasses.field(default_factory=EdgeMetrics)
    wait_s: float = 25.0
    backoff_max_s: float = 10.0
    serving: EdgeSnapshot | None = None
    on_apply: Callable[[EdgeSnapshot, ApplyResult], None] | None = None

    def _apply(self, snapshot: EdgeSnapshot, *, first: bool) -> None:
        wanted = servable(self.haproxy, snapshot)
        if (
            self.serving is not None
            and wanted.routes == self.serving.routes
            and wanted.settings == self.serving.settings
        ):
            self.serving = wanted
            self._refill_when_idle()
            return
        with self.metrics.apply_seconds.time():
            result = self.haproxy.start(wanted) if first else self.haproxy.apply(wanted)
        self.metrics.applies.labels("reload" if result.reloaded else "runtime").inc()
        self.metrics.routes.set(len(wanted.routes))
        self.metrics.skipped.set(len(snapshot.routes) - len(wanted.routes))
        self.serving = wanted
        if self.on_apply is not None:
            self.on_apply(wanted, result)

    def _refill_when_idle(self) -> None:
        """Nothing changed: a good moment to refill the spare backends new hostnames
        use, once a quarter of them is left (a reload, off any route's critical path)."""
        left = self.haproxy.spares_left()
        if left is not None and left < max(1, self.haproxy.options.spare_backends // 4):
            self.haproxy.refill_spares()
            self.metrics.applies.labels("refill").inc()

    def start(self) -> None:
        """The first list and HAProxy start (raises when the control plane is down)."""
        self._apply(self.source(None, 0.0), first=True)

    def step(self) -> None:
        """Wait for the next change (at most ``wait_s``) and apply it."""
        assert self.serving is not None, "start() first"
        snapshot = self.source(self.serving.cursor, self.wait_s)
        self._apply(snapshot, first=False)
        self.haproxy.retry_lingering()

    def run(self, stop: Callable[[], bool]) -> None:
        backoff = 0.2
        while not stop():
            try:
                if self.serving is None:
                    self.start()
                else:
                    self.step()
                backoff = 0.2
            except EmberError as exc:
                self.metrics.errors.inc()
                log.warning("edge: %s (retrying in %.1fs)", exc.message, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
