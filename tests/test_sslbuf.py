"""The shared TLS receive buffer (_sslbuf.py): many TLS connections reading at once
through one buffer per thread each get their own bytes, and a proxy's TLS connections
use it (no 256 KiB buffer of their own)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

from quicproxy._sslbuf import SharedBufferSSLProtocol, _thread_buffer
from tests.helpers import https_url, tcp_client


async def test_concurrent_tls_uploads_arrive_whole(proxy, certs):
    """16 uploads of 2 MiB at once (8 over h1, 8 over h2), each on its own connection:
    the backend hashes what it got, which must be what each client sent."""
    bodies = [os.urandom(2 << 20) for _ in range(16)]

    async def upload(i: int, data: bytes) -> str:
        async with tcp_client(certs, http2=i % 2 == 1) as client:
            resp = await client.post(https_url(proxy, "/sha256"), content=data)
            assert resp.status_code == 200
            return str(json.loads(resp.content)["sha256"])

    got = await asyncio.gather(*(upload(i, b) for i, b in enumerate(bodies)))
    assert got == [hashlib.sha256(b).hexdigest() for b in bodies]


async def test_proxy_tls_connections_read_through_the_thread_buffer(proxy, certs):
    async with tcp_client(certs, http2=True) as client:
        resp = await client.get(https_url(proxy, "/x"))
        assert resp.status_code == 200
        (conn,) = proxy._conns
        protocol = conn.writer.transport._ssl_protocol
        assert isinstance(protocol, SharedBufferSSLProtocol)
        assert protocol._ssl_buffer is _thread_buffer()
        assert protocol.max_size == 256 * 1024  # what one read may take, as asyncio's
