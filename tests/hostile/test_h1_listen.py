"""TCP listeners: per-address connection cap and the listen backlog the kernel got."""

from __future__ import annotations

import asyncio
import subprocess
import time

from tests.helpers import need_tool
from tests.hostile.raw import (
    exchange,
    fd_count,
    fds_back_to,
    health_seconds,
    status_of,
    tls_context,
)


async def _released(proxy, within: float = 3.0) -> None:
    """Wait until the proxy has seen every client connection go."""
    deadline = time.monotonic() + within
    while len(proxy.per_address) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(proxy.per_address) == 0


async def test_connections_over_the_per_address_cap_are_closed_at_once(make_proxy, backend):
    proxy = await make_proxy(backend, limits={"max_connections_per_address": 20})
    baseline = fd_count()
    held = [await asyncio.open_connection("127.0.0.1", proxy.http_port) for _ in range(20)]
    await asyncio.sleep(0.2)  # the proxy has accepted (and counted) them all
    started = time.monotonic()
    refused = await exchange(
        proxy.http_port, b"GET /_gwhealthz HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout=3
    )
    assert refused == b"" and time.monotonic() - started < 1
    assert proxy.per_address.refused >= 1
    assert await health_seconds(proxy, local="127.0.0.2") < 1.0  # another address is served
    for _, writer in held:
        writer.close()
    await _released(proxy)
    assert await health_seconds(proxy) < 1.0  # under the cap again
    assert await fds_back_to(baseline) <= baseline + 2
    assert backend.requests == []


async def test_the_cap_holds_on_the_tls_port_too(make_proxy, backend, certs):
    proxy = await make_proxy(backend, limits={"max_connections_per_address": 5})
    ctx = tls_context(certs)
    held = [await asyncio.open_connection("localhost", proxy.https_port, ssl=ctx) for _ in range(5)]
    await asyncio.sleep(0.2)
    answer = await exchange(
        proxy.https_port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", ssl_ctx=ctx, timeout=3
    )
    assert status_of(answer) == 0  # closed without an answer
    for _, writer in held:
        writer.transport.abort()
    await _released(proxy)
    assert await health_seconds(proxy) < 1.0


def _backlog(port: int) -> int:
    out = subprocess.run(
        [need_tool("ss", "apt-get install iproute2"), "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q ...: Send-Q is the backlog of a listener


async def test_the_kernel_gets_the_configured_backlog(make_proxy, backend):
    proxy = await make_proxy(backend)
    assert _backlog(proxy.http_port) >= 1024
    assert _backlog(proxy.https_port) >= 1024
    other = await make_proxy(backend, listen={"backlog": 2000})
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    assert _backlog(other.http_port) == min(2000, somaxconn)
