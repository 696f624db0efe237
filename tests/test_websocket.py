"""WebSocket through the proxy: HTTP/1.1 Upgrade (RFC 6455), HTTP/2 extended CONNECT
(RFC 8441) and HTTP/3 extended CONNECT (RFC 9220), each to a real WebSocket server (the
`websockets` library) that sees an HTTP/1.1 Upgrade whatever the client spoke."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import websockets
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset
from websockets.asyncio.server import serve
from websockets.frames import Frame, Opcode

from quicproxy._metrics import metrics
from tests.ws import Frames, WsBackend, client_ssl, connect_headers, frame, h2_client, wss

# ---------------------------------------------------------------- HTTP/1.1


async def test_h1_websocket_text_binary_large_ping_and_close_codes(ws_proxy, ws_backend, certs):
    async with websockets.connect(
        wss(ws_proxy, "/echo"), ssl=client_ssl(certs), max_size=None
    ) as ws:
        await ws.send("hello ✓")
        assert await ws.recv() == "hello ✓"
        await ws.send(b"\x00\x01binary\xff")
        assert await ws.recv() == b"\x00\x01binary\xff"
        big = os.urandom(16 << 20)
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 60) == big
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 10)
        await ws.close(4001, "client says bye")
    assert ws.close_code == 4001
    for _ in range(50):
        if ws_backend.closes:
            break
        await asyncio.sleep(0.05)
    assert ws_backend.closes == [(4001, "client says bye")]
    seen = ws_backend.handshakes[0]
    assert seen["Upgrade"].lower() == "websocket"
    assert seen["X-Forwarded-For"] == "127.0.0.1"


async def test_h1_backend_close_code_reaches_the_client(ws_proxy, certs):
    async with websockets.connect(wss(ws_proxy, "/close"), ssl=client_ssl(certs)) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4002 and ws.close_reason == "backend says bye"


async def test_h1_websocket_access_log_and_metrics(ws_proxy, certs):
    lines: list[str] = []
    ws_proxy.handler.access.sink = lines.append
    async with websockets.connect(wss(ws_proxy, "/echo"), ssl=client_ssl(certs)) as ws:
        assert metrics.tunnels_open.labels(protocol="h1")._value.get() == 1
        await ws.send(os.urandom(1000))  # random: permessage-deflate cannot shrink it
        await ws.recv()
    for _ in range(50):
        if lines:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 1 and (" 101 " in lines[0] or '"status":101' in lines[0]), lines
    assert metrics.tunnels_open.labels(protocol="h1")._value.get() == 0
    assert metrics.tunnel_bytes.labels(protocol="h1", direction="in")._value.get() > 1000
    assert metrics.tunnel_bytes.labels(protocol="h1", direction="out")._value.get() > 1000


async def test_h1_refused_handshake_is_passed_on(make_proxy, certs, backend):
    """A backend that answers the Upgrade with a plain response: the client gets it."""
    proxy = await make_proxy(backend)
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(wss(proxy, "/status/403"), ssl=client_ssl(certs)):
            pass
    assert info.value.response.status_code == 403


async def test_tunnels_per_client_are_capped(make_proxy, ws_backend, certs):
    proxy = await make_proxy(ws_backend, limits={"max_tunnels_per_client": 2})
    ctx = client_ssl(certs)
    async with websockets.connect(wss(proxy, "/echo"), ssl=ctx) as a:
        async with websockets.connect(wss(proxy, "/echo"), ssl=ctx) as b:
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(wss(proxy, "/echo"), ssl=ctx):
                    pass
            assert info.value.response.status_code == 429
            await a.send("still")
            assert await a.recv() == "still"
            await b.send("here")
            assert await b.recv() == "here"
    # both closed: the places are free again
    for _ in range(50):
        if proxy.handler.tunnels.open == 0:
            break
        await asyncio.sleep(0.05)
    assert proxy.handler.tunnels.open == 0
    async with websockets.connect(wss(proxy, "/echo"), ssl=ctx) as c:
        await c.send("again")
        assert await c.recv() == "again"


async def test_a_client_that_stops_reading_holds_the_backend_back(ws_proxy, ws_backend, certs):
    """The backend floods; the client reads nothing: what the backend manages to send is
    bounded by the socket buffers and one read, not by the proxy's memory."""
    ws = await websockets.connect(
        wss(ws_proxy, "/flood"), ssl=client_ssl(certs), max_size=None, max_queue=1
    )
    try:
        ws.transport.pause_reading()
        await asyncio.sleep(2.0)
        first = ws_backend.sent
        await asyncio.sleep(2.0)
        assert ws_backend.sent == first, "the backend kept sending to a client that reads nothing"
        assert first < 48 << 20, first
    finally:
        ws.transport.abort()


async def test_a_client_reset_closes_the_backend(ws_proxy, ws_backend, certs):
    ws = await websockets.connect(wss(ws_proxy, "/echo"), ssl=client_ssl(certs))
    await ws.send("hi")
    assert await ws.recv() == "hi"
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    ws.transport.abort()
    for _ in range(100):
        if ws_backend.closes:
            break
        await asyncio.sleep(0.05)
    assert len(ws_backend.closes) == 1
    assert ws_proxy.handler.tunnels.open == 0


# ---------------------------------------------------------------- HTTP/2


async def test_h2_extended_connect_websocket(ws_proxy, ws_backend, certs):
    c = await h2_client(ws_proxy, certs)
    try:
        assert c.conn.remote_settings.enable_connect_protocol == 1
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, connect_headers(ws_proxy.https_port, "/echo"))
        await c.flush()
        status = None
        while status is None:
            for e in await c.read():
                if isinstance(e, h2.events.ResponseReceived):
                    status = dict(e.headers)[b":status"]
                    assert b"sec-websocket-accept" not in dict(e.headers)
        assert status == b"200"
        frames = Frames()
        payload = os.urandom(200_000)
        await c.send(sid, frame(Opcode.TEXT, b"over h2") + frame(Opcode.BINARY, payload))
        got: list[Frame] = []
        while len(got) < 2:
            for e in await c.read():
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                    got += frames.feed(e.data)
        assert (got[0].opcode, got[0].data) == (Opcode.TEXT, b"over h2")
        assert (got[1].opcode, got[1].data) == (Opcode.BINARY, payload)
        # a close from the client: the backend answers it and closes; the stream ends cleanly
        await c.send(sid, frame(Opcode.CLOSE, b"\x0f\xa1bye"))
        ended = False
        while not ended:
            for e in await c.read():
                assert not isinstance(e, h2.events.StreamReset), e
                ended |= isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
        assert ws_backend.closes == [(4001, "bye")]
        seen = ws_backend.handshakes[0]
        assert seen["Upgrade"].lower() == "websocket" and seen["Sec-WebSocket-Key"]
    finally:
        c.writer.close()


async def test_h2_backend_reset_resets_the_stream(make_proxy, certs):
    """A backend that accepts the Upgrade and then resets the connection."""
    resets = asyncio.Event()

    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        from quicproxy.upstream._tunnel import accept_key

        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        resets.set()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    class Origin:
        url = f"http://127.0.0.1:{port}"

    proxy = await make_proxy(Origin())
    c = await h2_client(proxy, certs)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, connect_headers(proxy.https_port, "/x"))
        await c.flush()
        reset = None
        while reset is None:
            for e in await c.read():
                if isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                    reset = e
                assert not isinstance(e, h2.events.StreamEnded), "a reset must not end cleanly"
        assert resets.is_set()
    finally:
        c.writer.close()
        server.close()


# ---------------------------------------------------------------- HTTP/3


class _H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic)
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    def quic_event_received(self, event: Any) -> None:
        if isinstance(event, StreamReset):
            self.events.put_nowait(event)
        for e in self.h3.handle_event(event):
            self.events.put_nowait(e)


async def test_h3_extended_connect_websocket(ws_proxy, ws_backend, certs):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.load_verify_locations(certs[0])
    config.server_name = "localhost"
    async with quic_connect(
        "127.0.0.1", ws_proxy.https_port, configuration=config, create_protocol=_H3Client
    ) as client:
        assert isinstance(client, _H3Client)
        sid = client._quic.get_next_available_stream_id()
        headers = [(k.encode(), v.encode()) for k, v in connect_headers(0, "/echo")]
        client.h3.send_headers(sid, headers)
        client.transmit()
        first = await asyncio.wait_for(client.events.get(), 10)
        while not isinstance(first, HeadersReceived):
            first = await asyncio.wait_for(client.events.get(), 10)
        assert dict(first.headers)[b":status"] == b"200"
        assert client.h3._received_settings.get(0x08) == 1  # ENABLE_CONNECT_PROTOCOL
        payload = os.urandom(300_000)
        client.h3.send_data(sid, frame(Opcode.BINARY, payload) + frame(Opcode.TEXT, b"h3"), False)
        client.transmit()
        frames, got = Frames(), []
        while len(got) < 2:
            e = await asyncio.wait_for(client.events.get(), 10)
            if isinstance(e, DataReceived) and e.stream_id == sid:
                got += frames.feed(e.data)
        assert got[0].data == payload and got[1].data == b"h3"
        client.h3.send_data(sid, frame(Opcode.CLOSE, b"\x03\xe8"), False)
        client.transmit()
        ended = False
        while not ended:
            e = await asyncio.wait_for(client.events.get(), 10)
            assert not isinstance(e, StreamReset), e
            ended = isinstance(e, DataReceived) and e.stream_id == sid and e.stream_ended
    for _ in range(50):
        if ws_backend.closes:
            break
        await asyncio.sleep(0.05)
    assert ws_backend.closes == [(1000, "")]
    assert ws_proxy.handler.tunnels.open == 0


# ---------------------------------------------------------------- a real browser

_PAGE = b"""<!doctype html><html><body><p id="out">waiting</p><script>
const ws = new WebSocket("wss://" + location.host + "/echo");
ws.onopen = () => ws.send("echo through the proxy");
ws.onmessage = (e) => { ws.close(1000); location = "/done?" + encodeURIComponent(e.data); };
ws.onerror = () => { location = "/done?error"; };
</script></body></html>"""


@pytest.mark.parametrize(
    "quic,ws_h3",
    [(False, False), (True, False), (True, True)],
    ids=["page-over-h2", "page-over-h3", "page-and-websocket-over-h3"],
)
async def test_chromium_opens_a_websocket_through_the_proxy(
    make_proxy, certs, tmp_path, quic, ws_h3
):
    """Headless Chromium loads a page through the proxy (h2, or h3 when QUIC is forced)
    and the page's WebSocket echoes through it; the access log says which protocol the
    tunnel used (Chromium takes RFC 8441 on an h2 connection that advertises it, and RFC
    9220 on an h3 one when its EnableWebsocketsOverHttp3 feature is on: off by default)."""
    from websockets.datastructures import Headers as WsHeaders
    from websockets.http11 import Response as WsResponse

    from tests.helpers import chromium_args

    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def page(connection: Any, request: Any) -> Any:
        if request.path.startswith("/done?") and not done.done():
            done.set_result(request.path.split("?", 1)[1])
        if request.path != "/echo":
            body = _PAGE if request.path == "/" else b"ok"
            headers = WsHeaders([("Content-Type", "text/html"), ("Content-Length", str(len(body)))])
            return WsResponse(200, "OK", headers, body)
        return None

    backend = WsBackend()
    backend.server = await serve(backend.handler, "127.0.0.1", 0, process_request=page)
    backend.port = backend.server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(backend, listen={"host": ""})
        lines: list[str] = []
        proxy.handler.access.sink = lines.append
        origin = f"localhost:{proxy.https_port}"
        args = chromium_args(tmp_path, proxy, quic) + [f"https://{origin}/"]
        if ws_h3:
            args.insert(-1, "--enable-features=EnableWebsocketsOverHttp3")
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            result = await asyncio.wait_for(asyncio.shield(done), 60)
        finally:
            proc.kill()
            _, err = await proc.communicate()
        assert result == "echo%20through%20the%20proxy", (result, lines, err.decode()[-2000:])
        page_line = next(line for line in lines if '"path":"/"' in line)
        tunnel = next(line for line in lines if '"path":"/echo"' in line)
        assert ('"protocol":"h3"' in page_line) == quic, page_line
        if ws_h3:  # RFC 9220 on the page's h3 connection
            assert '"protocol":"h3"' in tunnel and '"status":200' in tunnel, tunnel
        elif quic:  # Chromium has no WebSocket over HTTP/3 (RFC 9220) by default: h1 or h3
            assert '"protocol":"h1"' in tunnel or '"protocol":"h3"' in tunnel, tunnel
        else:  # RFC 8441 on the page's h2 connection
            assert '"protocol":"h2"' in tunnel and '"status":200' in tunnel, tunnel
    finally:
        await backend.stop()


# ---------------------------------------------------------------- draining


async def _closes(backend: WsBackend, n: int = 1) -> list[tuple[int | None, str | None]]:
    for _ in range(100):
        if len(backend.closes) >= n:
            break
        await asyncio.sleep(0.05)
    return backend.closes


async def test_draining_closes_an_h1_websocket_with_1001_both_ways(make_proxy, ws_backend, certs):
    """Still open when the grace ends: the client and the backend each get a Close frame
    with 1001 (going away), not a cut TCP connection (which they would see as 1006)."""
    proxy = await make_proxy(ws_backend)
    ws = await websockets.connect(wss(proxy, "/echo"), ssl=client_ssl(certs))
    await ws.send("before")
    assert await ws.recv() == "before"
    stopping = asyncio.ensure_future(proxy.stop(grace=0.3))
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001
    assert await asyncio.wait_for(stopping, 10) is False  # the grace ran out with it open
    assert await _closes(ws_backend) == [(1001, "going away")]
    assert proxy.handler.tunnels.open == 0


async def test_draining_closes_an_h2_websocket_between_frames(make_proxy, ws_backend, certs):
    """Over h2 the Close is the stream's last DATA, then END_STREAM (no reset). The
    client was half-way through sending a frame when the drain began: the proxy lets it
    finish (within a second) before the backend gets the Close, so the backend sees the
    whole message and then 1001, never a Close inside a frame (a protocol error)."""
    proxy = await make_proxy(ws_backend)
    c = await h2_client(proxy, certs)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, connect_headers(proxy.https_port, "/echo"))
        await c.flush()
        while not any(isinstance(e, h2.events.ResponseReceived) for e in await c.read()):
            pass
        message = frame(Opcode.BINARY, os.urandom(50_000))
        await c.send(sid, message[:20_000])
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(proxy.stop(grace=0.3))
        await asyncio.sleep(0.6)  # the grace is over: the client is mid-frame
        await c.send(sid, message[20_000:])
        frames, got, ended = Frames(), [], False
        while not ended:
            for e in await c.read():
                assert not isinstance(e, h2.events.StreamReset), e
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                    got += frames.feed(e.data)
                ended |= isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
        assert got and got[-1].opcode == Opcode.CLOSE
        assert int.from_bytes(got[-1].data[:2], "big") == 1001
        await asyncio.wait_for(stopping, 10)
    finally:
        c.writer.close()
    assert await _closes(ws_backend) == [(1001, "going away")]


async def test_draining_cuts_a_client_stuck_mid_frame(make_proxy, ws_backend, certs):
    """A client that stops half-way through a frame: the backend's side cannot take a
    Close there, so after the second the proxy gives, that side is cut (1006 at the
    backend); the client still gets its 1001."""
    proxy = await make_proxy(ws_backend)
    c = await h2_client(proxy, certs)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, connect_headers(proxy.https_port, "/echo"))
        await c.flush()
        while not any(isinstance(e, h2.events.ResponseReceived) for e in await c.read()):
            pass
        await c.send(sid, frame(Opcode.TEXT, b"x" * 1000)[:300])
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(proxy.stop(grace=0.2))
        frames, got, ended = Frames(), [], False
        while not ended:
            for e in await c.read():
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                    got += frames.feed(e.data)
                ended |= isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
        assert [f.opcode for f in got] == [Opcode.CLOSE]
        assert int.from_bytes(got[0].data[:2], "big") == 1001
        await asyncio.wait_for(stopping, 10)
    finally:
        c.writer.close()
    assert await _closes(ws_backend) == [(1006, "")]


def test_frame_edges_follow_frames_across_any_split():
    """Frames of every length form (7-bit, 16-bit, 64-bit), masked and not, fed in
    random pieces: each piece's first edge is where the next frame really starts."""
    import random

    from quicproxy.upstream._tunnel import FrameEdges

    rng = random.Random(7)
    for mask in (False, True):
        sizes = [0, 1, 125, 126, 127, 65535, 65536, 70_000, 3, 0, 200]
        wire = b"".join(Frame(Opcode.BINARY, os.urandom(n)).serialize(mask=mask) for n in sizes)
        edges, at = {0}, 0
        for n in sizes:
            at += len(Frame(Opcode.BINARY, b"\0" * n).serialize(mask=mask))
            edges.add(at)
        for _ in range(30):
            track, pos = FrameEdges(), 0
            while pos < len(wire):
                piece = wire[pos : pos + rng.choice((1, 2, 3, 7, 14, 100, 4096, 80_000))]
                found = track.feed(piece)
                inside = sorted(e - pos for e in edges if pos <= e <= pos + len(piece))
                assert found == (inside[0] if inside else -1), (pos, len(piece))
                pos += len(piece)
            assert track.at_edge()
