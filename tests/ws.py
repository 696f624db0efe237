"""WebSocket test parts: a real echo server (the `websockets` library), frames by hand
for h2/h3 extended CONNECT, and a small h2 client (the h2 library) over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
from websockets.asyncio.server import serve
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader as FrameBytes


class WsBackend:
    """A real WebSocket echo server; it records each handshake's request headers."""

    def __init__(self) -> None:
        self.handshakes: list[Any] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.connected = 0
        self.flood = False
        self.sent = 0
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handler(self, ws: Any) -> None:
        self.connected += 1
        self.handshakes.append(ws.request.headers)
        path = ws.request.path
        try:
            if path.startswith("/flood"):
                chunk = os.urandom(65536)
                while True:
                    await ws.send(chunk)
                    self.sent += len(chunk)
            if path.startswith("/close"):
                await ws.close(4002, "backend says bye")
                return
            if path.startswith("/mute"):
                await asyncio.sleep(30)  # reads nothing
                return
            async for message in ws:
                await ws.send(message)
        finally:
            self.closes.append((ws.close_code, ws.close_reason))

    async def start(self) -> WsBackend:
        self.server = await serve(self.handler, "127.0.0.1", 0, max_size=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)


def client_ssl(certs: tuple[str, str], alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs[0])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def wss(proxy: Any, path: str) -> str:
    return f"wss://localhost:{proxy.https_port}{path}"


def frame(opcode: Opcode, data: bytes) -> bytes:
    """One masked client frame."""
    return Frame(opcode, data).serialize(mask=True)


class Frames:
    """Server frames out of a byte stream."""

    def __init__(self) -> None:
        self.bytes = FrameBytes()
        self.parser: Any = None

    def feed(self, data: bytes) -> list[Frame]:
        self.bytes.feed_data(data)
        out = []
        while True:
            if self.parser is None:
                self.parser = Frame.parse(self.bytes.read_exact, mask=False)
            try:
                next(self.parser)
            except StopIteration as done:
                out.append(done.value)
                self.parser = None
                continue
            return out


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list[Any] = []

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events):
            await self.read()

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def send(self, sid: int, data: bytes) -> None:
        """DATA within the peer's frame size and flow-control windows."""
        while data:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if room <= 0:
                await self.read()
                continue
            self.conn.send_data(sid, data[:room])
            data = data[room:]
            await self.flush()

    async def read(self) -> list[Any]:
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        if not data:
            raise ConnectionError("closed")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.events += events
        await self.flush()
        return events


async def h2_client(proxy: Any, certs: tuple[str, str]) -> H2Client:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        proxy.https_port,
        ssl=client_ssl(certs, ["h2"]),
        server_hostname="localhost",
    )
    client = H2Client(reader, writer)
    await client.start()
    return client


def connect_headers(port: int, path: str) -> list[tuple[str, str]]:
    return [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":path", path),
        (":authority", f"localhost:{port}"),
        ("sec-websocket-version", "13"),
    ]
