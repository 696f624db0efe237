"""HTTP/3 adapter: aioquic events to the request model, plus the QUIC listener glue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset
from aioquic.quic.packet import QuicFrameType, pull_quic_header
from aioquic.tls import SessionTicket

from ._config import Config
from ._handler import Handler
from ._metrics import metrics
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request
from ._pseudo import request_from_pseudo, response_headers
from ._sockets import bind_socket, plain_addr

__all__ = ["start_quic_listener", "QuicListener", "unacked_bytes"]

log = logging.getLogger("quicproxy")
_SEND_HIGH_WATER = 1 << 20
_MAX_STREAM_DATA_CAPACITY = 1 + 2 * 8


def unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream and not yet acknowledged (what aioquic still holds)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return stream.sender._buffer_stop - stream.sender._buffer_start


class _CreditedQuicConnection(QuicConnection):
    """QuicConnection whose request-stream receive windows follow what the proxy consumed.

    aioquic raises a stream's window as data arrives, whether or not anyone read
    it; here a stream listed in ``credit`` only gets the window it was granted,
    so a slow upstream slows the client instead of filling memory.
    """

    credit: dict[int, int]

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        limit = self.credit.get(stream.stream_id)
        if limit is None:
            super()._write_stream_limits(builder, space, stream)
            return
        stream.max_stream_data_local = max(stream.max_stream_data_local, limit)
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=_MAX_STREAM_DATA_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local


class _Writer:
    def __init__(self, proto: H3Protocol, stream_id: int) -> None:
        self.proto = proto
        self.sid = stream_id

    async def send_head(self, status: int, headers: Headers) -> None:
        encoded = [(k.encode(), v.encode()) for k, v in response_headers(status, headers)]
        self.proto.h3.send_headers(self.sid, encoded)
        self.proto.transmit()

    async def send_data(self, data: bytes) -> None:
        await self.proto.send_data(self.sid, data)

    async def send_end(self) -> None:
        self.proto.h3.send_data(self.sid, b"", end_stream=True)
        self.proto.transmit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.proto._quic.reset_stream(self.sid, ErrorCode.H3_INTERNAL_ERROR)
            self.proto.transmit()


class H3Protocol(QuicConnectionProtocol):
    """One QUIC connection carrying HTTP/3 requests."""

    def __init__(self, *args: Any, handler: Handler, listener: QuicListener, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._quic.__class__ = _CreditedQuicConnection
        self.credit: dict[int, int] = {}
        "Receive window granted per request stream (consumed bytes + stream_window)."
        self._quic.credit = self.credit  # type: ignore[attr-defined]
        self.handler = handler
        self.listener = listener
        self.h3 = H3Connection(self._quic)
        self.bodies: dict[int, Body] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._acked = asyncio.Event()
        self.closing = False
        self._next_stream = 0
        self._window = handler.cfg.quic.stream_window
        listener.connections.add(self)
        metrics.active_connections.labels("h3").inc()

    # ------------------------------------------------------------------ output

    async def send_data(self, sid: int, data: bytes) -> None:
        if sid not in self.tasks:
            raise ConnectionError("stream reset by client")
        self.h3.send_data(sid, data, end_stream=False)
        self.transmit()
        while unacked_bytes(self._quic, sid) > _SEND_HIGH_WATER:
            if sid not in self.tasks or self._quic._close_event is not None:
                raise ConnectionError("stream closed")
            self._acked.clear()
            await self._acked.wait()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self._acked.set()

    # ------------------------------------------------------------------ input

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            metrics.stream_resets.labels("h3").inc()
            self._stream_gone(event.stream_id, "stream reset by client")
        elif isinstance(event, HandshakeCompleted):
            metrics.quic_handshakes.inc()
        elif isinstance(event, ConnectionTerminated):
            for sid in list(self.tasks):
                self._stream_gone(sid, "connection closed")
            self.listener.connections.discard(self)
            metrics.active_connections.labels("h3").dec()
            self._acked.set()
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _stream_gone(self, sid: int, why: str) -> None:
        body = self.bodies.pop(sid, None)
        if body is not None and not body.ended:
            body.abort(ConnectionError(why))
        task = self.tasks.pop(sid, None)
        if task is not None:
            self._acked.set()
        self.credit.pop(sid, None)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            if event.stream_id in self.tasks:
                return  # trailers: ignored
            self._request(event)
        elif isinstance(event, DataReceived):
            body = self.bodies.get(event.stream_id)
            if body is not None:
                body.feed(event.data)
                if event.stream_ended:
                    body.end()

    def _request(self, event: HeadersReceived) -> None:
        sid = event.stream_id
        if self.closing:
            self._quic.reset_stream(sid, ErrorCode.H3_REQUEST_REJECTED)
            self.transmit()
            return
        self._next_stream = max(self._next_stream, sid + 4)
        raw = [(k.decode(), v.decode("utf-8", "replace")) for k, v in event.headers]
        consumed = [0]

        def credit(size: int) -> None:
            consumed[0] += size
            if sid in self.credit:
                self.credit[sid] = consumed[0] + self._window
                self.transmit()

        body = Body(on_consumed=credit)
        if event.stream_ended:
            body.end()
        else:
            self.credit[sid] = self._window
        stream = self._quic._streams.get(sid)
        paths = self._quic._network_paths
        client = plain_addr(paths[0].addr if paths else None)
        try:
            req = request_from_pseudo(raw, "HTTP/3", client, self.listener.address, body)
        except ValueError as exc:
            log.info("bad HTTP/3 request from %s: %s", client[0], exc)
            self.h3.send_headers(sid, [(b":status", b"400")], end_stream=True)
            self.transmit()
            return
        req.early_data = not self._quic._handshake_complete
        del stream
        self.bodies[sid] = body
        self.tasks[sid] = asyncio.ensure_future(self._exchange(sid, req))

    async def _exchange(self, sid: int, req: Request) -> None:
        try:
            await self.handler.exchange(req, _Writer(self, sid))
            if not req.body.ended and sid in self.tasks:
                # Answered before the whole request body came: take the rest (bounded),
                # then stop the upload if it is still going.
                if not await req.body.discard(DISCARD_SECONDS, DISCARD_BYTES):
                    with contextlib.suppress(Exception):
                        self._quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
                        self.transmit()
        except (ConnectionError, OSError):
            pass
        finally:
            self.tasks.pop(sid, None)
            self.bodies.pop(sid, None)
            self.credit.pop(sid, None)
            if self.closing and not self.tasks:
                self.close()

    # ------------------------------------------------------------------ shutdown

    @property
    def busy(self) -> bool:
        return bool(self.tasks)

    def shutdown(self) -> None:
        """Graceful close: HTTP/3 GOAWAY now, CONNECTION_CLOSE once streams finish."""
        if self.closing:
            return
        self.closing = True
        control = self.h3._local_control_stream_id
        if control is not None:
            frame = encode_frame(FrameType.GOAWAY, encode_uint_var(self._next_stream))
            self._quic.send_stream_data(control, frame)
        self.transmit()
        if not self.tasks:
            self.close()


class _Server(QuicServer):
    """aioquic's server, which stops taking new connections while draining."""

    draining = False
    tls_store: Any = None
    "Where each new connection's certificate comes from (_certwatch.TlsStore), if set."

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.tls_store is not None:  # certificate rotation: new connections get the new pair
            self._configuration = self.tls_store.quic_configuration(self._configuration)
        if self.draining:
            try:
                header = pull_quic_header(
                    Buffer(data=data if isinstance(data, bytes) else data.encode()),
                    host_cid_length=self._configuration.connection_id_length,
                )
            except ValueError:
                return
            if header.destination_cid not in self._protocols:
                return
        super().datagram_received(data, addr)


class QuicListener:
    """The UDP side of the https port."""

    def __init__(self) -> None:
        self.connections: set[H3Protocol] = set()
        self.server: _Server | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("", 0)

    def drain(self) -> None:
        if self.server is not None:
            self.server.draining = True
        for conn in list(self.connections):
            conn.shutdown()

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self.transport is not None:
            self.transport.close()


def _ticket_store() -> tuple[
    Callable[[bytes], SessionTicket | None], Callable[[SessionTicket], None]
]:
    tickets: dict[bytes, SessionTicket] = {}

    def fetch(label: bytes) -> SessionTicket | None:
        return tickets.pop(label, None)  # single use: limits 0-RTT replay

    def store(ticket: SessionTicket) -> None:
        if len(tickets) > 10000:
            tickets.pop(next(iter(tickets)))
        tickets[ticket.ticket] = ticket

    return fetch, store


async def start_quic_listener(
    cfg: Config, handler: Handler, cert: str, key: str, host: str, port: int, reuse_port: bool
) -> QuicListener:
    q = cfg.quic
    configuration = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=False,
        idle_timeout=q.idle_timeout,
        max_datagram_size=q.max_datagram_size,
        congestion_control_algorithm=q.congestion_control,
        max_stream_data=q.stream_window,
        max_data=16 * q.stream_window,
    )
    configuration.load_cert_chain(cert, key)
    listener = QuicListener()
    fetch, store = _ticket_store() if q.early_data else (None, None)
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: _Server(
            configuration=configuration,
            create_protocol=partial(H3Protocol, handler=handler, listener=listener),
            session_ticket_fetcher=fetch,
            session_ticket_handler=store,
            retry=q.retry,
        ),
        sock=bind_socket(host, port, socket.SOCK_DGRAM, reuse_port),
    )
    listener.server = server
    listener.transport = transport
    listener.address = plain_addr(transport.get_extra_info("sockname"))
    return listener
