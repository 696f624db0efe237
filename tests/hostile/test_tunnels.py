"""WebSocket tunnels under abuse: floods against a backend that does not read, tunnels
opened and abandoned by the hundred, extended CONNECT streams reset in a loop."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import websockets

from tests.ws import client_ssl, connect_headers, h2_client, wss


async def test_a_client_flood_to_a_backend_that_does_not_read_is_held(ws_proxy, certs):
    """The client writes as fast as it can; the backend reads nothing: the client is held
    back by the sockets' buffers and one read, the proxy's memory does not grow."""
    ws = await websockets.connect(
        wss(ws_proxy, "/mute"), ssl=client_ssl(certs), compression=None, write_limit=65536
    )
    sent = 0
    chunk = os.urandom(1 << 20)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(4):
                while True:
                    await ws.send(chunk)
                    sent += len(chunk)
        assert sent < 48 << 20, f"{sent >> 20} MiB went into a tunnel nobody reads"
        bodies_held = ws_proxy.handler.tunnels.open
        assert bodies_held == 1
    finally:
        ws.transport.abort()


async def test_tunnels_opened_and_abandoned_leave_nothing(ws_proxy, ws_backend, certs):
    """300 WebSockets opened then dropped without a close (TCP abort): every backend
    connection is closed and every place under the caps comes back."""
    ctx = client_ssl(certs)

    async def one() -> None:
        ws = await websockets.connect(wss(ws_proxy, "/echo"), ssl=ctx, open_timeout=30)
        ws.transport.abort()

    for _ in range(6):
        await asyncio.gather(*(one() for _ in range(50)))
    for _ in range(200):
        if len(ws_backend.closes) == 300 and ws_proxy.handler.tunnels.open == 0:
            break
        await asyncio.sleep(0.05)
    assert ws_backend.connected == 300
    assert len(ws_backend.closes) == 300
    assert ws_proxy.handler.tunnels.open == 0
    # still serving
    async with websockets.connect(wss(ws_proxy, "/echo"), ssl=ctx) as ws:
        await ws.send("after")
        assert await ws.recv() == "after"


async def test_h2_websocket_streams_reset_in_a_loop_count_as_rapid_reset(
    make_proxy, ws_backend, certs
):
    """Extended CONNECT streams reset by the client are counted like any reset stream:
    over ``max_resets`` the connection is closed with ENHANCE_YOUR_CALM."""
    import h2.errors
    import h2.events

    proxy = await make_proxy(ws_backend, limits={"max_resets": 20})
    c = await h2_client(proxy, certs)
    closed: Any = None
    try:
        for _ in range(60):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, connect_headers(proxy.https_port, "/echo"))
            await c.flush()
            got_head = False
            while not got_head and closed is None:
                for e in await c.read():
                    got_head |= isinstance(e, h2.events.ResponseReceived)
                    if isinstance(e, h2.events.ConnectionTerminated):
                        closed = e
            if closed is not None:
                break
            c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            await c.flush()
    except ConnectionError:
        pass
    finally:
        c.writer.close()
    assert closed is not None and closed.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    for _ in range(100):
        if proxy.handler.tunnels.open == 0:
            break
        await asyncio.sleep(0.05)
    assert proxy.handler.tunnels.open == 0
    # another client is served
    async with websockets.connect(wss(proxy, "/echo"), ssl=client_ssl(certs)) as ws:
        await ws.send("fine")
        assert await ws.recv() == "fine"
