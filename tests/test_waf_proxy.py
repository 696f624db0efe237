"""The WAF in front of the backend, through the running proxy, on h1, h2 and h3,
in both modes (inline engine and remote WAF service), with both engines (Coraza +
CRS 4, ModSecurity + Debian CRS 3) and the real OWASP CRS."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quicproxy import WafConfig
from quicproxy._metrics import metrics
from quicproxy.waf import start_waf_service
from tests.helpers import fetch, free_port

PROTOCOLS = ["h1", "h2", "h3"]
FORM = [("content-type", "application/x-www-form-urlencoded")]
JSON = [("content-type", "application/json")]

ATTACKS = {
    "sqli-query": (
        "GET",
        "/search?q=1%27%20UNION%20SELECT%20username,password%20FROM%20users--",
        None,
        [],
    ),
    "xss-form": ("POST", "/comment", b"text=<script>alert(document.cookie)</script>", FORM),
    "traversal": ("GET", "/download?file=../../../../etc/passwd", None, []),
    "cmdi-json": ("POST", "/api/ping", b'{"host": "127.0.0.1; cat /etc/passwd"}', JSON),
    "scanner-ua": ("GET", "/", None, [("user-agent", "sqlmap/1.7.2#stable (https://sqlmap.org)")]),
    "sqli-cookie": ("GET", "/account", None, [("cookie", "session=1' OR '1'='1' --")]),
    "sqli-referer": ("GET", "/", None, [("referer", "1' UNION ALL SELECT NULL,@@version-- -")]),
}
BENIGN = {
    "browse": (
        "GET",
        "/products/shoes?page=2&sort=price",
        None,
        [("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"), ("accept", "text/html")],
    ),
    "form": ("POST", "/login", b"username=alice&password=correct+horse+battery", FORM),
    "json-api": (
        "POST",
        "/api/orders",
        b'{"item": 42, "qty": 2, "note": "gift wrap please"}',
        JSON,
    ),
    "upload": (
        "POST",
        "/upload",
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + bytes(range(256)) * 8 + b"\r\n--XyZ--\r\n",
        [("content-type", "multipart/form-data; boundary=XyZ")],
    ),
}


def multipart_file(size: int) -> tuple[bytes, list[tuple[str, str]]]:
    """A browser-style file upload of ``size`` random bytes."""
    head = (
        b'--QpBoundary\r\nContent-Disposition: form-data; name="file"; '
        b'filename="video.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    body = head + os.urandom(size) + b"\r\n--QpBoundary--\r\n"
    return body, [("content-type", "multipart/form-data; boundary=QpBoundary")]


@pytest.fixture(params=["inline", "service"])
async def waf_settings(request, waf_engine) -> AsyncIterator[dict[str, Any]]:
    """Proxy `waf:` settings for each mode and engine; service runs a real WAF service."""
    if request.param == "inline":
        yield {"mode": "inline", "engine": waf_engine}
        return
    config = WafConfig(mode="inline", engine=waf_engine)
    service = await start_waf_service(config, "127.0.0.1", 0)
    yield {"mode": "service", "url": f"http://127.0.0.1:{service.port}", "timeout_ms": 5000}
    await service.aclose()


@pytest.fixture
async def waf_proxy(make_proxy, backend, waf_settings):
    return await make_proxy(backend, waf=waf_settings)


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_attack_is_blocked_and_never_reaches_backend(
    waf_proxy, backend, certs, proto, attack
):
    method, path, body, headers = ATTACKS[attack]
    status, resp_headers, resp_body = await fetch(
        waf_proxy, certs, proto, method, path, body, headers
    )
    assert status == 403, resp_body
    assert resp_headers["x-waf-rule-id"]
    assert all(part.isdigit() for part in resp_headers["x-waf-rule-id"].split(","))
    assert b"blocked" in resp_body and len(resp_body) < 300
    assert backend.requests == []


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("case", sorted(BENIGN))
async def test_ordinary_traffic_passes(waf_proxy, backend, certs, proto, case):
    method, path, body, headers = BENIGN[case]
    status, resp_headers, resp_body = await fetch(
        waf_proxy, certs, proto, method, path, body, headers
    )
    assert status == 200, resp_body
    assert "x-waf-rule-id" not in resp_headers
    assert [r[1] for r in backend.requests] == [path]


@pytest.mark.parametrize("fail, expected", [("closed", 503), ("open", 200)])
@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_waf_service_down_follows_fail_mode(
    make_proxy, backend, certs, fail, expected, proto
):
    proxy = await make_proxy(
        backend,
        waf={
            "mode": "service",
            "fail": fail,
            "timeout_ms": 500,
            "url": f"http://127.0.0.1:{free_port()}",
        },
    )
    status, _, body = await fetch(proxy, certs, proto, "GET", "/hello")
    assert status == expected, body
    assert len(backend.requests) == (1 if fail == "open" else 0)
    verdict = "fail_open" if fail == "open" else "unavailable"
    assert metrics.value("quicproxy_waf_decisions_total", engine="service", verdict=verdict) == 1


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_10mb_upload_over_inspection_limit_is_rejected_by_default(
    waf_proxy, backend, certs, proto
):
    data, ctype = multipart_file(10 << 20)
    status, _, _ = await fetch(waf_proxy, certs, proto, "POST", "/sha256", data, ctype)
    assert status == 413
    assert backend.requests == []


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_10mb_upload_forwarded_whole_after_inspecting_its_start(
    make_proxy, backend, certs, proto, waf_settings
):
    proxy = await make_proxy(backend, waf={**waf_settings, "over_limit": "inspect-prefix"})
    data, ctype = multipart_file(10 << 20)
    status, _, body = await fetch(proxy, certs, proto, "POST", "/sha256", data, ctype)
    assert status == 200, body
    assert json.loads(body) == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


async def test_attack_in_inspected_prefix_of_large_body_is_blocked(
    make_proxy, backend, certs, waf_engine
):
    waf = {"mode": "inline", "engine": waf_engine, "over_limit": "inspect-prefix"}
    proxy = await make_proxy(backend, waf=waf)
    body = b"q=1' UNION SELECT password FROM users--&pad=" + b"a" * (1 << 20)
    status, _, _ = await fetch(proxy, certs, "h3", "POST", "/form", body, FORM)
    assert status == 403
    assert backend.requests == []


async def test_detection_only_forwards_but_counts(make_proxy, backend, certs, waf_engine):
    waf = {"mode": "inline", "engine": waf_engine, "rule_engine": "DetectionOnly"}
    proxy = await make_proxy(backend, waf=waf)
    method, path, body, headers = ATTACKS["sqli-query"]
    status, _, _ = await fetch(proxy, certs, "h2", method, path, body, headers)
    assert status == 200
    assert len(backend.requests) == 1


async def test_block_is_logged_as_one_structured_line(
    make_proxy, backend, certs, caplog, waf_engine
):
    proxy = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    method, path, body, headers = ATTACKS["sqli-query"]
    with caplog.at_level("WARNING", logger="quicproxy"):
        status, resp_headers, _ = await fetch(proxy, certs, "h3", method, path, body, headers)
    assert status == 403
    lines = [json.loads(r.getMessage()) for r in caplog.records if "waf_block" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert (line["client"], line["method"], line["path"], line["protocol"]) == (
        "127.0.0.1",
        "GET",
        "/search",
        "HTTP/3",
    )
    assert ",".join(line["rule_ids"]) == resp_headers["x-waf-rule-id"]
    assert metrics.value("quicproxy_waf_decisions_total", engine=waf_engine, verdict="block") == 1


def _parity_cases() -> list[tuple[str, str, str, list[tuple[str, str]], bytes]]:
    """The WAF corpus, less the cases whose framing headers h2/h3 clients may not send."""
    from tests.waf.corpus import ATTACKS as CORPUS_ATTACKS
    from tests.waf.corpus import BENIGN as CORPUS_BENIGN

    framing = {"content-length", "transfer-encoding", "connection"}
    return [
        case
        for case in CORPUS_ATTACKS + CORPUS_BENIGN
        if case[1] != "HEAD" and not framing & {name for name, _ in case[3]}
    ]


async def test_same_verdict_on_h1_h2_h3_for_the_corpus(
    make_proxy, backend, certs, waf_engine, tmp_path
):
    # h3 carries no Host header: the engine must see :authority as Host (a rule
    # refuses requests without one), and an HTTP/3 protocol string the CRS accepts.
    no_host = tmp_path / "no-host.conf"
    no_host.write_text(
        'SecRule &REQUEST_HEADERS:Host "@eq 0" '
        "\"id:12360,phase:1,deny,status:421,log,msg:'no Host header'\"\n"
    )
    waf = {"mode": "inline", "engine": waf_engine, "extra_rules": [str(no_host)]}
    proxy = await make_proxy(backend, waf=waf)
    differ = []
    for name, method, path, headers, body in _parity_cases():
        seen = set()
        for proto in PROTOCOLS:
            status, resp_headers, _ = await fetch(
                proxy, certs, proto, method, path, body or None, headers
            )
            seen.add((status, resp_headers.get("x-waf-rule-id")))
        if len(seen) != 1:
            differ.append((name, sorted(seen, key=str)))
        assert (421, "12360") not in seen, name
    assert differ == []


async def test_the_engines_time_and_the_wait_beyond_it_are_measured(
    make_proxy, backend, certs, waf_engine
):
    """The WAF's time splits into the engine's own evaluation and the wait beyond it
    (hand-overs, queueing); the wait is counted for bodiless requests only, whose WAF
    time is not also the client's upload time."""
    proxy = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    for proto in PROTOCOLS:
        status, _, _ = await fetch(proxy, certs, proto, "GET", "/products?page=2", None, [])
        assert status == 200
    method, path, body, headers = BENIGN["form"]
    assert (await fetch(proxy, certs, "h2", method, path, body, headers))[0] == 200

    def value(name: str) -> float:
        return metrics.value(f"quicproxy_waf_{name}", engine=waf_engine)

    assert value("engine_seconds_count") == 4
    assert value("wait_seconds_count") == 3
    assert 0 < value("engine_seconds_sum") < value("evaluation_seconds_sum")
    assert 0 < value("wait_seconds_sum") < value("evaluation_seconds_sum")
