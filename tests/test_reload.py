"""Live reload: the config file rewritten (or SIGHUP) under real h1, h2 and h3 clients.

Routes change under load with 0 failed requests, each answered under a configuration in
force while it ran, on the very connections open before; a request in flight finishes on
the configuration it began with; a broken file changes nothing and logs one line; a
setting that needs a restart is named; SIGHUP reloads (every worker with --workers 2)
and never kills the process, nor a download in flight."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from quicproxy import Proxy
from quicproxy._metrics import metrics
from quicproxy._reload import ConfigSource
from tests.backend import Backend
from tests.helpers import free_port, h3, https_url, tcp_client

QUICPROXY = [sys.executable, "-m", "quicproxy"]


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Replace the file at once, as an editor or the kubelet does (rename over it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)


def base_config(certs: tuple[str, str], **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "http_port": 0, "https_port": 0},
        "tls": {"cert": certs[0], "key": certs[1]},
        "shutdown_grace": 5,
        "log": {"access": "off"},
    }
    data.update(extra)
    return data


def routed(certs: tuple[str, str], default: Backend, p: Backend, **extra: Any) -> dict[str, Any]:
    """``/p`` to ``p``, the rest to ``default``."""
    return base_config(
        certs, backend=default.url, routes=[{"path_prefix": "/p", "backends": [p.url]}], **extra
    )


async def started(path: Path, poll: float = 0.05) -> Proxy:
    source = ConfigSource(str(path), env={})
    proxy = Proxy(source.load(), source=source)
    assert proxy.reloader is not None
    proxy.reloader.poll = poll
    await proxy.start()
    return proxy


async def until(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def backends() -> Any:
    started_ = [await Backend(f"b{i}").start() for i in range(3)]
    yield started_
    for b in started_:
        await b.stop()


Answer = tuple[float, float, str, int, str]
"(sent, answered, path, status, x-backend) of one request."


async def load_while_rewriting(
    proxy: Proxy,
    path: Path,
    certs: tuple[str, str],
    version_config: Any,
    rewrites: int,
    per_protocol: int,
    paths: list[str],
) -> tuple[list[Answer], dict[int, tuple[float, float]]]:
    """h1, h2 and h3 clients (``per_protocol`` each, one connection each) loop over
    ``paths`` while the file is rewritten to versions 2..rewrites+1, each waited for.
    Returns the answers and, per version, the window its swap happened in (file written,
    version seen); asserts that no request failed and no connection was replaced."""
    assert proxy.handler is not None and proxy._quic is not None
    handler, quic = proxy.handler, proxy._quic
    windows: dict[int, tuple[float, float]] = {1: (0.0, time.monotonic())}
    answers: list[Answer] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def loop_requests(send: Any) -> None:
        i = 0
        while not stop.is_set():
            target = paths[i % len(paths)]
            i += 1
            sent = time.monotonic()
            try:
                status, backend = await send(target)
            except Exception as exc:  # any failure counts
                failures.append(repr(exc))
                continue
            answers.append((sent, time.monotonic(), target, status, backend))

    async def tcp_loop(http2: bool) -> None:
        async with tcp_client(certs, http2=http2) as client:
            await client.get(https_url(proxy, "/"))  # its connection is open before

            async def send(target: str) -> tuple[int, str]:
                r = await client.get(https_url(proxy, target))
                return r.status_code, r.headers.get("x-backend", "")

            await loop_requests(send)

    async def h3_loop() -> None:
        async with h3(proxy, certs) as client:
            await client.request("GET", "/")

            async def send(target: str) -> tuple[int, str]:
                r = await client.request("GET", target)
                return r.status, r.header("x-backend") or ""

            await loop_requests(send)

    tasks = [asyncio.ensure_future(tcp_loop(False)) for _ in range(per_protocol)]
    tasks += [asyncio.ensure_future(tcp_loop(True)) for _ in range(per_protocol)]
    tasks += [asyncio.ensure_future(h3_loop()) for _ in range(per_protocol)]
    try:
        await until(lambda: len(proxy._conns) == 2 * per_protocol)
        await until(lambda: len(quic.connections) == per_protocol)
        tcp_before, quic_before = set(proxy._conns), set(quic.connections)
        for k in range(2, rewrites + 2):
            await asyncio.sleep(0.15)
            written = time.monotonic()
            write_config(path, version_config(k))
            await until(lambda k=k: handler.runtime.version == k, 30)
            windows[k] = (written, time.monotonic())
        await asyncio.sleep(0.15)
        # the connections open before are the ones open now: none was closed or replaced
        assert set(proxy._conns) == tcp_before
        assert set(quic.connections) == quic_before
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert failures == []
    # every retired runtime was let go once its requests finished: only the current is held
    assert proxy.reloader is not None
    live = proxy.reloader._live
    await until(lambda: live == [handler.runtime])
    windows[rewrites + 2] = (float("inf"), float("inf"))
    return answers, windows


def in_force(windows: dict[int, tuple[float, float]], sent: float, done: float) -> list[int]:
    """The versions that may have been in force at some time in [sent, done]."""
    last = max(windows) - 1
    return [k for k in range(1, last + 1) if windows[k][0] <= done and sent <= windows[k + 1][1]]


async def test_routes_rewritten_under_h1_h2_h3_load_fail_no_request(tmp_path, certs, backends):
    rewrites = 12
    path = tmp_path / "config.yaml"

    def version_config(k: int) -> dict[str, Any]:
        return routed(certs, backends[(k + 1) % 3], backends[k % 3])

    write_config(path, version_config(1))
    proxy = await started(path)
    try:
        answers, windows = await load_while_rewriting(
            proxy, path, certs, version_config, rewrites, 4, ["/p", "/other"]
        )
    finally:
        await proxy.stop(grace=1)

    def expected(target: str, k: int) -> str:
        return backends[k % 3 if target == "/p" else (k + 1) % 3].name

    wrong = [
        a
        for a in answers
        if a[3] != 200 or a[4] not in {expected(a[2], k) for k in in_force(windows, *a[:2])}
    ]
    print(f"{len(answers)} requests over {rewrites} reloads, 0 failed")
    assert len(answers) > 20 * rewrites
    assert wrong == []
    assert metrics.value("quicproxy_config_reloads_total", result="ok") == rewrites
    assert {a[4] for a in answers} == {"b0", "b1", "b2"}  # every version's routes were used


async def test_waf_and_routes_rewritten_under_load(tmp_path, certs, backends, waf_engine):
    """Every other version turns the inline WAF on (paranoia 1, then 2): an attack is
    answered 403 or passed by the version in force while it ran, never by another."""
    rewrites = 8
    path = tmp_path / "config.yaml"
    attack = "/p?q=<script>alert(document.cookie)</script>"

    def version_config(k: int) -> dict[str, Any]:
        waf = {"mode": "off"}
        if k % 2 == 0:
            waf = {"mode": "inline", "engine": waf_engine, "paranoia_level": 1 + k % 4 // 2}
        return routed(certs, backends[k % 3], backends[k % 3], waf=waf)

    write_config(path, version_config(1))
    proxy = await started(path)
    try:
        answers, windows = await load_while_rewriting(
            proxy, path, certs, version_config, rewrites, 3, ["/p", attack]
        )
    finally:
        await proxy.stop(grace=1)

    def outcome(target: str, k: int) -> tuple[int, str]:
        if target == attack and k % 2 == 0:
            return 403, ""
        return 200, backends[k % 3].name

    wrong = [
        a for a in answers if a[3:] not in {outcome(a[2], k) for k in in_force(windows, *a[:2])}
    ]
    assert wrong == []
    assert {a[3] for a in answers if a[2] == attack} == {200, 403}
    assert len(answers) > 10 * rewrites


async def test_a_request_in_flight_finishes_on_the_config_it_began_with(tmp_path, certs, backends):
    path = tmp_path / "config.yaml"
    write_config(path, routed(certs, backends[0], backends[0], log={"access": "json"}))
    proxy = await started(path)
    assert proxy.handler is not None
    lines: list[str] = []
    proxy.handler.access.sink = lines.append
    try:
        async with tcp_client(certs, http2=True) as client:
            slow = asyncio.ensure_future(client.get(https_url(proxy, "/slow?s=1")))
            await until(lambda: backends[0].slow_now == 1)
            new = routed(certs, backends[1], backends[1], log={"access": "common"})
            write_config(path, new)
            await until(lambda: proxy.handler is not None and proxy.handler.runtime.version == 2)
            after = await client.get(https_url(proxy, "/after"))
            assert after.headers["x-backend"] == "b1"
            resp = await slow
            assert resp.status_code == 200 and resp.headers["x-backend"] == "b0"
        await until(lambda: len(lines) == 2)
        by_path = {("slow" if "/slow" in line else "after"): line for line in lines}
        # the request in flight is logged in the format it began with, the new one in the new
        assert json.loads(by_path["slow"])["upstream"].endswith(str(backends[0].port))
        assert by_path["after"].startswith("127.0.0.1 ") and '"GET /after' in by_path["after"]
    finally:
        await proxy.stop(grace=1)


@pytest.mark.parametrize(
    ("broken", "words"),
    [
        ({"routes": [{"path_prefix": "/p", "backends": []}]}, ["routes[0].backends", "fix:"]),
        ({"routes": [{"path_prefix": "p", "backends": ["http://x"]}]}, ["path_prefix", "fix:"]),
        ({"rate_limit": {"enabled": True, "burst": 0}}, ["rate_limit.burst", "fix:"]),
        ({"waf": {"mode": "sideways"}}, ["waf.mode", "fix:"]),
        ({"log": {"access": "xml"}}, ["log.access", "json, common, off"]),
        ("routes: [unclosed\n", ["--config", "not valid YAML", "fix:"]),
    ],
)
async def test_a_broken_config_changes_nothing_and_logs_one_line(
    tmp_path, certs, backends, caplog, broken, words
):
    path = tmp_path / "config.yaml"
    good = routed(certs, backends[0], backends[0])
    write_config(path, good)
    proxy = await started(path)
    assert proxy.handler is not None and proxy.reloader is not None
    before = proxy.handler.runtime
    try:
        with caplog.at_level(logging.INFO, logger="quicproxy"):
            if isinstance(broken, str):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(broken)
                os.replace(tmp, path)
            else:
                write_config(path, {**good, **broken, "backend": backends[1].url})
            await until(lambda: any("refused" in r.getMessage() for r in caplog.records))
            await asyncio.sleep(0.3)  # several polls of the same broken file
        reload_lines = [r for r in caplog.records if "reload" in r.getMessage()]
        assert len(reload_lines) == 1, [r.getMessage() for r in reload_lines]
        line = reload_lines[0]
        assert line.levelno == logging.ERROR and "\n" not in line.getMessage()
        assert all(w in line.getMessage() for w in words), line.getMessage()
        assert proxy.handler.runtime is before  # nothing changed
        assert metrics.value("quicproxy_config_reloads_total", result="error") == 1
        async with tcp_client(certs, http2=False) as client:
            resp = await client.get(https_url(proxy, "/p"))
            assert resp.headers["x-backend"] == "b0"
        # a good file afterwards is taken
        write_config(path, routed(certs, backends[2], backends[2]))
        await until(lambda: proxy.handler is not None and proxy.handler.runtime.version == 2)
    finally:
        await proxy.stop(grace=1)


async def test_settings_that_need_a_restart_are_named_and_the_rest_applies(
    tmp_path, certs, backends, caplog
):
    path = tmp_path / "config.yaml"
    write_config(path, routed(certs, backends[0], backends[0]))
    proxy = await started(path)
    assert proxy.handler is not None
    port = proxy.https_port
    changed = routed(certs, backends[1], backends[1], workers=3)
    changed["listen"] = {**changed["listen"], "https_port": free_port()}
    changed["quic"] = {"idle_timeout": 5}
    try:
        with caplog.at_level(logging.INFO, logger="quicproxy"):
            write_config(path, changed)
            await until(lambda: proxy.handler is not None and proxy.handler.runtime.version == 2)
        (line,) = [r for r in caplog.records if "reload" in r.getMessage()]
        text = line.getMessage()
        assert line.levelno == logging.WARNING
        assert "not applied until a restart: listen.https_port, quic.idle_timeout, workers" in text
        assert proxy.https_port == port and proxy.config.listen.https_port == 0
        async with tcp_client(certs, http2=False) as client:
            resp = await client.get(https_url(proxy, "/p"))
            assert resp.headers["x-backend"] == "b1"  # the route did change
    finally:
        await proxy.stop(grace=1)


async def test_waf_settings_reload_and_a_rule_file_that_fails_is_refused(
    tmp_path, certs, backends, caplog, waf_engine
):
    path = tmp_path / "config.yaml"
    attack = "/p?q=<script>alert(document.cookie)</script>"
    write_config(path, routed(certs, backends[0], backends[0]))
    proxy = await started(path)
    assert proxy.handler is not None
    waf = {"mode": "inline", "engine": waf_engine}
    try:
        async with tcp_client(certs, http2=True) as client:
            assert (await client.get(https_url(proxy, attack))).status_code == 200
            write_config(path, routed(certs, backends[0], backends[0], waf=waf))
            await until(lambda: proxy.handler is not None and proxy.handler.runtime.version > 1, 60)
            blocked = await client.get(https_url(proxy, attack))
            assert blocked.status_code == 403  # on the connection open before the reload
            assert (await client.get(https_url(proxy, "/p?q=fine"))).status_code == 200
            engine = proxy.handler.waf
            assert await proxy.reload()  # as SIGHUP: the engine built again, rules reread
            assert proxy.handler.waf is not engine
            await until(lambda: _engine_closed(engine), 30)
            assert (await client.get(https_url(proxy, attack))).status_code == 403
            bad_rules = tmp_path / "bad.conf"
            bad_rules.write_text("SecRule THIS IS NOT A RULE\n")
            with caplog.at_level(logging.ERROR, logger="quicproxy"):
                broken = {**waf, "extra_rules": [str(bad_rules)]}
                write_config(path, routed(certs, backends[1], backends[1], waf=broken))
                await until(lambda: any("refused" in r.getMessage() for r in caplog.records), 60)
            (line,) = [r for r in caplog.records if "refused" in r.getMessage()]
            assert "waf" in line.getMessage() and "fix:" in line.getMessage()
            assert proxy.handler.runtime.version == 3
            still = await client.get(https_url(proxy, attack))
            assert still.status_code == 403
            assert (await client.get(https_url(proxy, "/p"))).headers["x-backend"] == "b0"
    finally:
        await proxy.stop(grace=1)


def _engine_closed(waf: Any) -> bool:
    """Whether a retired engine was closed (its rule set released)."""
    engine = getattr(waf, "engine", None)  # modsecurity's rules, coraza's handle: freed
    return engine is not None and any(getattr(engine, a, 1) is None for a in ("rules", "handle"))


# ---------------------------------------------------------------------------- SIGHUP


def _serve(config: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*QUICPROXY, "serve", "--config", str(config), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def _backend_of(url: str, seconds: float = 30) -> str:
    """x-backend of a GET on a new connection, once the proxy answers."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(url)).headers["x-backend"]
        except (httpx.HTTPError, KeyError):
            assert time.monotonic() < deadline, "proxy did not answer"
            await asyncio.sleep(0.2)


def _plain(certs: tuple[str, str], backend: Backend) -> dict[str, Any]:
    data = base_config(certs, backend=backend.url)
    data["listen"] = {
        "host": "127.0.0.1",
        "http_port": free_port(),
        "https_port": free_port(),
        "plain_http": "proxy",
    }
    return data


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reloads_every_worker_and_never_kills_a_download(
    tmp_path, certs, backends, workers
):
    path = tmp_path / "config.yaml"
    data = _plain(certs, backends[0])
    write_config(path, data)
    proc = _serve(path, "--workers", str(workers))
    url = f"http://127.0.0.1:{data['listen']['http_port']}"
    try:
        assert await _backend_of(url + "/") == "b0"
        size = 30_000_000
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("GET", f"{url}/bytes/{size}") as download:
                got = 0
                async for chunk in download.aiter_bytes():
                    if got == 0:  # the download is under way: edit, then SIGHUP
                        write_config(path, {**data, "backend": backends[1].url})
                        proc.send_signal(signal.SIGHUP)
                    got += len(chunk)
                    if got < size // 2:
                        await asyncio.sleep(0.001)  # a slow reader: the reload lands mid-way
        assert got == size  # never cut
        assert proc.poll() is None  # alive
        # new connections (spread over the workers by SO_REUSEPORT) all use the new config
        deadline = time.monotonic() + 20
        while True:
            names = [await _backend_of(url + "/") for _ in range(20)]
            if names == ["b1"] * 20:
                break
            assert time.monotonic() < deadline, names
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGHUP)  # again: still alive
        await asyncio.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    sighup = [line for line in out.splitlines() if "config reloaded (SIGHUP)" in line]
    # the second SIGHUP reached every worker (all were serving by then); the first, every
    # worker that had started (one still starting reads the new file as it starts)
    assert workers + 1 <= len(sighup) <= 2 * workers, out


def test_sighup_does_not_stop_the_waf_service():
    port = free_port()
    proc = subprocess.Popen(
        [*QUICPROXY, "waf", "serve", "--host", "127.0.0.1", "--port", str(port)]
        + ["--waf-engine", "modsecurity"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "SIGHUP ignored" in out


async def test_a_routes_waf_policy_and_health_probes_follow_a_reload(tmp_path, certs, backends):
    """A route's own WAF policy (routes[].waf) changes live: detect, then block, then its
    route gone; the new router's routes are probed (routes[].health) and the old probes
    stop."""
    path = tmp_path / "config.yaml"
    attack = "/p?q=<script>alert(document.cookie)</script>"
    probed = {"path": "/health", "interval": 0.2, "timeout": 1, "healthy": 1, "unhealthy": 1}

    def config(mode: str) -> dict[str, Any]:
        route = {"path_prefix": "/p", "backends": [backends[1].url], "waf": {"mode": mode}}
        route["health"] = probed
        return base_config(
            certs,
            backend=backends[0].url,
            routes=[route],
            waf={"mode": "inline", "engine": "coraza"},
        )

    write_config(path, config("detect"))
    proxy = await started(path)
    assert proxy.handler is not None
    try:
        async with tcp_client(certs, http2=True) as client:
            assert (await client.get(https_url(proxy, attack))).status_code == 200  # detect
            first = list(proxy.handler.probers)
            assert len(first) == 1
            write_config(path, config("block"))
            await until(lambda: proxy.handler is not None and proxy.handler.runtime.version > 1, 60)
            assert (await client.get(https_url(proxy, attack))).status_code == 403
            assert (await client.get(https_url(proxy, "/p?q=fine"))).status_code == 200
            assert len(proxy.handler.probers) == 1 and proxy.handler.probers[0] not in first
            await until(lambda: first[0]._task is None, 10)  # the retired route's probes stop
    finally:
        await proxy.stop(grace=1)
