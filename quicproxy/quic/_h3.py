"""HTTP/3 adapter: one QUIC connection's events to the request model.

The connection is driven by the listener (``_listen.py``): it hands in
datagrams and timer expiries, and flushes what the connection has to send
once per event-loop turn. The stream life cycle itself lives in
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
from typing import TYPE_CHECKING, Any

from qh3._hazmat import DecoderStreamError, QpackDecoder
from qh3.h3.connection import (
    H3_ALPN,
    ErrorCode,
    FrameType,
    H3Connection,
    QpackDecompressionFailed,
    Setting,
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
from .._sockets import plain_addr
from .._streams import Streams
from ._core import (
    CreditedConnection,
    control_stream,
    events,
    parse_header,
    stream_answered,
    unsent_bytes,
)
from ._h3gate import FrameRefused, QpackError, RequestFrames, field_section_size

if TYPE_CHECKING:
    from ._listen import QuicListener

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


class _H3(H3Connection):
    """qh3's HTTP/3 layer without its H3_DATAGRAM setting: qh3 always announces it,
    and RFC 9297 lets clients (aioquic, for one) close a connection that announces it
    without QUIC datagram support, which the proxy does not offer. It announces extended
    CONNECT instead (WebSocket over HTTP/3, RFC 9220).

    Its QPACK decoder has no dynamic table (SETTINGS_QPACK_MAX_TABLE_CAPACITY and
    SETTINGS_QPACK_BLOCKED_STREAMS 0): an encoder-stream instruction other than "capacity
    0" is QPACK_ENCODER_STREAM_ERROR (qh3's decoder refuses them), a header block that
    refers to the table QPACK_DECOMPRESSION_FAILED, and no stream waits for an insert."""

    def __init__(self, quic: QuicConnection, max_field_section: int = 4 * 65536) -> None:
        self.max_field_section = max_field_section
        self.oversize: dict[int, bool] = {}
        "Streams whose next header block stands for an oversize one (see ``_h3gate``)."
        super().__init__(quic)
        self._decoder = QpackDecoder(0, 0)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings.pop(0x33, None)  # SETTINGS_H3_DATAGRAM
        settings[0x08] = 1  # SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSocket (RFC 9220)
        settings[Setting.QPACK_MAX_TABLE_CAPACITY] = 0
        settings[Setting.QPACK_BLOCKED_STREAMS] = 0
        settings[Setting.MAX_FIELD_SECTION_SIZE] = self.max_field_section
        return settings

    def _decode_headers(
        self, stream_id: int, frame_data: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """As qh3, except a header block its QPACK decoder refuses because a string is
        not UTF-8 (HTTP allows other bytes): qh3 would raise out of the connection.
        The request gets a 400 instead, as on h2 (see ``H3Conn._request``); a block that
        refers to the dynamic table (there is none) closes the connection. An oversize
        block (its stand-in, see ``_h3gate``) is not decoded: the request gets 431."""
        head = self.oversize.pop(stream_id, None)
        if head is not None:
            return _TooLarge(_PLACEHOLDER if head else [])  # trailers: ignored
        try:
            return super()._decode_headers(stream_id, frame_data)
        except DecoderStreamError:
            try:
                field_section_size(frame_data or b"")
            except QpackError as exc:
                raise QpackDecompressionFailed(str(exc)) from None
            return _Undecodable(_PLACEHOLDER)  # valid for qh3's checks; never forwarded


def _too_large(headers: list[tuple[bytes, bytes]], cap: int) -> HeadersTooLarge | None:
    if isinstance(headers, _TooLarge):
        return HeadersTooLarge(f"request headers over {cap} bytes")
    return None


class _Undecodable(list[tuple[bytes, bytes]]):
    """The headers of a request whose header block could not be decoded."""


class _TooLarge(list[tuple[bytes, bytes]]):
    """The headers of a request whose header block was too large to be decoded."""


_PLACEHOLDER = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"-"),
    (b":path", b"/"),
]


class H3Conn:
    """One QUIC connection carrying HTTP/3 requests."""

    def __init__(
        self, quic: CreditedConnection, listener: QuicListener, handler: Handler, addr: Any
    ) -> None:
        self.quic = quic
        self.listener = listener
        self.handler = handler
        cap = handler.cfg.limits.max_header_bytes
        self.h3 = _H3(quic, max_field_section=4 * cap)
        self.frames = RequestFrames(cap, HEADER_BUDGET * cap, self.h3.oversize)
        self._head_timers: dict[int, asyncio.TimerHandle] = {}
        self.cids: set[bytes] = set()
        "Connection IDs that route datagrams to this connection."
        self.source: tuple[int, int, bytes] | None = None
        "Where the client's latest datagram was addressed: answers leave from there."
        self.client = plain_addr(addr)
        self.handshaking = True
        self.received_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.closed = False
        self.streams = Streams(handler, self, "HTTP/3", self.client, listener.address)
        self._window = handler.cfg.quic.stream_window
        self._consumed: dict[int, int] = {}
        self._acked = asyncio.Event()
        self._closer: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        self.received_bytes += len(data)
        self.quic.receive_datagram(data, addr, now=now)
        self._process()
        self._acked.set()

    def on_timer(self) -> None:
        self.timer = None
        now = max(self.timer_at or 0.0, self.listener.loop.time())
        self.timer_at = None
        self.quic.handle_timer(now=now)
        self._process()

    def _process(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self.listener.cid_issued(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self.listener.cid_retired(self, event.connection_id)
            elif isinstance(event, events.HandshakeCompleted):
                quic.shed_handshake_buffers()
                self.listener.handshake_done(self)
            elif isinstance(event, (events.StreamReset, events.StopSendingReceived)):
                # A cancel, either way: STOP_SENDING has qh3 reset our side (a browser
                # leaving a page sends it alone once its request's FIN was acknowledged).
                self._forget(event.stream_id)
                if self.streams.peer_reset(event.stream_id):
                    self.reset(event.stream_id, "cancelled")  # our half goes too: stream freed
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated()
                return
            if isinstance(event, events.StreamDataReceived) and not self._gate(event):
                continue
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)
        self.transmit()

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
        if isinstance(event.headers, _Undecodable):
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
                self._head_timers[sid] = self.listener.loop.call_later(
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
        self.h3._stream.pop(sid, None)
        self.h3.oversize.pop(sid, None)
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
        deadline = self.listener.loop.time() + seconds
        while not self.closed and not self.quic.all_acknowledged() and self._time_left(deadline):
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), self._time_left(deadline))
        self.close()

    def _time_left(self, deadline: float) -> float:
        return max(0.0, deadline - self.listener.loop.time())

    # ------------------------------------------------------------------ output, life cycle

    def transmit(self) -> None:
        """Ask the listener to send what this connection has, once this loop turn."""
        if not self.closed:
            self.listener.dirty(self)

    def close(self, code: int = ErrorCode.H3_NO_ERROR, reason: str = "") -> None:
        """CONNECTION_CLOSE, after whatever stream data is still queued has gone out."""
        if not self.closed:
            self.listener.send_now(self)
            self.quic.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def terminated(self) -> None:
        """The QUIC connection ended: forget it everywhere, stop its streams."""
        if self.closed:
            return
        self.closed = True
        self.streams.close_all("connection closed")
        for timer in self._head_timers.values():
            timer.cancel()
        self._head_timers.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._acked.set()
        self.listener.remove(self)

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
    server_h3: _H3 | None = None
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
                server_h3 = _H3(server)
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
