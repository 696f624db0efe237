"""Attack clients for the hostile suite: raw TCP/TLS bytes, raw h2 frames, raw h3 headers."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from typing import Any

import h2.config
import h2.connection
import h2.events

from quicproxy import Proxy
from quicproxy._client import _Pending
from tests.helpers import h3


def fd_count() -> int:
    """Open file descriptors of this process (the proxy runs in it)."""
    return len(os.listdir("/proc/self/fd"))


async def fds_back_to(baseline: int, slack: int = 2, within: float = 5.0) -> int:
    """Wait until at most ``baseline + slack`` fds are open; the count reached."""
    deadline = time.monotonic() + within
    while fd_count() > baseline + slack and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return fd_count()


def tls_context(certs: tuple[str, str], alpn: str = "http/1.1") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs[0])
    ctx.set_alpn_protocols([alpn])
    return ctx


async def exchange(
    port: int,
    data: bytes,
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    timeout: float = 5.0,
    local: str | None = None,
) -> bytes:
    """Send ``data`` on a new connection, read until the proxy closes (or ``timeout``)."""
    host = "localhost" if ssl_ctx else "127.0.0.1"
    local_addr = (local, 0) if local else None
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx, local_addr=local_addr)
    try:
        writer.write(data)
        await writer.drain()
        out = bytearray()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), end - loop.time())
            except (TimeoutError, ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        writer.transport.abort()


def status_of(answer: bytes) -> int:
    """Status code of the first HTTP/1.x response in ``answer`` (0 if none)."""
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


async def health_seconds(proxy: Proxy, local: str | None = None) -> float:
    """Seconds a fresh plain connection takes to get 200 from /_gwhealthz."""
    started = time.monotonic()
    answer = await exchange(
        proxy.http_port,
        b"GET /_gwhealthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        timeout=5,
        local=local,
    )
    assert status_of(answer) == 200, answer[:200]
    return time.monotonic() - started


async def h2_request(
    proxy: Proxy, certs: tuple[str, str], headers: list[tuple[bytes, bytes]], timeout: float = 5
) -> tuple[int, bytes, str]:
    """One request on a raw h2 connection, headers sent as given (no client checks).

    Returns (status or 0, body, how it ended: 'ended', 'reset', 'closed')."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    reader, writer = await asyncio.open_connection(
        "localhost", proxy.https_port, ssl=tls_context(certs, "h2")
    )
    status, body, how = 0, bytearray(), "closed"
    try:
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=True)
        writer.write(conn.data_to_send())
        async with asyncio.timeout(timeout):
            while how == "closed":
                data = await reader.read(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        how = "ended"
                    elif isinstance(event, h2.events.StreamReset):
                        how = "reset"
                writer.write(conn.data_to_send())
    finally:
        writer.transport.abort()
    return status, bytes(body), how


async def h3_request(
    proxy: Proxy, certs: tuple[str, str], headers: list[tuple[bytes, bytes]], timeout: float = 5
) -> tuple[int, bytes]:
    """One request over HTTP/3 with the header block sent as given; (status, body)."""
    async with h3(proxy, certs) as client:
        proto: Any = client.proto
        sid = proto._quic.get_next_available_stream_id()
        pending = _Pending(asyncio.get_running_loop().create_future(), keep=True, hasher=None)
        proto.pending[sid] = pending
        proto.h3.send_headers(sid, headers, end_stream=True)
        proto.transmit()
        await asyncio.wait_for(pending.done, timeout)
        return pending.status, b"".join(pending.chunks)
