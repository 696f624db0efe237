"""The WAF service over real loopback sockets, and the proxy's client for it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from quicproxy._config import WafConfig
from quicproxy.waf import WafClient, WafService, WafUnavailable, start_waf_service
from tests.helpers import free_port

from .corpus import FORM, JSON, _multipart
from .helpers import evaluate, inline_config, make_request

SQLI = "/products?id=1%27%20OR%20%271%27=%271"


@pytest.fixture
async def service(waf_engine: str) -> AsyncIterator[WafService]:
    svc = await start_waf_service(inline_config(engine=waf_engine), "127.0.0.1", 0)
    yield svc
    await svc.aclose()


@pytest.fixture
async def http(service: WafService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as client:
        yield client


def client_for(port: int, **extra: Any) -> WafClient:
    return WafClient(WafConfig(mode="service", url=f"http://127.0.0.1:{port}", **extra))


def evaluate_json(uri: str, **extra: Any) -> dict[str, Any]:
    data = {
        "method": "GET",
        "uri": uri,
        "headers": {"host": "shop.example.com", "user-agent": "Mozilla/5.0", "accept": "*/*"},
        "remote_addr": "198.51.100.7",
        "server_addr": "10.0.0.2",
        "server_port": 443,
    }
    data.update(extra)
    return data


# -- the HTTP contract --------------------------------------------------------------------


async def test_evaluate_blocked(http: httpx.AsyncClient) -> None:
    answer = await http.post("/evaluate", json=evaluate_json(SQLI))
    assert answer.status_code == 200
    data = answer.json()
    assert data["allowed"] is False
    assert data["status_code"] == 403
    assert data["rule_id"] == "942100"
    assert data["message"] == "SQL Injection Attack Detected via libinjection"
    assert data["severity"] == "CRITICAL"
    assert data["rule_ids"][-1] == "949110"
    assert data["matches"][0]["id"] == "942100"
    assert data["matches"][0]["variable"] == "ARGS:id"
    assert data["scores"][0] >= 5


async def test_evaluate_allowed(http: httpx.AsyncClient, waf_engine: str) -> None:
    answer = await http.post("/evaluate", json=evaluate_json("/products?page=2"))
    assert answer.json() == {
        "allowed": True,
        "status_code": 200,
        "message": "",
        "rule_id": None,
        "severity": None,
        "rule_ids": [],
        "messages": [],
        "matches": [],
        "scores": [0, 0, 0, 0],
        "engine": waf_engine,
        "paranoia_level": 1,
        "detection_paranoia_level": 1,
        "anomaly_threshold": 5,
    }


async def test_evaluate_body_and_header_pairs(http: httpx.AsyncClient) -> None:
    form = evaluate_json(
        "/login",
        method="POST",
        headers=[["host", "x"], ["content-type", FORM[0][1]], ["user-agent", "Mozilla/5.0"]],
        body="user=admin%27%20OR%201%3D1--",
        protocol="HTTP/2",
        remote_port=5555,
    )
    assert (await http.post("/evaluate", json=form)).json()["rule_id"] == "942100"
    binary = evaluate_json(
        "/api",
        method="POST",
        headers={"host": "x", **dict(JSON)},
        body_b64=base64.b64encode(b'{"q": "<script>alert(1)</script>"}').decode(),
    )
    assert (await http.post("/evaluate", json=binary)).json()["rule_id"] == "941100"


async def test_health(http: httpx.AsyncClient) -> None:
    answer = await http.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "healthy"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"uri": "/"}', "'method' is required"),
        (b'{"method": "GET", "uri": "/", "headers": 5}', "'headers' must be"),
        (b'{"method": "GET", "uri": "/", "body_b64": "***"}', "not valid base64"),
        (b'{"method": "GET", "uri": "/", "server_port": 70000}', "port number"),
    ],
)
async def test_bad_input_is_400(http: httpx.AsyncClient, body: bytes, error: str) -> None:
    answer = await http.post("/evaluate", content=body)
    assert answer.status_code == 400
    assert error in answer.json()["error"]
    # The service is still fine, on the same connection.
    assert (await http.get("/health")).status_code == 200


async def test_oversized_request_is_413(http: httpx.AsyncClient, service: WafService) -> None:
    answer = await http.post("/evaluate", content=b"x" * (service.max_request + 1))
    assert answer.status_code == 413


async def test_unknown_path_and_method(http: httpx.AsyncClient) -> None:
    assert (await http.get("/nope")).status_code == 404
    assert (await http.get("/evaluate")).status_code == 405


async def test_metrics(http: httpx.AsyncClient) -> None:
    await http.post("/evaluate", json=evaluate_json(SQLI))
    await http.post("/evaluate", json=evaluate_json("/"))
    await http.post("/evaluate", content=b"{")
    text = (await http.get("/metrics")).text
    assert "waf_requests_evaluated_total 2.0\n" in text
    assert "waf_requests_blocked_total 1.0\n" in text
    assert 'waf_errors_total{kind="bad_request"} 1.0\n' in text
    assert 'waf_evaluation_seconds_bucket{le="+Inf"} 2.0\n' in text
    assert "waf_evaluation_seconds_count 2.0\n" in text
    assert "# TYPE waf_evaluation_seconds histogram" in text
    info = next(line for line in text.splitlines() if line.startswith("waf_info{"))
    assert info.endswith("} 1.0")
    crs = "4.25.0" if 'engine="coraza"' in info else "3.3.4"
    assert f'crs_version="{crs}"' in info and 'paranoia_level="1"' in info
    rules = next(line for line in text.splitlines() if line.startswith("waf_rules_loaded{"))
    assert float(rules.split()[-1]) > 400


# -- the client ---------------------------------------------------------------------------


async def test_client_decisions(service: WafService) -> None:
    client = client_for(service.port)
    try:
        blocked = await evaluate(client, "GET", SQLI)
        assert not blocked.allowed and blocked.status == 403
        assert blocked.rule_ids[0] == "942100" and blocked.severity == "CRITICAL"
        body = b'{"user": {"id": "1 UNION SELECT password FROM users--"}}'
        assert "942100" in (await evaluate(client, "POST", "/api", JSON, body)).rule_ids
        ctype, photo = _multipart("beach.jpg", b"\xff\xd8\xff\xe0 not utf-8")
        ok = await evaluate(client, "POST", "/upload", [("content-type", ctype)], photo)
        assert ok.allowed, ok  # sent as body_b64
        ctype, shell = _multipart("shell.php", b"\xff\xfe<?php system($_GET['c']); ?>")
        php = await evaluate(client, "POST", "/upload", [("content-type", ctype)], shell)
        assert php.rule_ids[0] == "933110"
    finally:
        await client.aclose()


async def test_client_reuses_one_connection(service: WafService) -> None:
    client = client_for(service.port)
    try:
        for i in range(50):
            decision = await evaluate(client, "GET", f"/items?page={i}")
            assert decision.allowed
    finally:
        await client.aclose()
    assert client.connects == 1
    assert service.metrics.connections == 1
    assert service.metrics.evaluated == 50


async def test_client_pool_is_bounded(service: WafService) -> None:
    client = client_for(service.port, pool_size=3)
    try:
        decisions = await asyncio.gather(
            *(evaluate(client, "GET", SQLI if i % 2 else "/") for i in range(40))
        )
    finally:
        await client.aclose()
    assert [d.allowed for d in decisions] == [i % 2 == 0 for i in range(40)]
    assert 1 <= service.metrics.connections <= 3
    assert client.connects == service.metrics.connections


async def test_client_survives_service_restart() -> None:
    port = free_port()
    first = await start_waf_service(inline_config(), "127.0.0.1", port)
    client = client_for(port)
    try:
        assert (await evaluate(client, "GET", "/")).allowed
        await first.aclose()  # closes the kept-alive connection
        second = await start_waf_service(inline_config(), "127.0.0.1", port)
        try:
            assert not (await evaluate(client, "GET", SQLI)).allowed
        finally:
            await second.aclose()
    finally:
        await client.aclose()
    assert client.connects == 2


async def test_client_unavailable_when_service_stopped(service: WafService) -> None:
    port = service.port
    await service.aclose()
    client = client_for(port)
    with pytest.raises(WafUnavailable, match="connect to 127.0.0.1:[0-9]+ failed"):
        await evaluate(client, "GET", "/")
    await client.aclose()


async def test_client_times_out_on_silent_service() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = client_for(port, timeout_ms=200)
    started = time.monotonic()
    try:
        with pytest.raises(WafUnavailable, match="within 200 ms"):
            await evaluate(client, "GET", "/")
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the client did connect"
    assert 0.19 < time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",
        b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"allow": 1}\n',
        b'HTTP/1.1 500 Oops\r\nContent-Length: 17\r\n\r\n{"error": "boom"}',
        b"garbage\r\n\r\n",
    ],
)
async def test_client_unavailable_on_bad_answer(answer: bytes) -> None:
    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(wrong, "127.0.0.1", 0)
    client = client_for(server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(WafUnavailable):
            await evaluate(client, "GET", "/")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


class ScriptedService:
    """A raw HTTP/1.1 server standing in for the WAF service: each connection answers its
    requests by the script (``"ok"``: an allowing verdict, kept alive; ``"drop"``: the
    request read whole, then the connection closed unanswered; ``"huge"``: an answer
    over the client's limit). Connections take script lines in turn, one per request."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def start(self) -> ScriptedService:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(await reader.readexactly(length))
                step = self.script.pop(0) if self.script else "ok"
                if step == "drop":
                    break
                answer = b'{"allowed": true}' if step == "ok" else b" " * (2 << 20)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_client_sends_again_when_a_kept_alive_connection_fails_under_it() -> None:
    """The service closes a kept-alive connection as the evaluation arrives (after
    reading it: the client could not see it coming). The verdict is a pure function of
    the request, so the pool sends it once more on a new connection."""
    service = await ScriptedService(["ok", "drop"]).start()
    client = client_for(service.port)
    try:
        assert (await evaluate(client, "GET", "/first")).allowed
        assert (await evaluate(client, "POST", "/second", body=b"x" * 1000)).allowed
    finally:
        await client.aclose()
        await service.stop()
    assert service.connections == 2 and client.connects == 2
    assert len(service.requests) == 3 and service.requests[1] == service.requests[2]


async def test_client_does_not_resend_on_a_fresh_connection() -> None:
    """A new connection closed unanswered is the service failing, not a stale keep-alive:
    one delivery, then WafUnavailable (the proxy fails closed or open)."""
    service = await ScriptedService(["drop"]).start()
    client = client_for(service.port)
    try:
        with pytest.raises(WafUnavailable, match="closed the connection"):
            await evaluate(client, "GET", "/")
    finally:
        await client.aclose()
        await service.stop()
    assert service.connections == 1 and len(service.requests) == 1


async def test_client_refuses_an_oversized_answer_and_drops_its_connection() -> None:
    service = await ScriptedService(["huge", "ok"]).start()
    client = client_for(service.port)
    try:
        with pytest.raises(WafUnavailable, match="answer too large"):
            await evaluate(client, "GET", "/")
        assert (await evaluate(client, "GET", "/next")).allowed
    finally:
        await client.aclose()
        await service.stop()
    assert service.connections == 2  # the one mid-answer was never pooled


# -- the CLI entry point ------------------------------------------------------------------


async def test_run_waf_service_stops_on_sigterm(waf_engine: str) -> None:
    port = free_port()
    code = (
        "import sys; from quicproxy._config import WafConfig; "
        "from quicproxy.waf import run_waf_service; "
        f"config = WafConfig(mode='inline', engine='{waf_engine}'); "
        f"sys.exit(run_waf_service(config, '127.0.0.1', {port}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):
                try:
                    answer = await http.get(f"http://127.0.0.1:{port}/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("service did not come up")
        assert answer.json() == {"status": "healthy"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_run_waf_service_reports_config_error() -> None:
    from quicproxy.waf import run_waf_service

    config = inline_config(library="/nonexistent/libmodsecurity.so.3")
    assert run_waf_service(config, "127.0.0.1", 0) == 2


def test_make_request_helper_sets_length() -> None:
    request = make_request("POST", "/", body=b"abc")
    assert ("content-length", "3") in request.headers


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"GET /health HTTP/9.9\r\n\r\n", 505),
        (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_http_is_refused_with_its_status_and_closed(
    service: WafService, raw: bytes, status: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(raw)
        answer = await asyncio.wait_for(reader.read(), 5)  # read to the close
    finally:
        writer.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in answer and b'{"error": ' in answer


async def test_chunked_evaluate_request_is_read(service: WafService) -> None:
    body = json.dumps(evaluate_json("/?q=' OR 1=1 --")).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        half = len(body) // 2
        writer.write(
            b"POST /evaluate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n"
            % (half, body[:half], len(body) - half, body[half:])
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        assert answer["allowed"] is False and answer["rule_ids"]
    finally:
        writer.close()
