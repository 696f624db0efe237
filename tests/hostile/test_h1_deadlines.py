"""HTTP/1.1 deadlines: slow or idle clients are dropped on time, others stay served."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.hostile.raw import (
    exchange,
    fd_count,
    fds_back_to,
    health_seconds,
    status_of,
    tls_context,
)

HEAD = b"GET /slowloris HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"


async def _trickle(
    port: int, closed_after: list[float], stop: asyncio.Event, ssl_ctx: Any = None
) -> None:
    """Send the request head one byte every 0.5 s; note when the proxy closes."""
    started = time.monotonic()
    host = "localhost" if ssl_ctx else "127.0.0.1"
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx)
    try:
        for byte in HEAD:
            if stop.is_set():
                return
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1000), 0.5)  # b"" or the 408: closed
                closed_after.append(time.monotonic() - started)
                return
            except TimeoutError:
                continue
    except ConnectionError:
        closed_after.append(time.monotonic() - started)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(("kind", "count"), [("plain", 200), ("tls", 50)])
async def test_slowloris_connections_are_closed_by_the_header_deadline(
    make_proxy, backend, certs, kind, count
):
    proxy = await make_proxy(backend, timeouts={"header": 2})
    baseline = fd_count()
    closed_after: list[float] = []
    stop = asyncio.Event()
    port, ctx = (proxy.https_port, tls_context(certs)) if kind == "tls" else (proxy.http_port, None)
    attack = [asyncio.ensure_future(_trickle(port, closed_after, stop, ctx)) for _ in range(count)]
    await asyncio.sleep(1)
    latencies = [await health_seconds(proxy) for _ in range(5)]
    await asyncio.wait(attack, timeout=6)
    stop.set()
    await asyncio.gather(*attack)
    assert len(closed_after) == count, "some slowloris connections were never closed"
    assert max(closed_after) < 2 + 1.5, max(closed_after)
    assert max(latencies) < 1.0, latencies
    after = await fds_back_to(baseline)
    print(
        f"slowloris {kind} x{count}: closed after {min(closed_after):.2f}-"
        f"{max(closed_after):.2f} s, health max {max(latencies) * 1000:.0f} ms, "
        f"fds {baseline} -> {after}"
    )
    assert after <= baseline + 2
    assert backend.requests == []


async def test_idle_keepalive_connection_is_closed_after_the_idle_timeout(make_proxy, backend):
    proxy = await make_proxy(backend, timeouts={"idle": 1}, listen={"plain_http": "proxy"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http_port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(65536), 5)
    assert status_of(data) == 200
    while await asyncio.wait_for(reader.read(65536), 5):
        pass  # the rest of the response, then EOF when the idle timeout closes it
    idle = time.monotonic() - started
    writer.close()
    assert 0.9 < idle < 2.5, idle


async def test_silent_connection_is_closed_by_the_header_deadline(make_proxy, backend):
    proxy = await make_proxy(backend, timeouts={"header": 1, "idle": 30})
    baseline = fd_count()
    started = time.monotonic()
    answer = await exchange(proxy.http_port, b"", timeout=5)
    assert answer == b""  # nothing was asked: closed without an answer
    assert time.monotonic() - started < 2
    assert await fds_back_to(baseline) <= baseline + 2


async def test_partial_head_gets_408_at_the_deadline(make_proxy, backend):
    proxy = await make_proxy(backend, timeouts={"header": 1})
    answer = await exchange(proxy.http_port, b"GET / HTTP/1.1\r\nHost: loc", timeout=5)
    assert status_of(answer) == 408


async def test_stalled_request_body_gets_408_and_never_reaches_the_backend(make_proxy, backend):
    proxy = await make_proxy(backend, timeouts={"body": 1}, listen={"plain_http": "proxy"})
    head = (
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\n"
    )  # a body of unknown length is taken in (up to 64 KiB) before the upstream is asked
    started = time.monotonic()
    answer = await exchange(proxy.http_port, head, timeout=10)
    assert status_of(answer) == 408
    assert time.monotonic() - started < 8  # body timeout plus the bounded lingering close
    assert not [r for r in backend.requests if r[1] == "/upload"]
    assert await health_seconds(proxy) < 1.0
