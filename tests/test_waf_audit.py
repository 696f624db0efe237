"""The WAF audit log through the running proxy: one JSON record per refused (or scored)
request, the same fields on h1, h2 and h3, inline and through the WAF service, with
both engines; secrets masked; a flood kept within the rate bound, drops counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quicproxy import WafConfig
from quicproxy._metrics import metrics
from quicproxy.waf import start_waf_service
from tests.helpers import fetch

PROTOCOLS = ["h1", "h2", "h3"]
SQLI = "/search?q=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
SECRET = "1' OR '1'='1' --"
"A session cookie that is an attack: its value must not reach the audit log."

VARYING = {"time", "request_id", "protocol"}
"What legitimately differs between two records of the same request."


@pytest.fixture
async def waf_service(waf_engine: str) -> AsyncIterator[str]:
    """A real WAF service (the engine at its defaults); its URL."""
    service = await start_waf_service(WafConfig(mode="inline", engine=waf_engine), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{service.port}"
    await service.aclose()


async def test_audit_records_are_the_same_on_h1_h2_h3_inline_and_service(
    make_proxy, backend, certs, waf_engine, waf_service
):
    inline = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    service = await make_proxy(
        backend, waf={"mode": "service", "url": waf_service, "timeout_ms": 5000}
    )
    seen: list[dict[str, Any]] = []
    for proxy in (inline, service):
        lines: list[str] = []
        proxy.handler.audit.sink = lines.append
        for proto in PROTOCOLS:
            status, headers, _ = await fetch(proxy, certs, proto, "GET", SQLI)
            assert status == 403
            assert len(lines) == 1, lines
            record = json.loads(lines.pop())
            assert record["request_id"] == headers["x-request-id"]  # the access log's id
            assert record["protocol"] == proto
            seen.append(record)
    first = seen[0]
    assert first["client"] == "127.0.0.1" and first["host"] == "localhost"
    assert (first["method"], first["path"]) == ("GET", "/search")
    assert (first["engine"], first["mode"], first["verdict"], first["status"]) == (
        waf_engine,
        "block",
        "block",
        403,
    )
    assert (first["paranoia_level"], first["anomaly_threshold"]) == (1, 5)
    assert first["scores"]["inbound"] >= 5 and first["scores"]["outbound"] is None
    assert first["would_refuse"] is True
    by_id = {rule["id"]: rule for rule in first["rules"]}
    assert by_id["942100"]["variable"] == "ARGS:q"
    assert "UNION SELECT" in by_id["942100"]["data"]
    assert "949110" in by_id
    assert all(not (record.keys() ^ first.keys()) for record in seen)
    same = [{k: v for k, v in r.items() if k not in VARYING} for r in seen]
    assert all(record == same[0] for record in same), same
    assert metrics.value("quicproxy_waf_audit_records_total") == 6


async def test_secret_cookie_and_header_values_are_masked(make_proxy, backend, certs, waf_engine):
    proxy = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    lines: list[str] = []
    proxy.handler.audit.sink = lines.append
    token = "Bearer 9f8e7d6c5b4a"
    headers = [("cookie", f"theme=dark; session={SECRET}"), ("authorization", token)]
    status, _, _ = await fetch(proxy, certs, "h2", "GET", SQLI + "%20" + token[7:], None, headers)
    assert status == 403
    assert len(lines) == 1
    line = lines[0]
    assert "OR '1'='1" not in line and "9f8e7d6c5b4a" not in line
    record = json.loads(line)
    cookie_rules = [r for r in record["rules"] if r["variable"] == "REQUEST_COOKIES:session"]
    assert cookie_rules and all(r["data"] == "***" for r in cookie_rules)
    query = [r for r in record["rules"] if r["variable"] == "ARGS:q"]
    assert query and any("UNION SELECT" in r["data"] and "***" in r["data"] for r in query)


async def test_matched_data_is_cut_to_the_limit(make_proxy, backend, certs, waf_engine):
    waf = {"mode": "inline", "engine": waf_engine, "audit": {"data_limit": 40}}
    proxy = await make_proxy(backend, waf=waf)
    lines: list[str] = []
    proxy.handler.audit.sink = lines.append
    long = SQLI + "%20" + "x" * 3000
    assert (await fetch(proxy, certs, "h1", "GET", long))[0] == 403
    rules = json.loads(lines[0])["rules"]
    assert rules and all(len(r["data"].encode()) <= 40 + 3 for r in rules)


async def test_benign_requests_are_not_recorded_unless_asked(
    make_proxy, backend, certs, waf_engine
):
    for record, expected in (("refused", 0), ("scored", 1), ("all", 2)):
        waf = {
            "mode": "inline",
            "engine": waf_engine,
            "detection_paranoia_level": 2,
            "audit": {"record": record},
        }
        proxy = await make_proxy(backend, waf=waf)
        lines: list[str] = []
        proxy.handler.audit.sink = lines.append
        # plain; then one that PL2 rules score 3 (below the threshold at either level)
        for path in ("/products?page=2", "/?q=a-b-c-d-e-f-g-h-i-j-k-l-m-n"):
            assert (await fetch(proxy, certs, "h2", "GET", path))[0] == 200
        assert len(lines) == expected, (record, lines)
        if record == "scored":
            scored = json.loads(lines[0])
            assert scored["verdict"] == "detect" and scored["would_refuse"] is False
            assert scored["scores"]["inbound"] == 0
            assert scored["scores"]["inbound_detection"] == 3
            assert scored["would_refuse_at_detection_level"] is False


async def _flood(port: int, path: str, connections: int, each: int) -> int:
    """``connections`` keep-alive HTTP/1.1 connections, each sending ``each`` GETs
    pipelined in batches; the number of 403 answers read."""
    request = f"GET {path} HTTP/1.1\r\nhost: localhost\r\nuser-agent: flood\r\n\r\n".encode()

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = 0
        try:
            for start in range(0, each, 50):
                batch = min(50, each - start)
                writer.write(request * batch)
                got = 0
                buffer = b""
                while got < batch:
                    data = await reader.read(65536)
                    assert data, "connection closed during the flood"
                    buffer += data
                    got = buffer.count(b"HTTP/1.1 ")
                refused += buffer.count(b"HTTP/1.1 403 ")
        finally:
            writer.close()
        return refused

    return sum(await asyncio.gather(*(one() for _ in range(connections))))


async def test_a_flood_of_attacks_keeps_the_audit_log_at_its_rate(
    make_proxy, backend, certs, tmp_path
):
    """5,000 attacks: the file holds at most burst + rate x duration records, every
    other one is counted as dropped, and each record written is whole JSON."""
    path = tmp_path / "audit.jsonl"
    rate, burst = 20.0, 50
    waf = {
        "mode": "inline",
        "engine": "coraza",
        "audit": {"log": str(path), "rate": rate, "burst": burst},
    }
    from tests.conftest import require_engine

    require_engine("coraza")
    proxy = await make_proxy(
        backend, waf=waf, listen={"plain_http": "proxy"}, log={"access": "off"}
    )
    started = time.monotonic()
    refused = await asyncio.wait_for(_flood(proxy.http_port, SQLI, 10, 500), 120)
    elapsed = time.monotonic() - started
    assert refused == 5000
    assert backend.requests == []
    proxy.handler.audit.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    written = metrics.value("quicproxy_waf_audit_records_total")
    dropped = metrics.value("quicproxy_waf_audit_dropped_total")
    assert len(records) == written
    assert burst <= len(records) <= burst + rate * elapsed + 1
    assert written + dropped == 5000
    assert all(r["verdict"] == "block" and r["rules"] for r in records)
    print(f"flood: {elapsed:.1f} s, {len(records)} records, {dropped:.0f} dropped")


@pytest.mark.parametrize(
    "audit, key",
    [
        ({"record": "some"}, "waf.audit.record"),
        ({"rate": 0}, "waf.audit.rate"),
        ({"mask": ["cookie:"]}, "waf.audit.mask[0]"),
        ({"log": "/nonexistent-dir/audit.log"}, "waf.audit.log"),
    ],
)
def test_bad_audit_settings_name_the_key(audit: dict[str, Any], key: str) -> None:
    from quicproxy import load_config
    from quicproxy._errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"waf": {"mode": "inline", "audit": audit}})
    assert str(caught.value).startswith(f"config error: {key}: "), str(caught.value)


async def test_an_audit_log_nobody_reads_never_stalls_requests(
    make_proxy, backend, certs, tmp_path
):
    """The audit file is a pipe whose reader never reads: once the pipe and the
    writer's bounded queue are full, records are dropped and counted, and every
    request is still answered at once."""
    from tests.conftest import require_engine

    require_engine("coraza")
    fifo = tmp_path / "audit.pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read (yet)
    try:
        waf = {
            "mode": "inline",
            "engine": "coraza",
            "audit": {"log": str(fifo), "rate": 1e6, "burst": 1000000},
        }
        proxy = await make_proxy(
            backend, waf=waf, listen={"plain_http": "proxy"}, log={"access": "off"}
        )
        long = SQLI + "%20" + "x" * 400  # ~3 KB records: 1,500 of them overflow pipe + queue
        refused = await asyncio.wait_for(_flood(proxy.http_port, long, 10, 150), 120)
        assert refused == 1500
        started = time.monotonic()
        status, _, _ = await fetch(proxy, certs, "h2", "GET", "/products?page=2")
        assert status == 200 and time.monotonic() - started < 2.0
        dropped = metrics.value("quicproxy_waf_audit_dropped_total")
        written = metrics.value("quicproxy_waf_audit_records_total")
        assert dropped > 0 and written + dropped == 1500
    finally:
        with contextlib.suppress(BlockingIOError):
            while os.read(reader, 1 << 20):  # let the writer thread finish and stop
                pass
        os.close(reader)
