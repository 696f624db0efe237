"""Harness helpers (the load clients against the Go backend alone: no proxy, no peer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import facts
from bench.targets import free_ports, proc_tree_rss_kib, proxy_python, quicproxy_cmd


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5


def test_rss_of_own_process_tree() -> None:
    assert proc_tree_rss_kib(os.getpid()) > 1000


def test_quicproxy_named_by_env_runs_on_the_python_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exe = Path(sys.executable).parent / "quicproxy"  # the project's own install
    monkeypatch.setenv("QUICPROXY", str(exe))
    qp = quicproxy_cmd()
    assert qp == [str(exe)]
    assert proxy_python(qp) == str(exe.parent / "python")
    version = sys.version.split()[0]
    assert facts._interpreter(qp).startswith(f"{version}, ")


def test_a_quicproxy_without_serve_is_not_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "quicproxy"
    fake.write_text("#!/bin/sh\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QUICPROXY", str(fake))
    assert quicproxy_cmd() is None
    assert proxy_python(None) == sys.executable
    assert facts._interpreter(None) == "-"


@pytest.fixture
def go_backend(tmp_path: Path) -> Iterator[int]:
    """The bench's Go backend, built and running on a free loopback port (its port)."""
    from bench.targets import _spawn, build_backend, stop, wait_http
    from tests.helpers import need_tool

    need_tool("go", "install Go (https://go.dev/dl/ or your distribution's golang package)")
    exe = build_backend(tmp_path / "backend")
    (port,) = free_ports(1)
    proc = _spawn([str(exe), "-addr", f"127.0.0.1:{port}"], tmp_path / "backend.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/_gwhealthz", [proc])
        yield port
    finally:
        stop([proc])


def _client(module: str, *args: str) -> dict:
    """One run of a bench load client (``python -m bench.MODULE``): its JSON line."""
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ws_echo_client_against_the_go_backend(go_backend: int) -> None:
    """The bench's WebSocket row: the Go backend's stdlib /ws echo and the client that
    loads it agree (messages echoed whole, round trips measured)."""
    got = _client("ws_echo", f"ws://127.0.0.1:{go_backend}/ws", "4", "1")
    assert got["messages"] > 100 and 0 < got["p50_ms"] <= got["p99_ms"]


def test_grpc_unary_client_against_the_go_backend(go_backend: int) -> None:
    """The bench's gRPC row: the Go backend's stdlib h2c gRPC echo and the grpcio client
    that loads it agree (messages echoed whole, calls counted)."""
    got = _client("grpc_unary", f"h2c://127.0.0.1:{go_backend}", "4", "1")
    assert got["calls"] > 50 and 0 < got["p50_ms"] <= got["p99_ms"]


def test_ws_url_keeps_the_scheme_apart() -> None:
    from bench.workloads import ws_url

    assert ws_url("https://localhost:8443") == "wss://localhost:8443/ws"
    assert ws_url("http://localhost:9000") == "ws://localhost:9000/ws"


def test_failover_row_kills_one_of_three_backends_and_restores_it(tmp_path: Path) -> None:
    """The failover row on a real quicproxy: its `/fo/` route reaches the Lab's three pool
    backends, one is killed part-way (its process gone during the run), requests are
    counted both ways, and the killed one runs again after."""
    from bench.certs import make_cert
    from bench.targets import Lab, build_backend
    from bench.workloads import Settings, failover
    from tests.helpers import need_tool

    need_tool("go", "install Go (https://go.dev/dl/ or your distribution's golang package)")
    cert, key = make_cert(tmp_path / "tls")
    lab = Lab(tmp_path, cert, key, build_backend(tmp_path / "backend"))
    try:
        t = next(t for t in lab.plan(1) if t.name == "qp-1w")
        lab.start(t)
        try:
            s = Settings()
            s.duration, s.ws_conns = 3.0, 4
            killed = lab.pool.procs[2]
            got = failover(t, s)
            assert killed.poll() is not None  # it was killed during the run
            assert lab.pool.procs[2].poll() is None  # and runs again
            assert set(got) == {"failover/h2", "failover_err/h2"}
            assert got["failover/h2"] > 10 and got["failover_err/h2"] >= 0
        finally:
            lab.stop(t)
    finally:
        lab.close()


def test_waf_peer_runs_the_same_crs_on_h1_h2_and_h3(tmp_path: Path) -> None:
    """The WAF peer (Go: Coraza's http middleware, httputil, quic-go http3) built from its
    pinned modules, with the directives quicproxy's Coraza engine loads: a benign GET
    reaches the backend and an attack is refused (403) over h1, h2 and h3."""
    import httpx

    from bench.certs import make_cert
    from bench.targets import Lab, build_backend
    from tests.helpers import need_tool

    need_tool("go", "install Go (https://go.dev/dl/ or your distribution's golang package)")
    cert, key = make_cert(tmp_path / "tls")
    lab = Lab(tmp_path, cert, key, build_backend(tmp_path / "backend"))
    try:
        t = next(t for t in lab.plan(1) if t.name == "waf-peer")
        lab.start(t)
        try:
            rules = (tmp_path / "wafpeer-directives.conf").read_text()
            assert "Include @crs-setup.conf.example" in rules and "@owasp_crs/REQUEST-9" in rules
            base = t.urls["h1"].replace("localhost", "127.0.0.1")
            attack = "/1k?q=%27%20OR%201%3D1%20--%20&x=<script>alert(1)</script>"
            for http2 in (False, True):
                with httpx.Client(http2=http2, verify=False, headers={"host": "localhost"}) as c:
                    ok = c.get(base + "/1k")
                    assert ok.status_code == 200 and len(ok.content) == 1024
                    assert ok.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                    assert c.get(base + attack).status_code == 403
            h3 = _h3_statuses(base, ["/1k", attack])
            assert h3 == [200, 403], h3
        finally:
            lab.stop(t)
    finally:
        lab.close()


def _h3_statuses(base: str, paths: list[str]) -> list[int]:
    """Statuses of GETs over HTTP/3 (quicproxy's own h3 client, certificate not verified)."""
    import asyncio

    from quicproxy._client import h3_client

    port = base.rsplit(":", 1)[1]

    async def run() -> list[int]:
        async with h3_client(
            f"https://127.0.0.1:{port}/", insecure=True, server_name="localhost"
        ) as client:
            return [(await client.request("GET", path, timeout=20)).status for path in paths]

    return asyncio.run(run())
