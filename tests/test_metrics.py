"""Metrics through prometheus-client: one scrape sums every worker, a listener
apart from the public plain-HTTP port, and recording never breaks a request."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from quicproxy._metrics import metrics
from tests.backend import Backend
from tests.helpers import fetch, free_port, http_url
from tests.test_cli import QUICPROXY, _exit_code, _wait_h3

PROTOCOLS = ["h1", "h2", "h3"]
H1_OK = {"protocol": "h1", "status_class": "2xx", "route": "default"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def per_worker_requests(folder: Path) -> Counter[str]:
    """h1 2xx requests each worker recorded, read from its own counter file."""
    counts: Counter[str] = Counter()
    for path in folder.glob("counter_*.db"):
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name == "quicproxy_requests_total" and labels == H1_OK:
                counts[path.stem] += int(value)
    return counts


async def test_one_scrape_counts_every_request_of_two_workers(tmp_path: Path):
    backend = await Backend().start()
    http, https, mport = free_port(), free_port(), free_port()
    env = {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    args = ["serve", "--host", "127.0.0.1", "--http-port", str(http), "--https-port", str(https)]
    args += ["--backend", backend.url, "--workers", "2", "--metrics-port", str(mport)]
    proc = subprocess.Popen(
        QUICPROXY + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    n = 40
    try:
        await _wait_h3(f"https://localhost:{https}/json", time.monotonic() + 30)
        (folder,) = tmp_path.glob("quicproxy-metrics-*")
        for i in range(n):  # a new connection each: SO_REUSEPORT spreads them
            async with httpx.AsyncClient(verify=False) as client:
                resp = await client.get(f"https://127.0.0.1:{https}/r{i}")
                assert resp.status_code == 200
        # Each worker counts a request just after its response went out (the answer does
        # not wait for bookkeeping): on a loaded machine the last one can lag a moment.
        deadline = time.monotonic() + 10
        while sum((spread := per_worker_requests(folder)).values()) < n:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert len(spread) == 2 and sum(spread.values()) == n, spread
        async with httpx.AsyncClient() as client:
            scrapes = [
                (await client.get(f"http://127.0.0.1:{mport}/metrics")).text for _ in range(6)
            ]
            plain = await client.get(f"http://127.0.0.1:{http}/metrics")
        assert [sample(t, "quicproxy_requests_total", **H1_OK) for t in scrapes] == [n] * 6
        text = scrapes[0]
        assert sample(text, "quicproxy_request_duration_seconds_count", protocol="h1") == n
        assert sample(text, "quicproxy_upstream_duration_seconds_count", protocol="h1") == n
        assert sample(text, "quicproxy_quic_handshakes_total") >= 1
        assert plain.status_code == 308  # not served on the public plain-HTTP port
        print(f"per-worker h1 requests: {dict(spread)}; scraped total {n}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await _exit_code(proc)
        out, err = proc.communicate()
        await backend.stop()
    assert code == 0, err
    assert list(tmp_path.glob("quicproxy-metrics-*")) == []  # the parent removed the folder
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ours = [e for e in lines if e["path"].startswith("/r")]  # access log on stdout
    assert len(ours) == n and {e["protocol"] for e in ours} == {"h1"}


async def test_separate_metrics_listener_and_every_family(make_proxy, backend, certs):
    proxy = await make_proxy(backend, metrics={"port": 0})
    for proto in PROTOCOLS:
        assert (await fetch(proxy, certs, proto, "POST", "/echo", b"x" * 100))[0] == 200
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics")).text
        health = await client.get(f"http://127.0.0.1:{proxy.metrics_port}/_gwhealthz")
        other = await client.get(f"http://127.0.0.1:{proxy.metrics_port}/")
        plain = await client.get(http_url(proxy, "/metrics"))
    assert (health.status_code, other.status_code, plain.status_code) == (200, 404, 308)
    for proto in PROTOCOLS:
        ok = {"protocol": proto, "status_class": "2xx", "route": "default"}
        assert sample(text, "quicproxy_requests_total", **ok) == 1
        assert sample(text, "quicproxy_request_bytes_total", protocol=proto) == 100
        assert sample(text, "quicproxy_response_bytes_total", protocol=proto) == 100
        assert sample(text, "quicproxy_upstream_duration_seconds_count", protocol=proto) == 1
    assert sample(text, "quicproxy_quic_handshakes_total") == 1
    assert sample(text, "quicproxy_active_connections", protocol="h3") in (0, 1)
    assert sample(text, "quicproxy_in_flight_requests") == 0


async def test_plain_port_serves_metrics_when_no_metrics_port(proxy, certs):
    assert (await fetch(proxy, certs, "h2", "GET", "/x"))[0] == 200
    async with httpx.AsyncClient() as client:
        resp = await client.get(http_url(proxy, "/metrics"))
    assert resp.status_code == 200
    ok = {"protocol": "h2", "status_class": "2xx", "route": "default"}
    assert sample(resp.text, "quicproxy_requests_total", **ok) == 1


async def test_upstream_errors_are_counted_by_kind(make_proxy, certs):
    proxy = await make_proxy(None, backend=f"http://127.0.0.1:{free_port()}")
    assert (await fetch(proxy, certs, "h1", "GET", "/"))[0] == 502
    assert metrics.value("quicproxy_upstream_errors_total", kind="connect") == 1


class Broken:
    def __getattr__(self, name: str):
        raise RuntimeError("broken metric")


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_failing_metrics_and_limiter_never_break_a_request(
    make_proxy, backend, certs, monkeypatch, proto
):
    proxy = await make_proxy(backend, rate_limit={"enabled": True})
    for name in ("requests", "request_duration", "in_flight", "rate_limited", "bytes_sent"):
        monkeypatch.setattr(metrics, name, Broken())
    def broken_check(*args: object) -> None:
        raise RuntimeError("broken limiter")

    monkeypatch.setattr(proxy.handler.limiter, "check", broken_check)
    status, _, body = await fetch(proxy, certs, proto, "GET", "/still-served")
    assert (status, body) == (200, b"hello from backend /still-served")


async def test_inline_waf_engine_facts_are_labels_on_the_proxy_metrics(
    make_proxy, backend, waf_engine
):
    proxy = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    async with httpx.AsyncClient() as client:
        text = (await client.get(http_url(proxy, "/metrics"))).text
    info = [
        labels
        for (name, labels), value in samples(text).items()
        if name == "quicproxy_waf_info" and value == 1
    ]
    assert len(info) == 1
    facts = dict(info[0])
    crs = "4.25.0" if waf_engine == "coraza" else "3.3.4"
    assert (facts["engine"], facts["crs_version"], facts["paranoia_level"]) == (
        waf_engine,
        crs,
        "1",
    )
    assert sample(text, "quicproxy_waf_rules_loaded", engine=waf_engine) > 400
