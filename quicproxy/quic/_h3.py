"""HTTP/3 adapter: one QUIC connection's events to the request model.

An ``H3Conn`` is the application on a ``_conn.QuicConn`` (which owns the QUIC
connection, its timer and its output): it gets the connection's events and
writes responses; the listener (``_listen.py``) drives it through ``QuicConn`` and
it reaches the listener only through ``_conn.Host``. The stream life cycle itself lives in
``_streams.py``, shared with HTTP/2.

Request streams reach qh3 through ``_h3gate.RequestFrames`` (frame sizes, the decoded
size of header blocks, a budget for header frames in progress); a request head not
complete within ``timeouts.header`` is refused (H3_REQUEST_REJECTED). QPACK runs without
a dynamic table (capacity 0, no blocked streams: what quic-go does), so a header block
cannot expand beyond what it spells out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from qh3.h3.connection import (
    H3_ALPN,
    ErrorCode,
    FrameType,
    H3Connection,
    encode_frame,
    encode_uint_var,
)
from qh3.h3.events import DataReceived, H3Event, HeadersReceived
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from .._errors import ClientGone, HeadersTooLarge
from .._handler import Handler
from .._model import Headers
from .._pseudo import response_headers, trailer_fields
from .._streams import Streams
from ._conn import Host, QuicConn
from ._core import (
    CreditedConnection,
    ProxyH3,
    TooLarge,
    Undecodable,
    control_stream,
    events,
    parse_header,
    stream_answered,
    unsent_bytes,
)
from ._h3gate import FrameRefused, RequestFrames

__all__ = ["H3Conn", "warm_up"]

log = logging.getLogger("quicproxy")
_SEND_HIGH_WATER = 1 << 20
HEADER_BUDGET = 4
"""Header frames in progress on one connection hold at most this many times
``limits.max_header_bytes`` together (see ``_h3gate``)."""
_RESET_CODES = {
    "refused": ErrorCode.H3_REQUEST_REJECTED,
    "internal": ErrorCode.H3_INTERNAL_ERROR,
    "protocol": ErrorCode.H3_MESSAGE_ERROR,
    "done": ErrorCode.H3_NO_ERROR,
    "cancelled": ErrorCode.H3_REQUEST_CANCELLED,
}


def _too_large(headers: list[tuple[bytes, bytes]], cap: int) -> HeadersTooLarge | None:
    if isinstance(headers, TooLarge):
        return HeadersTooLarge(f"request headers over {cap} bytes")
    return None


class H3Conn(QuicConn):
    """One QUIC connection carrying HTTP/3 requests: the application on a ``QuicConn``."""

    def __init__(self, quic: CreditedConnection, host: Host, handler: Handler, addr: Any) -> None:
        super().__init__(quic, host, addr)
        self.handler = handler
        cap = handler.cfg.limits.max_header_bytes
        self.h3 = ProxyH3(quic, max_field_section=4 * cap)
        self.frames = RequestFrames(cap, HEADER_BUDGET * cap, self.h3.oversize)
        self._head_timers: dict[int, asyncio.TimerHandle] = {}
        self.streams = Streams(handler, self, "HTTP/3", self.client, host.address)
        self._window = handler.cfg.quic.stream_window
        self._consumed: dict[int, int] = {}
        self._acked = asyncio.Event()
        self._closer: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        super().receive(data, addr, now)
        self._acked.set()

    def quic_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, (events.StreamReset, events.StopSendingReceived)):
            # A cancel, either way: STOP_SENDING has qh3 reset our side (a browser
            # leaving a page sends it alone once its request's FIN was acknowledged).
            self._forget(event.stream_id)
            if self.streams.peer_reset(event.stream_id):
                self.reset(event.stream_id, "cancelled")  # our half goes too: stream freed
        if isinstance(event, events.StreamDataReceived) and not self._gate(event):
            return
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            if event.stream_id in self.streams.tasks:
                if event.stream_ended:  # trailers: they end the request body
                    trailers = [
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
                    ]
                    self.streams.end(event.stream_id, trailers)
                return
            self._request(event)
        elif isinstance(event, DataReceived):
            self.streams.data(event.stream_id, event.data, event.stream_ended)

    def _request(self, event: HeadersReceived) -> None:
        sid = event.stream_id
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        if isinstance(event.headers, Undecodable):
            raw = [(":undecodable", "")]  # refused by the request model: 400
        if not event.stream_ended:
            self.quic.credit[sid] = self._window
            self._consumed[sid] = 0
        self.streams.open(
            sid,
            raw,
            event.stream_ended,
            lambda size: self.grant(sid, size),
            early_data=not self.quic.handshake_complete,
            refusal=_too_large(event.headers, self.handler.cfg.limits.max_header_bytes),
        )

    # ------------------------------------------------------------------ request frames

    def _gate(self, event: events.StreamDataReceived) -> bool:
        """The client's stream bytes through ``RequestFrames`` (rewritten in place); False
        when qh3 gets nothing of them. Starts and stops a request head's deadline."""
        sid = event.stream_id
        request = sid % 4 == 0
        if not request and sid % 4 != 2:
            return True  # not the client's: nothing arrives on those
        if request and not event.data and event.end_stream and not self.frames.knows(sid):
            if sid in self.streams.tasks or stream_answered(self.quic, sid):
                return True  # qh3 reports a FIN again when its frame is sent again
        try:
            data = self.frames.feed(sid, event.data, event.end_stream)
        except FrameRefused as exc:
            log.info("HTTP/3 stream from %s refused: %s", self.client[0], exc.reason)
            if exc.stream:
                self._refuse_stream(sid, exc.code)
            else:
                self.close(exc.code, exc.reason)
            return False
        if not request:
            pass
        elif self.frames.waiting(sid):
            if sid not in self._head_timers:
                self._head_timers[sid] = self.host.loop.call_later(
                    self.handler.cfg.timeouts.header, self._head_late, sid
                )
        elif sid in self._head_timers:
            self._head_timers.pop(sid).cancel()
        if data is None:
            return False
        event.data = data
        return True

    def _head_late(self, sid: int) -> None:
        self._head_timers.pop(sid, None)
        if self.frames.waiting(sid) and not self.closed:
            log.info("HTTP/3 request head from %s not complete in time", self.client[0])
            self.frames.drop(sid)
            self._refuse_stream(sid, ErrorCode.H3_REQUEST_REJECTED)

    def _refuse_stream(self, sid: int, code: int) -> None:
        """Reset a request stream both ways; what qh3 holds of it goes."""
        self.streams.cancel(sid, "stream refused")
        self.h3.forget(sid)
        self._consumed.pop(sid, None)
        self.quic.credit.pop(sid, None)
        timer = self._head_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(Exception):
            self.quic.reset_stream(sid, code)
        with contextlib.suppress(Exception):
            self.quic.stop_stream(sid, code)
        self.transmit()

    def _forget(self, sid: int) -> None:
        """The client cancelled a stream: its frames, body credit and deadline go."""
        self.frames.forget(sid)
        self._consumed.pop(sid, None)
        self.quic.credit.pop(sid, None)
        timer = self._head_timers.pop(sid, None)
        if timer is not None:
            timer.cancel()

    # ------------------------------------------------------------------ StreamOps

    def send_head(self, sid: int, status: int, headers: Headers, end: bool = False) -> None:
        self.h3.send_headers(sid, response_headers(status, headers), end_stream=end)
        self.transmit()

    async def send_data(self, sid: int, data: bytes) -> None:
        if sid not in self.streams.tasks:
            raise ConnectionError("stream reset by client")
        self.h3.send_data(sid, data, end_stream=False)
        self.transmit()
        while unsent_bytes(self.quic, sid) > _SEND_HIGH_WATER:
            if sid not in self.streams.tasks or self.closed or self.quic.closing:
                raise ClientGone("stream or connection closed")
            self._acked.clear()
            await self._acked.wait()

    def send_end(self, sid: int, trailers: Headers | None = None) -> None:
        if trailers:
            self.h3.send_headers(sid, trailer_fields(trailers), end_stream=True)
        else:
            self.h3.send_data(sid, b"", end_stream=True)
        self.transmit()

    async def flush(self) -> None:
        self.transmit()

    def reset(self, sid: int, why: str) -> None:
        code = _RESET_CODES[why]
        with contextlib.suppress(Exception):
            self.quic.reset_stream(sid, code)
        if why != "internal":
            with contextlib.suppress(Exception):
                self.quic.stop_stream(sid, code)
        self.transmit()

    def stop_reading(self, sid: int) -> None:
        with contextlib.suppress(Exception):
            self.quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
        self.transmit()

    def grant(self, sid: int, size: int) -> None:
        if sid in self._consumed:
            self._consumed[sid] += size
            self.quic.credit[sid] = self._consumed[sid] + self._window
            self.transmit()

    def excessive_load(self, why: str) -> None:
        self.close(ErrorCode.H3_EXCESSIVE_LOAD, why)

    def idle(self) -> None:
        """Draining and the last stream is done: close once what was sent is acknowledged."""
        self._closer = asyncio.ensure_future(self._close_when_acked())

    async def _close_when_acked(self, seconds: float = 2.0) -> None:
        deadline = self.host.loop.time() + seconds
        while not self.closed and not self.quic.all_acknowledged() and self._time_left(deadline):
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), self._time_left(deadline))
        self.close()

    def _time_left(self, deadline: float) -> float:
        return max(0.0, deadline - self.host.loop.time())

    # ------------------------------------------------------------------ output, life cycle

    def close(self, code: int = ErrorCode.H3_NO_ERROR, reason: str = "") -> None:
        """CONNECTION_CLOSE, after whatever stream data is still queued has gone out."""
        self.close_quic(code, reason)

    def ended(self) -> None:
        """The connection ended: its streams stop, its deadlines go."""
        self.streams.close_all("connection closed")
        for timer in self._head_timers.values():
            timer.cancel()
        self._head_timers.clear()
        self._acked.set()

    @property
    def busy(self) -> bool:
        return self.streams.busy

    def shutdown(self) -> None:
        """Graceful close: HTTP/3 GOAWAY now, CONNECTION_CLOSE once streams finish."""
        if self.streams.closing:
            return
        self.streams.drain()
        control = control_stream(self.h3)
        if control is not None:
            last = self.streams.last_stream
            first_unserved = last + 4 if last >= 0 else 0
            goaway = encode_frame(FrameType.GOAWAY, encode_uint_var(first_unserved))
            with contextlib.suppress(Exception):
                self.quic.send_stream_data(control, goaway)
        self.transmit()
        if not self.streams.busy:
            self.close()


_WARM_UP_REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"warm-up"),
    (b":path", b"/"),
]


def warm_up(configuration: QuicConfiguration) -> bool:
    """One HTTP/3 request over a QUIC handshake, in memory, on the listener's configuration.

    The first real connection of a fresh process otherwise pays for first use of the QUIC,
    TLS and HTTP/3 code (lazy imports, key schedule, QPACK): with oha, the first dialup of a
    fresh worker took 78-90 ms against 36-47 for the next ones, and 47-48 ms after this
    (~35 ms at start, before the socket is bound). True when the response arrived."""
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            verify_mode=ssl.CERT_NONE,
            max_datagram_size=configuration.max_datagram_size,
        )
    )
    client_h3 = H3Connection(client)
    server: CreditedConnection | None = None
    server_h3: ProxyH3 | None = None
    here, there = ("127.0.0.1", 1), ("127.0.0.1", 2)
    now = 1.0
    client.connect(there, now=now)
    connected = asked = answered = False
    for _ in range(30):  # a handshake and a request take 4-5 rounds
        for data, _addr in client.datagrams_to_send(now=now):
            if server is None:
                header = parse_header(data, configuration.connection_id_length)
                if header is None:
                    return False
                server = CreditedConnection(
                    configuration=configuration, original_destination_connection_id=header.dcid
                )
                server_h3 = ProxyH3(server)
            server.receive_datagram(data, here, now=now)
        if server is None or server_h3 is None:
            return False
        while (event := server.next_event()) is not None:
            for h3_event in server_h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    server_h3.send_headers(h3_event.stream_id, [(b":status", b"204")], True)
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, there, now=now)
        while (event := client.next_event()) is not None:
            connected |= isinstance(event, events.HandshakeCompleted)
            answered |= any(isinstance(e, HeadersReceived) for e in client_h3.handle_event(event))
        if answered:
            return True
        if connected and not asked:
            sid = client.get_next_available_stream_id()
            client_h3.send_headers(sid, _WARM_UP_REQUEST, end_stream=True)
            asked = True
        now += 0.001
    return False
