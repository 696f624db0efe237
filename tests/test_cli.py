"""The command line: embedded defaults, bad config, graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from quicproxy._client import h3_client
from tests.helpers import free_port

QUICPROXY = [sys.executable, "-m", "quicproxy"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        QUICPROXY + list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_unknown_config_key_fails_at_start_naming_it(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quic:\n  idle_timout: 5\n")
    proc = run_cli("serve", "--config", str(cfg))
    assert_one_line_error(proc, "quic.idle_timout", "unknown key", "idle_timeout")


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (None, "cannot read it"),
        ("c2hvcnQ=\n", "5 bytes, 32 needed"),
        ("not base64!\n", "line 1 is not base64"),
        ("# only a comment\n", "no secret"),
    ],
)
def test_a_bad_shared_secret_file_fails_at_start_naming_the_key(tmp_path: Path, secret, why):
    path = tmp_path / "secret"
    if secret is not None:
        path.write_text(secret)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"quic:\n  shared_secret_file: {path}\n")
    proc = run_cli("serve", "--config", str(cfg))
    assert_one_line_error(proc, "quic.shared_secret_file", why, "openssl rand -base64 32")
    assert "c2hvcnQ" not in proc.stderr  # never the secret


@pytest.mark.parametrize(
    ("yaml_text", "key", "fix"),
    [
        ("timeouts:\n  header: 0\n", "timeouts.header", "give seconds"),
        ("listen:\n  backlog: 0\n", "listen.backlog", "1024"),
        ("limits:\n  max_headers: 2\n", "limits.max_headers", "100"),
        ("limits:\n  max_connections_per_address: 0\n", "max_connections_per_address", "256"),
    ],
)
def test_bad_edge_limits_fail_at_start_naming_the_key(tmp_path: Path, yaml_text, key, fix):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert_one_line_error(run_cli("serve", "--config", str(cfg)), key, fix)


def test_port_out_of_range_fails_naming_the_setting():
    proc = run_cli("serve", "--https-port", "70000")
    assert_one_line_error(proc, "listen.https_port", "70000", "1 to 65535")


def test_env_port_out_of_range_fails_naming_the_setting():
    proc = run_cli("serve", env={"HTTP_PORT": "99999"})
    assert_one_line_error(proc, "listen.http_port", "99999")


def test_unreadable_certificate_fails_naming_the_setting(tmp_path: Path):
    proc = run_cli("serve", "--cert", str(tmp_path / "nope.pem"), "--key", str(tmp_path / "k"))
    assert_one_line_error(proc, "tls.cert", "nope.pem", "fix:")


def test_unparsable_backend_url_fails_naming_the_setting():
    proc = run_cli("serve", "--backend", "http://bad host:abc")
    assert_one_line_error(proc, "backend", "http://HOST:PORT")


def test_waf_service_mode_without_url_fails_naming_the_setting():
    proc = run_cli("serve", "--waf", "service")
    assert_one_line_error(proc, "waf.url", "--waf-url")


def test_metrics_port_out_of_range_fails_naming_the_setting():
    proc = run_cli("serve", "--metrics-port", "70000")
    assert_one_line_error(proc, "metrics.port", "70000", "1 to 65535")


@pytest.mark.parametrize(
    "text, words",
    [
        ("rate_limit:\n  rate: 0\n", ["rate_limit.rate", "fix:"]),
        ("rate_limit:\n  burst: 0\n", ["rate_limit.burst", "fix:"]),
        ("rate_limit:\n  allow: [not-a-net]\n", ["rate_limit.allow[0]", "CIDR"]),
        ("log:\n  access: xml\n", ["log.access", "json, common, off"]),
    ],
)
def test_bad_ops_settings_fail_at_start_naming_the_key(tmp_path: Path, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert_one_line_error(run_cli("serve", "--config", str(cfg)), *words)


def test_non_root_defaults_to_high_ports(monkeypatch):
    # Root cannot become non-root inside one process: geteuid is replaced here only.
    from quicproxy import load_config
    from quicproxy._server import default_ports

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    http, https, note = default_ports(load_config(env={}))
    assert (http, https) == (8080, 8443)
    assert note and "high ports" in note
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_ports(load_config(env={}))[:2] == (80, 443)


async def _wait_h3(url: str, deadline: float) -> object:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with h3_client(url, insecure=True) as client:
                return await asyncio.wait_for(client.request("GET", "/json"), 5)
        except (TimeoutError, ConnectionError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.3)
    raise AssertionError(f"no HTTP/3 answer at {url}: {last!r}")


async def test_embedded_default_serve_answers_http3(tmp_path: Path):
    """`quicproxy serve` with nothing else: self-signed cert, demo backend, h3 answers."""
    root = os.geteuid() == 0
    https = 443 if root else 8443
    proc = subprocess.Popen(
        QUICPROXY + ["serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": ""},
    )
    try:
        resp = await _wait_h3(f"https://localhost:{https}/json", time.monotonic() + 30)
        assert resp.status == 200  # type: ignore[attr-defined]
        assert b'"protocol": "HTTP/3"' in resp.body  # type: ignore[attr-defined]
        assert (tmp_path / ".cache/quicproxy/selfsigned.crt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"https://localhost:{https}/" in out
    assert "quicproxy get" in out and "demo backend" in out


@asynccontextmanager
async def cli_proxy(tmp_path: Path, *extra: str) -> AsyncIterator[tuple[Any, int, int, Any]]:
    """`quicproxy serve` in a subprocess in front of a test backend, once h3 answers:
    yields (process, http_port, https_port, backend)."""
    from tests.backend import Backend

    backend = await Backend().start()
    http, https = free_port(), free_port()
    args = ["serve", "--host", "127.0.0.1", "--http-port", str(http), "--https-port", str(https)]
    proc = subprocess.Popen(
        QUICPROXY + args + ["--backend", backend.url, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        try:
            await _wait_h3(f"https://localhost:{https}/json", time.monotonic() + 30)
        except AssertionError as exc:
            if proc.poll() is None:
                raise
            proc.output = proc.communicate()[0]
            tail = proc.output[-2000:]
            raise AssertionError(f"{exc}; quicproxy exited {proc.returncode}: {tail}") from None
        yield proc, http, https, backend
    finally:
        if proc.poll() is None:
            proc.kill()
        if not hasattr(proc, "output"):
            proc.output = proc.communicate()[0]  # what it printed, for checks after the block
        await backend.stop()


async def _exit_code(proc: Any) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)


async def test_sigterm_drains_in_flight_requests(tmp_path: Path):
    async with cli_proxy(tmp_path) as (proc, http, https, _):
        async with (
            h3_client(f"https://localhost:{https}/", insecure=True) as h3c,
            httpx.AsyncClient(verify=False, http2=True) as h2c,
        ):
            h3_calls = [asyncio.ensure_future(h3c.request("GET", "/slow?s=2")) for _ in range(5)]
            h2_calls = [
                asyncio.ensure_future(h2c.get(f"https://localhost:{https}/slow?s=2"))
                for _ in range(5)
            ]
            await asyncio.sleep(0.8)
            proc.send_signal(signal.SIGTERM)
            h3_done = await asyncio.gather(*h3_calls)
            h2_done = await asyncio.gather(*h2_calls)
        assert [r.status for r in h3_done] == [200] * 5
        assert [r.status_code for r in h2_done] == [200] * 5
        assert all(r.body == b"slow done" for r in h3_done)
        assert await _exit_code(proc) == 0
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as c:
                await c.get(f"http://127.0.0.1:{http}/_gwhealthz")


def test_python_dash_m_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("quicproxy ")


async def test_two_workers_share_the_ports_and_stop_cleanly(tmp_path: Path):
    async with cli_proxy(tmp_path, "--workers", "2") as (proc, _, https, _):
        statuses = []
        for _ in range(6):
            async with h3_client(f"https://localhost:{https}/", insecure=True) as client:
                statuses.append((await client.request("GET", "/hello")).status)
        async with httpx.AsyncClient(verify=False, http2=True) as client:
            statuses.append((await client.get(f"https://localhost:{https}/hello")).status_code)
        assert statuses == [200] * 7
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0
    assert proc.output.count("is listening") == 1


def test_inline_coraza_not_built_fails_in_one_line_before_forking():
    proc = run_cli(
        "serve", "--waf", "inline", "--workers", "2", "--http-port", str(free_port()),
        "--https-port", str(free_port()),
        env={"QUICPROXY_CORAZA_LIB": "/nonexistent/libquicproxy-coraza.so"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert_one_line_error(proc, "waf.engine", "coraza", "not built", "coraza/build.sh")
    assert "--waf-engine modsecurity" in proc.stderr


def test_waf_engine_flag_rejects_unknown_engines():
    proc = run_cli("serve", "--waf", "inline", "--waf-engine", "naxsi")
    assert proc.returncode == 2 and "--waf-engine" in proc.stderr


def test_waf_info_prints_engine_crs_paranoia_and_rules(waf_engine: str, tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("waf:\n  paranoia_level: 2\n")
    proc = run_cli("waf", "info", "--config", str(cfg), "--waf-engine", waf_engine)
    assert proc.returncode == 0, proc.stderr
    facts = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    crs = "4.25.0" if waf_engine == "coraza" else "3.3.4"
    assert (facts["engine"], facts["CRS version"], facts["paranoia level"]) == (
        waf_engine,
        crs,
        "2",
    )
    assert facts["engine version"][0].isdigit() and int(facts["rules loaded"]) > 400


async def test_workers_each_load_the_inline_engine_after_the_fork(tmp_path: Path, waf_engine: str):
    extra = ("--workers", "2", "--waf", "inline", "--waf-engine", waf_engine)
    async with cli_proxy(tmp_path, *extra) as (proc, _, https, backend):
        statuses = []
        for _ in range(6):  # new connections: both workers answer some
            async with h3_client(f"https://localhost:{https}/", insecure=True) as client:
                attack = await client.request("GET", "/?id=1%27%20OR%20%271%27=%271")
                statuses.append(attack.status)
                statuses.append((await client.request("GET", "/hello")).status)
        assert statuses == [403, 200] * 6
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0


async def test_a_stdout_nobody_reads_does_not_stall_requests(tmp_path: Path):
    """The access log goes to stdout; a reader that stops reading (a stuck log shipper)
    must not stall the event loop once the pipe's buffer is full. 600 lines are ~3x a
    64 KiB pipe buffer: all requests are answered, and once stdout is read every line
    is there, whole."""
    async with cli_proxy(tmp_path) as (proc, http, https, _):
        async with httpx.AsyncClient(verify=False) as client:
            for i in range(600):
                resp = await asyncio.wait_for(
                    client.get(f"https://localhost:{https}/json?n={i}"), 5
                )
                assert resp.status_code == 200
        # the reader comes back: everything that waited arrives, then the proxy stops
        reading = asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0
        output = await reading
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    h1 = [e for e in entries if e.get("protocol") == "h1"]  # the readiness probe used h3
    assert len(h1) == 600 and {(e["path"], e["status"]) for e in h1} == {("/json", 200)}


def test_a_started_proxy_takes_its_startup_objects_out_of_gc_scans():
    code = (
        "import gc; from quicproxy._cli import tune_gc, GC_THRESHOLDS; tune_gc(); "
        "print(gc.get_freeze_count() > 1000, gc.get_threshold() == GC_THRESHOLDS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
