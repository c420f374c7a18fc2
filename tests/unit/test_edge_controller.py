"""EdgeController: what it asks HAProxy to do for each snapshot (a recording HAProxy)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from ember.core.edge import Backend, EdgeSnapshot, Route, RouteKind
from ember.edge.controller import EdgeController
from ember.edge.haproxy import HAProxy, HAProxyOptions


def route(rid: str, host: str, port: int = 443, address: str = "127.0.0.1") -> Route:
    return Route(
        route_id=rid,
        org_id="o",
        app_id="a",
        env="prod",
        process="web",
        kind=RouteKind.TLS,
        address=address,
        port=port,
        hostname=host,
        backend_port=8443,
        backends=(Backend("i1", "127.0.0.2", 8443),),
    )


@dataclasses.dataclass
class Recorder:
    options: HAProxyOptions = dataclasses.field(
        default_factory=lambda: HAProxyOptions(spare_backends=8)
    )
    calls: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    spares: int = 8
    bad: tuple[tuple[str, int, str], ...] = ()

    def start(self, s: EdgeSnapshot) -> Any:
        self.calls.append(("start", s))
        return dataclasses.make_dataclass("R", [("reloaded", bool)])(True)

    def apply(self, s: EdgeSnapshot) -> Any:
        self.calls.append(("apply", s))
        self.spares -= 1
        return dataclasses.make_dataclass("R", [("reloaded", bool)])(False)

    def unbindable(self, s: EdgeSnapshot) -> tuple[tuple[str, int, str], ...]:
        return self.bad

    def retry_lingering(self) -> None:
        return None

    def spares_left(self) -> int:
        return self.spares

    def refill_spares(self) -> bool:
        self.calls.append(("refill", None))
        self.spares = self.options.spare_backends
        return True


def controller(snapshots: list[EdgeSnapshot], rec: Recorder) -> EdgeController:
    feed = iter(snapshots)
    return EdgeController(lambda _after, _wait: next(feed), cast(HAProxy, rec))


def test_changes_are_applied_and_cursor_only_moves_are_not() -> None:
    rec = Recorder()
    one = EdgeSnapshot("1-1", (route("r1", "a.example.com"),))
    two = EdgeSnapshot("1-2", (route("r1", "a.example.com"), route("r2", "b.example.com")))
    same = dataclasses.replace(two, cursor="1-3")
    ctl = controller([one, two, same], rec)
    ctl.start()
    ctl.step()
    ctl.step()
    assert [c[0] for c in rec.calls] == ["start", "apply"]
    assert ctl.serving is not None and ctl.serving.cursor == "1-3"


def test_an_idle_edge_refills_its_spare_backends_when_few_are_left() -> None:
    rec = Recorder(spares=1)
    one = EdgeSnapshot("1-1", (route("r1", "a.example.com"),))
    ctl = controller([one, dataclasses.replace(one, cursor="1-2")], rec)
    ctl.start()
    ctl.step()  # nothing changed, 1 of 8 spares left: refill now
    assert [c[0] for c in rec.calls] == ["start", "refill"]
    assert rec.spares == 8


def test_listeners_this_node_cannot_bind_are_left_out() -> None:
    rec = Recorder(bad=(("192.0.2.1", 443, "address not on this host"),))
    snap = EdgeSnapshot(
        "1-1", (route("r1", "a.example.com"), route("r2", "b.example.com", address="192.0.2.1"))
    )
    ctl = controller([snap], rec)
    ctl.start()
    started = rec.calls[0][1]
    assert [r.route_id for r in started.routes] == ["r1"]
