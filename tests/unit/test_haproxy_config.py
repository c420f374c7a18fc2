"""The HAProxy configuration renderer (ember.edge.haproxy_config): golden files, validity
with the real ``haproxy -c``, determinism and the refusal of unrenderable snapshots.

``golden/edge/<case>.cfg`` and ``<case>.maps`` are what the cases below render. A reviewer
reads them to judge the configuration; after a deliberate change regenerate them with
``EMBER_UPDATE_GOLDEN=1 pytest tests/unit/test_haproxy_config.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.edge.errors import SnapshotInvalid
from ember.edge.haproxy_config import (
    backend_name,
    problems,
    render,
    render_maps,
    safe_name,
    without_invalid_routes,
)

GOLDEN = Path(__file__).parent / "golden" / "edge"
UPDATE = os.environ.get("EMBER_UPDATE_GOLDEN") == "1"
SOCKET = "/var/lib/ember/edge/run/admin.sock"
MAP_DIR = "/var/lib/ember/edge/gen/1/maps"


def tls(
    route_id: str,
    hostname: str,
    *backends: Backend,
    address: str = "0.0.0.0",
    port: int = 443,
    proxy_protocol: str | None = None,
    app: str = "a_shop",
) -> Route:
    return Route(
        route_id=route_id,
        org_id="o_acme",
        app_id=app,
        env="production",
        process="web",
        kind=RouteKind.TLS,
        address=address,
        port=port,
        hostname=hostname,
        backend_port=8443,
        proxy_protocol=proxy_protocol,
        backends=backends,
    )


def tcp(route_id: str, port: int, *backends: Backend, address: str = "0.0.0.0") -> Route:
    return Route(
        route_id=route_id,
        org_id="o_acme",
        app_id="a_db",
        env="production",
        process="db",
        kind=RouteKind.TCP,
        address=address,
        port=port,
        hostname=None,
        backend_port=5432,
        backends=backends,
    )


def b(instance: str, address: str, port: int = 8443, *, healthy: bool = True) -> Backend:
    return Backend(instance, address, port, healthy)


def three_hostnames() -> EdgeSnapshot:
    return EdgeSnapshot(
        "cursor-0001",
        (
            tls("r_shop", "shop.example.com", b("i_s1", "fd00:0:0:1::5"), b("i_s2", "10.1.0.2")),
            tls("r_api", "api.example.com", b("i_a1", "10.1.0.7"), app="a_api"),
            tls(
                "r_docs",
                "docs.example.com",
                b("i_d1", "10.1.0.9"),
                b("i_d2", "10.1.0.10", healthy=False),
                app="a_docs",
            ),
        ),
    )


def proxy_v2() -> EdgeSnapshot:
    return EdgeSnapshot(
        "cursor-0002",
        (
            tls("r_pp", "real-ip.example.com", b("i_p1", "10.1.0.3"), proxy_protocol="v2"),
            tls("r_plain", "plain.example.com", b("i_q1", "10.1.0.4")),
        ),
    )


def tcp_route() -> EdgeSnapshot:
    return EdgeSnapshot(
        "cursor-0003",
        (tcp("r_pg", 15432, b("i_pg1", "10.1.0.20", 5432), b("i_pg2", "10.1.0.21", 5432)),),
    )


def dedicated_address() -> EdgeSnapshot:
    settings = EdgeSettings(
        inspect_timeout_ms=3000,
        max_conn_per_source=50,
        max_conn_rate_per_source=100,
        connect_timeout_ms=2000,
        idle_timeout_ms=600_000,
        check_interval_ms=1000,
    )
    return EdgeSnapshot(
        "cursor-0004",
        (
            # The org's dedicated IPv4: the same hostname as on the shared address is a
            # different binding, and a TCP port of its own.
            tls("r_ded", "shop.example.com", b("i_s1", "fd00:0:0:1::5"), address="203.0.113.10"),
            tcp("r_ded_tcp", 5432, b("i_pg1", "10.1.0.20", 5432), address="203.0.113.10"),
            tls("r_shared", "shop.example.com", b("i_s1", "fd00:0:0:1::5")),
            tls("r_v6", "shop.example.com", b("i_s1", "fd00:0:0:1::5"), address="::"),
        ),
        settings,
    )


def no_routes() -> EdgeSnapshot:
    return EdgeSnapshot("cursor-0005", ())


CASES: dict[str, Callable[[], EdgeSnapshot]] = {
    f.__name__: f for f in (three_hostnames, proxy_v2, tcp_route, dedicated_address, no_routes)
}


def _maps_text(snapshot: EdgeSnapshot) -> str:
    return "".join(f"# {name}\n{text}" for name, text in sorted(render_maps(snapshot).items()))


def _check_golden(path: Path, actual: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"no golden {path.name}: run with EMBER_UPDATE_GOLDEN=1"
    assert actual == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    snapshot = CASES[case]()
    spares = 2 if case == "three_hostnames" else 0  # what the driver adds (16 by default)
    text = render(snapshot, runtime_socket=SOCKET, map_dir=MAP_DIR, spare_backends=spares)
    _check_golden(GOLDEN / f"{case}.cfg", text)
    _check_golden(GOLDEN / f"{case}.maps", _maps_text(snapshot))


def test_every_golden_file_belongs_to_a_case() -> None:
    for path in GOLDEN.iterdir():
        assert path.stem in CASES, f"{path.name} has no case"


@pytest.mark.parametrize("case", sorted(CASES))
def test_haproxy_accepts_the_rendered_configuration(case: str, tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed: run make bootstrap (scripts/debian-packages.txt)"
    snapshot = CASES[case]()
    for name, text in render_maps(snapshot).items():
        (tmp_path / name).write_text(text)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        render(
            snapshot,
            runtime_socket=str(tmp_path / "a.sock"),
            map_dir=str(tmp_path),
            spare_backends=2,
        )
    )
    proc = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Warnings are defects too: HAProxy warns about options that do not apply.
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# -- what the text says --------------------------------------------------------------------------


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = line
            out[current] = []
        elif line.strip() and not line.strip().startswith("#"):
            out.setdefault(current, []).append(line.strip())
    return out


def test_tls_listeners_inspect_and_have_no_default_backend() -> None:
    sections = _sections(render(three_hostnames(), runtime_socket=SOCKET, map_dir=MAP_DIR))
    fe = sections["frontend fe_tls_0.0.0.0_443"]
    assert "tcp-request inspect-delay 5000ms" in fe
    accept = next(i for i, line in enumerate(fe) if line.startswith("tcp-request content accept"))
    assert "{ req.ssl_hello_type 1 }" in fe[accept]
    assert fe[accept + 1] == "tcp-request content reject"  # everything else is closed
    assert not any(line.startswith("default_backend") for line in fe)
    assert not any("accept-proxy" in line for section in sections.values() for line in section)


def test_send_proxy_v2_only_on_servers_of_routes_that_enable_it() -> None:
    sections = _sections(render(proxy_v2(), runtime_socket=SOCKET, map_dir=MAP_DIR))
    pp = [line for line in sections["backend be_r_pp"] if line.startswith("server ")]
    plain = [line for line in sections["backend be_r_plain"] if line.startswith("server ")]
    assert pp and all("send-proxy-v2" in line and "check-send-proxy" in line for line in pp)
    assert plain and not any("send-proxy" in line for line in plain)


def test_unhealthy_instances_are_rendered_in_maintenance() -> None:
    lines = _sections(render(three_hostnames(), runtime_socket=SOCKET, map_dir=MAP_DIR))
    servers = {
        line.split()[1]: line for line in lines["backend be_r_docs"] if line.startswith("server")
    }
    assert servers["i_d2"].endswith(" disabled")
    assert not servers["i_d1"].endswith(" disabled")


def test_the_same_snapshot_in_any_order_renders_the_same_bytes() -> None:
    rng = random.Random(7)
    for case in CASES.values():
        snapshot = case()
        expected = render(snapshot, runtime_socket=SOCKET, map_dir=MAP_DIR)
        for _ in range(5):
            routes = [
                dataclasses.replace(r, backends=tuple(rng.sample(r.backends, len(r.backends))))
                for r in rng.sample(snapshot.routes, len(snapshot.routes))
            ]
            shuffled = dataclasses.replace(snapshot, routes=tuple(routes))
            assert render(shuffled, runtime_socket=SOCKET, map_dir=MAP_DIR) == expected
            assert render_maps(shuffled) == render_maps(snapshot)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (tls("r_x", "Shop.Example.com"), "not a lowercase DNS name"),
        (tls("r_x", "shop.example.com\nfrontend evil"), "not a lowercase DNS name"),
        (tls("r_x", "shop example.com"), "not a lowercase DNS name"),
        (tls("r_x", "*.example.com"), "not a lowercase DNS name"),
        (tls("r_x", ""), "not a lowercase DNS name"),
        (tls("r_x", "a.test", address="example.com"), "not an IP literal"),
        (tls("r_x", "a.test", port=0), "port 0 is out of range"),
        (tls("r_x", "a.test", proxy_protocol="v1"), "proxy_protocol 'v1'"),
        (tls("r_x", "a.test", b("i_1", "10.0.0.1 check")), "not an IP literal"),
        (tls("r_x", "a.test", b("i_1", "10.0.0.1"), b("i_1", "10.0.0.2")), "appears twice"),
        (tls("r_x", "a.test", b("i_1", "10.0.0.1", 70000)), "port 70000 is out of range"),
        (dataclasses.replace(tcp("r_x", 5432), hostname="a.test"), "a TCP route has no hostname"),
    ],
)
def test_a_route_that_cannot_be_rendered_is_named(route: Route, message: str) -> None:
    snapshot = EdgeSnapshot("c", (route, tls("r_ok", "ok.example.com")))
    found = problems(snapshot)
    assert [p.route_id for p in found] == ["r_x"]
    assert message in found[0].message
    with pytest.raises(SnapshotInvalid) as err:
        render(snapshot, runtime_socket=SOCKET, map_dir=MAP_DIR)
    assert err.value.code == "edge.snapshot_invalid"
    kept, _ = without_invalid_routes(snapshot)
    assert [r.route_id for r in kept.routes] == ["r_ok"]
    render(kept, runtime_socket=SOCKET, map_dir=MAP_DIR)


@pytest.mark.parametrize(
    ("routes", "loser", "message"),
    [
        ((tls("r_a", "a.test"), tls("r_b", "a.test")), "r_b", "taken by route 'r_a'"),
        ((tcp("r_a", 5432), tcp("r_b", 5432)), "r_b", "taken by route 'r_a'"),
        ((tcp("r_a", 443), tls("r_b", "a.test")), "r_b", "already serves tcp route 'r_a'"),
        ((tls("r_a", "a.test"), tls("r_a", "b.test")), "r_a", "same backend name"),
        # The same listener spelled two ways is one listener.
        (
            (tls("r_a", "a.test", address="::"), tls("r_b", "a.test", address="0::0")),
            "r_b",
            "taken",
        ),
    ],
)
def test_conflicting_routes_the_lowest_id_wins(
    routes: tuple[Route, ...], loser: str, message: str
) -> None:
    snapshot = EdgeSnapshot("c", routes)
    found = problems(snapshot)
    assert [p.route_id for p in found] == [loser]
    assert message in found[0].message
    kept, _ = without_invalid_routes(snapshot)
    assert len(kept.routes) == 1
    render(kept, runtime_socket=SOCKET, map_dir=MAP_DIR)


def test_ids_become_safe_distinct_names() -> None:
    assert safe_name("i_abc-1.2") == "i_abc-1.2"
    odd = [safe_name(x) for x in ("i/1", "i 1", "i_1", "i\n1", "i#1")]
    assert len(set(odd)) == len(odd)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in odd)
    assert backend_name("r/x") != backend_name("r_x")


def test_paths_that_would_break_the_configuration_are_refused() -> None:
    with pytest.raises(ValueError, match="runtime socket"):
        render(no_routes(), runtime_socket="/tmp/a b.sock", map_dir=MAP_DIR)
    with pytest.raises(ValueError, match="map directory"):
        render(three_hostnames(), runtime_socket=SOCKET, map_dir="/tmp/maps)")
