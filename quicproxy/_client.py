"""A small HTTP/3 client on aioquic's client API (for `quicproxy get` and for checks)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset

__all__ = ["H3Response", "H3Client", "h3_client"]


def _unacked(quic: Any, stream_id: int) -> int:
    """Bytes written to a stream and not yet acknowledged (aioquic's send buffer)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return int(stream.sender._buffer_stop - stream.sender._buffer_start)


@dataclass
class H3Response:
    status: int
    "Response status."
    headers: list[tuple[str, str]]
    "Response headers (lower-case names, no pseudo-headers)."
    body: bytes = b""
    "Whole body (unless a sink consumed it)."
    size: int = 0
    "Body bytes received."
    reset: bool = False
    "True when the server reset the stream."
    trailers: list[tuple[str, str]] = field(default_factory=list)
    "Trailer fields, if the response had some."

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class _Pending:
    done: asyncio.Future[None]
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    keep: bool = True
    reset: bool = False
    hasher: Any = None
    trailers: list[tuple[str, str]] = field(default_factory=list)


class _Protocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic)
        self.pending: dict[int, _Pending] = {}
        self.acked = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.acked.set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and event.stream_id in self.pending:
            p = self.pending.pop(event.stream_id)
            p.reset = True
            if not p.done.done():
                p.done.set_result(None)
        for ev in self.h3.handle_event(event):
            self._h3(ev)

    def _h3(self, ev: H3Event) -> None:
        if not isinstance(ev, (HeadersReceived, DataReceived)):
            return
        p = self.pending.get(ev.stream_id)
        if p is None:
            return
        if isinstance(ev, HeadersReceived) and p.status:
            p.trailers = [(k.decode(), v.decode()) for k, v in ev.headers]
        elif isinstance(ev, HeadersReceived):
            for k, v in ev.headers:
                if k == b":status":
                    p.status = int(v)
                else:
                    p.headers.append((k.decode(), v.decode()))
        else:
            p.size += len(ev.data)
            if p.hasher is not None:
                p.hasher.update(ev.data)
            if p.keep:
                p.chunks.append(ev.data)
        if ev.stream_ended:
            self.pending.pop(ev.stream_id, None)
            if not p.done.done():
                p.done.set_result(None)


class H3Client:
    """Requests over one QUIC connection; many may run at once."""

    def __init__(self, proto: _Protocol, authority: str) -> None:
        self.proto = proto
        self.authority = authority

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        keep_body: bool = True,
        hasher: Any = None,
        timeout: float = 60.0,
    ) -> H3Response:
        proto = self.proto
        sid = proto._quic.get_next_available_stream_id()
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers]
        if isinstance(body, bytes):
            head.append((b"content-length", str(len(body)).encode()))
        p = _Pending(asyncio.get_running_loop().create_future(), keep=keep_body, hasher=hasher)
        proto.pending[sid] = p
        proto.h3.send_headers(sid, head, end_stream=body is None)
        proto.transmit()
        if isinstance(body, bytes):
            proto.h3.send_data(sid, body, end_stream=True)
            proto.transmit()
        elif body is not None:
            async for chunk in body:
                if p.done.done():
                    break
                proto.h3.send_data(sid, chunk, end_stream=False)
                proto.transmit()
                while _unacked(proto._quic, sid) > (1 << 20) and not p.done.done():
                    proto.acked.clear()
                    await asyncio.wait_for(proto.acked.wait(), timeout)
            if not p.done.done():
                proto.h3.send_data(sid, b"", end_stream=True)
                proto.transmit()
        await asyncio.wait_for(p.done, timeout)
        return H3Response(p.status, p.headers, b"".join(p.chunks), p.size, p.reset, p.trailers)


@asynccontextmanager
async def h3_client(
    url: str,
    *,
    insecure: bool = False,
    cafile: str | None = None,
    server_name: str | None = None,
    session_ticket_handler: Any = None,
    session_ticket: Any = None,
    wait_connected: bool = True,
) -> AsyncIterator[H3Client]:
    """Connect to ``url``'s host and port over QUIC with ALPN h3."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 443
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.server_name = server_name or host
    if insecure:
        config.verify_mode = ssl.CERT_NONE
    if cafile:
        config.load_verify_locations(cafile)
    if session_ticket is not None:
        config.session_ticket = session_ticket
    async with connect(
        host,
        port,
        configuration=config,
        create_protocol=_Protocol,
        session_ticket_handler=session_ticket_handler,
        wait_connected=wait_connected,
    ) as proto:
        authority = parts.netloc.rsplit("@", 1)[-1]
        yield H3Client(proto, authority)  # type: ignore[arg-type]


async def h3_get(url: str, insecure: bool = False, cafile: str | None = None) -> H3Response:
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with h3_client(url, insecure=insecure, cafile=cafile) as client:
        return await client.request("GET", path)
