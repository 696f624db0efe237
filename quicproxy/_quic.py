"""The QUIC core: the one module that knows aioquic's QUIC layer.

Everything the listener and the HTTP/3 adapter need from the QUIC library goes
through here: reading a packet header, checking that an Initial decrypts,
Retry and Version Negotiation packets, the connection object and the few
private attributes the proxy relies on. Swapping the QUIC library means
rewriting this module (and the h3 framing in ``_h3.py``), nothing else.

Private aioquic attributes used, and why (``PRIVATE`` lists them; a test fails
loudly when an aioquic upgrade removes one):

- ``QuicConnection._write_stream_limits``: overridden so a request stream's
  receive window follows what the proxy consumed, not what arrived.
- ``QuicConnection._streams`` and ``QuicStreamSender._buffer_start/_buffer_stop``:
  bytes written to a stream and not yet acknowledged (send back-pressure).
- ``QuicStreamSender.on_data_delivery`` and its ``_buffer``, ``_acked``,
  ``_acked_fin``, ``_buffer_fin``, ``_reset_error_code``; ``QuicConnection._get_or_create_stream``
  and ``_get_or_create_stream_for_send``: every stream's sender drops acknowledged
  bytes lazily (see ``CompactSender``).
- ``QuicConnection._handshake_complete``: 0-RTT requests are marked replayable.
- ``QuicConnection._close_event``: whether the connection is closing.
- ``QuicConnection._host_cids``, ``_local_initial_source_connection_id`` and
  ``_replenish_connection_ids``: connection IDs carry the owning worker's index.
- ``QuicConnection._local_active_connection_id_limit`` and
  ``_remote_active_connection_id_limit``: four connection IDs each way instead of
  eight (see ``ACTIVE_CIDS``).
- ``QuicConnection._crypto_buffers``: three 16 KiB TLS output buffers, replaced by
  small ones once the handshake is done (half of an idle connection's memory).
- ``QuicConnection.__frame_handlers`` (name-mangled): aioquic builds a dict of
  ~30 bound methods and frozensets per connection (~10 KiB); ours shares one table
  and binds on look-up.
- ``aioquic.quic.connection.EPOCHS``: builds a new frozenset on every call, ~30 per
  connection in ``__init__`` (a tenth of a handshake's CPU); replaced by a cached one.
- ``QuicConnection._handle_padding_frame``: overridden; aioquic walks the padding of
  every Initial byte by byte in Python.
- ``QuicConnection._spaces`` (``ack_at`` of the 1-RTT space): acknowledgements
  are delayed so they ride on the response (see ``CreditedConnection``).
- ``H3Connection._local_control_stream_id``: where an HTTP/3 GOAWAY is written.
- ``QuicPacketRecovery._pacer`` (``QuicPacketPacer._max_datagram_size``): replaced by
  a pacer whose bursts are counted in packets (see ``BurstPacer``).
- ``aioquic._crypto.AEAD`` and ``HeaderProtection``: the C primitives that check
  an Initial cheaply before any connection exists.
"""

from __future__ import annotations

import functools
import hmac
import os
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic._crypto import AEAD, HeaderProtection
from aioquic.buffer import Buffer, BufferReadError
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic import connection as quic_connection_module
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import INITIAL_SALT_VERSION_1, INITIAL_SALT_VERSION_2
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream, QuicStreamSender

__all__ = [
    "PRIVATE",
    "MIN_INITIAL_SIZE",
    "Header",
    "CreditedConnection",
    "RetryTokens",
    "client_configuration",
    "events",
    "initial_decrypts",
    "owner",
    "parse_header",
    "stamp",
    "server_configuration",
    "unacked_bytes",
    "version_negotiation",
]

events = quic_events
"The QUIC event classes (ConnectionTerminated, StreamReset, HandshakeCompleted, ...)."

MIN_INITIAL_SIZE = SMALLEST_MAX_DATAGRAM_SIZE
"A client's first datagram is padded to at least this size (RFC 9000 §14.1)."

PRIVATE = [
    (QuicConnection, "_write_stream_limits"),
    (QuicConnection, "_replenish_connection_ids"),
    ("connection", "_host_cids"),
    ("connection", "_local_initial_source_connection_id"),
    ("connection", "_local_active_connection_id_limit"),
    ("connection", "_remote_active_connection_id_limit"),
    (QuicConnection, "_on_max_stream_data_delivery"),
    ("connection", "_streams"),
    ("connection", "_handshake_complete"),
    ("connection", "_close_event"),
    ("connection", "_spaces"),
    ("connection", "_crypto_buffers"),
    (quic_connection_module, "EPOCHS"),
    (QuicConnection, "_handle_padding_frame"),
    ("connection", "_QuicConnection__frame_handlers"),
    ("space", "ack_at"),
    ("sender", "_buffer_start"),
    ("sender", "_buffer_stop"),
    ("sender", "_buffer"),
    ("sender", "_acked"),
    ("sender", "_acked_fin"),
    ("sender", "_buffer_fin"),
    ("sender", "_reset_error_code"),
    (QuicStreamSender, "on_data_delivery"),
    (QuicConnection, "_get_or_create_stream"),
    (QuicConnection, "_get_or_create_stream_for_send"),
    ("h3", "_local_control_stream_id"),
    ("connection", "_loss"),
    ("recovery", "_pacer"),
    ("pacer", "_max_datagram_size"),
]
"(owner, attribute) pairs this module reads or overrides; checked by a test."

_MAX_STREAM_DATA_CAPACITY = 1 + 2 * 8

ACTIVE_CIDS = 4
"""Connection IDs each side keeps for the other (aioquic: 8). Three spares are plenty
for a client that migrates; each one costs a NEW_CONNECTION_ID frame at the end of
every handshake and an entry in the listener's table for the connection's life."""

# Same frozensets, built once: QuicConnection.__init__ asks for ~30 of them per connection.
quic_connection_module.EPOCHS = functools.lru_cache(maxsize=None)(quic_connection_module.EPOCHS)

BURST_PACKETS = 16
"Most datagrams one pacing burst may hold (what aioquic allows when the window is large)."


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with its burst counted in packets.

    aioquic clamps the time between packets to at least 1 us but sizes the burst from
    the rate: above one datagram per microsecond (a large window over a sub-millisecond
    RTT: loopback, a LAN) the burst is shorter than one packet time, so after every
    datagram the pacer blocks and the next one waits for an event-loop turn of its own
    (measured on a 10 MiB h3 download over loopback: 26,487 pacing wake-ups for ~41,000
    datagrams, 1.3 datagrams per send). Here the burst is at least 2 and up to
    ``BURST_PACKETS`` packet times, a quarter of the window as in aioquic; at rates below
    the clamp it is the same burst aioquic computes.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is not None:
            quarter = congestion_window // 4 // self._max_datagram_size
            burst = max(2, min(quarter, BURST_PACKETS)) * self.packet_time
            self.bucket_max = max(self.bucket_max, burst)


SPENT_CRYPTO_BUFFER = 1024
"""Capacity of each TLS output buffer after the handshake: nothing more is written for the
Initial and Handshake epochs, and a server's 1-RTT messages (its session ticket) are out."""

ACK_DELAY = 0.020
"""Longest wait before acknowledging a lone 1-RTT packet: under the 25 ms max_ack_delay
aioquic advertises, long enough that the ACK usually rides on the response."""


class CompactSender(QuicStreamSender):
    """aioquic's stream sender, dropping acknowledged bytes from its buffer lazily.

    aioquic deletes acknowledged bytes from the front of the send buffer on every
    ACK. CPython keeps that as an offset into the allocation, and the next write
    that grows the buffer copies everything left into a fresh allocation: with
    about a megabyte queued (the h3 send high-water mark) each 64 KiB write copied
    about a megabyte. Here acknowledged bytes stay in front until they are at least
    half the buffer, so a byte is copied about once.

    ``_buffer_start`` keeps aioquic's meaning, the offset of the buffer's first
    byte (``get_frame`` and ``write`` are aioquic's); ``acked_to`` is the offset of
    the first byte not yet acknowledged.
    """

    acked_to = 0

    def on_data_delivery(
        self, delivery: QuicDeliveryState, start: int, stop: int, fin: bool
    ) -> None:
        if delivery != QuicDeliveryState.ACKED or self._reset_error_code is not None:
            super().on_data_delivery(delivery, start, stop, fin)  # loss: no buffer change
            return
        assert not fin or stop == self._buffer_fin, "FIN acknowledged at another offset"
        if stop > start:
            self._acked.add(start, stop)
            first = self._acked[0]
            if first.start == self.acked_to:
                self._acked.shift()
                self.acked_to = first.stop
                dead = first.stop - self._buffer_start
                if dead * 2 >= len(self._buffer):
                    del self._buffer[:dead]
                    self._buffer_start = first.stop
        if fin:
            self._acked_fin = True
        if self._acked_fin and self.acked_to == self._buffer_fin:
            self.is_finished = True


def server_configuration(
    *,
    cert: str,
    key: str,
    idle_timeout: float,
    max_datagram_size: int,
    congestion_control: str,
    stream_window: int,
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=False,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        congestion_control_algorithm=congestion_control,
        max_stream_data=stream_window,
        max_data=16 * stream_window,
    )
    configuration.load_cert_chain(cert, key)
    return configuration


def client_configuration(**kw: Any) -> QuicConfiguration:
    return QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True, **kw)


@dataclass
class Header:
    """What the listener needs of a packet's first header."""

    long: bool
    version: int | None
    packet_type: Any
    dcid: bytes
    scid: bytes
    token: bytes
    encrypted_offset: int
    packet_length: int

    @property
    def initial(self) -> bool:
        return self.packet_type == QuicPacketType.INITIAL

    @property
    def negotiation(self) -> bool:
        return self.packet_type == QuicPacketType.VERSION_NEGOTIATION


def parse_header(data: bytes, cid_length: int) -> Header | None:
    """The first packet header of a datagram, or None when it is not QUIC."""
    if not data:
        return None
    if not data[0] & 0x80:  # short header: only the connection ID matters
        if len(data) < 1 + cid_length or not data[0] & 0x40:
            return None
        dcid = data[1 : 1 + cid_length]
        return Header(False, None, QuicPacketType.ONE_RTT, dcid, b"", b"", 0, len(data))
    buf = Buffer(data=data)
    try:
        h = pull_quic_header(buf, host_cid_length=cid_length)
    except (ValueError, BufferReadError):
        return None
    return Header(
        True,
        h.version,
        h.packet_type,
        h.destination_cid,
        h.source_cid,
        h.token,
        buf.tell(),
        h.packet_length,
    )


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) with SHA-256, for outputs of one hash block."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


def initial_decrypts(data: bytes, header: Header) -> bool:
    """True when an Initial packet opens with the keys its DCID implies.

    A forged Initial (a real one with its DCID rewritten, random bytes) fails
    here, before any connection state exists for it. Only the client's
    direction is derived, with the standard library's HMAC and aioquic's C
    AEAD: this runs for every unknown Initial, so it has to be cheap."""
    if header.version == QuicProtocolVersion.VERSION_2:
        salt, prefix = INITIAL_SALT_VERSION_2, b"quicv2 "
    elif header.version == QuicProtocolVersion.VERSION_1:
        salt, prefix = INITIAL_SALT_VERSION_1, b"quic "
    else:
        return False
    secret = _expand_label(hmac.digest(salt, header.dcid, "sha256"), b"client in", 32)
    key = _expand_label(secret, prefix + b"key", 16)
    iv = _expand_label(secret, prefix + b"iv", 12)
    hp = _expand_label(secret, prefix + b"hp", 16)
    packet = data[: header.packet_length]
    try:
        plain_header, packet_number = HeaderProtection(b"aes-128-ecb", hp).remove(
            packet, header.encrypted_offset
        )
        AEAD(b"aes-128-gcm", key, iv).decrypt(
            packet[len(plain_header) :], plain_header, packet_number
        )
    except Exception:
        return False
    return True


def version_negotiation(header: Header, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=header.dcid, destination_cid=header.scid, supported_versions=versions
    )


class RetryTokens:
    """Stateless Retry: tokens bind the client address and the original DCID."""

    def __init__(self, worker: int | None = None) -> None:
        self._handler = QuicRetryTokenHandler()
        self.worker = worker

    def retry_packet(self, header: Header, addr: Any, now: float) -> bytes:
        assert header.version is not None
        source_cid = stamp(os.urandom(8), self.worker)  # the token is ours to check
        token = self._handler.create_token(
            address=addr,
            original_destination_connection_id=header.dcid,
            retry_source_connection_id=source_cid,
            now=now,
        )
        return encode_quic_retry(
            version=header.version,
            source_cid=source_cid,
            destination_cid=header.scid,
            original_destination_cid=header.dcid,
            retry_token=token,
        )

    def validate(self, header: Header, addr: Any, now: float) -> bytes | None:
        """The original DCID the token was issued for, or None if it is not ours/valid."""
        try:
            return self._handler.validate_token(
                address=addr, destination_cid=header.dcid, token=header.token, now=now
            )
        except (ValueError, IndexError, BufferReadError):
            return None


def stamp(cid: bytes, worker: int | None) -> bytes:
    """A connection ID whose first byte names the worker that owns the connection."""
    if worker is None or not cid:
        return cid
    return bytes([worker]) + cid[1:]


def owner(cid: bytes) -> int:
    """The worker a connection ID was stamped for (see :func:`stamp`)."""
    return cid[0] if cid else -1


class _FrameHandlers:
    """Stands in for aioquic's per-connection frame handler dict: one table of (function,
    epochs) per connection class, bound to the connection when a frame is handled."""

    __slots__ = ("_conn", "_table")
    _tables: dict[type, dict[int, tuple[Any, frozenset[Any]]]] = {}

    def __init__(self, conn: QuicConnection, built: dict[int, tuple[Any, frozenset[Any]]]):
        self._conn = conn
        cls = type(conn)
        table = self._tables.get(cls)
        if table is None:
            table = {
                frame: (getattr(cls, method.__name__), epochs)
                for frame, (method, epochs) in built.items()
            }
            self._tables[cls] = table
        self._table = table

    def __getitem__(self, frame_type: int) -> tuple[Any, frozenset[Any]]:
        func, epochs = self._table[frame_type]  # KeyError: unknown frame, as with the dict
        return func.__get__(self._conn), epochs


class CreditedConnection(QuicConnection):
    """QuicConnection whose request-stream receive windows follow what the proxy consumed.

    aioquic raises a stream's window as data arrives, whether or not anyone read
    it; here a stream listed in ``credit`` only gets the window it was granted,
    so a slow upstream slows the client instead of filling memory.

    With several workers, every connection ID it issues carries the worker's
    index in its first byte, so a datagram that reaches another worker (the
    client's address changed) can be handed to the owner.
    """

    __slots__ = ("credit", "worker", "host_cid", "_unacked")
    # outside the instance dict: one more key would double aioquic's ~3 KiB attribute table

    def __init__(self, *args: Any, worker: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        name = "_QuicConnection__frame_handlers"
        setattr(self, name, _FrameHandlers(self, getattr(self, name)))
        self.credit: dict[int, int] = {}
        self._unacked = 0
        self._local_active_connection_id_limit = ACTIVE_CIDS
        pacer = self._loss._pacer
        self._loss._pacer = BurstPacer(max_datagram_size=pacer._max_datagram_size)
        self.worker = worker
        if worker is not None:
            first = self._host_cids[0]
            first.cid = stamp(first.cid, worker)
            self.host_cid = first.cid
            self._local_initial_source_connection_id = first.cid

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """As aioquic, but 1-RTT acknowledgements follow RFC 9000 §13.2.2: at once from
        the second ack-eliciting datagram on, else after ``ACK_DELAY`` (aioquic waits
        1 ms, so nearly every request got an ACK-only packet of its own)."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        pending = space is not None and space.ack_at is not None
        super().receive_datagram(data, addr, now=now)
        if space is None or space.ack_at is None:
            self._unacked = 0
        elif not pending:
            self._unacked = 1
            space.ack_at = now + ACK_DELAY
        else:
            self._unacked += 1
            if self._unacked >= 2:
                space.ack_at = now

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """As aioquic; a delayed ACK becomes due, so it rides in the packet this data
        goes out in (aioquic only writes ACKs that are due). An empty write sends nothing
        (the HTTP/3 layer writes its QPACK decoder stream after every header block, mostly
        empty) and leaves the ACK waiting for the response."""
        super().send_stream_data(stream_id, data, end_stream)
        if not data and not end_stream:
            return
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = 0.0

    def _get_or_create_stream_for_send(self, stream_id: int) -> QuicStream:
        """As aioquic; a stream about to carry data gets a ``CompactSender``."""
        stream = super()._get_or_create_stream_for_send(stream_id)
        if type(stream.sender) is QuicStreamSender:
            stream.sender.__class__ = CompactSender  # nothing written to it yet
        return stream

    def _handle_padding_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        """As aioquic (skip the zero bytes that follow), without a Python loop per byte:
        every client Initial carries hundreds of them."""
        pos = buf.tell()
        rest = buf.data_slice(pos, buf.capacity)
        buf.seek(pos + len(rest) - len(rest.lstrip(b"\x00")))
        if self._quic_logger is not None:
            context.quic_logger_frames.append(self._quic_logger.encode_padding_frame())

    def shed_handshake_buffers(self) -> None:
        """Once the handshake is complete: aioquic keeps a 16 KiB TLS output buffer per
        epoch for the connection's life (48 KiB of an idle connection's ~100 KiB); empty
        ones are swapped for small ones."""
        for epoch, buf in list(self._crypto_buffers.items()):
            if buf.tell() == 0:
                self._crypto_buffers[epoch] = Buffer(capacity=SPENT_CRYPTO_BUFFER)

    def _replenish_connection_ids(self) -> None:
        self._remote_active_connection_id_limit = min(
            self._remote_active_connection_id_limit, ACTIVE_CIDS
        )
        known = len(self._host_cids)
        super()._replenish_connection_ids()
        for fresh in self._host_cids[known:]:  # not sent yet: safe to stamp
            fresh.cid = stamp(fresh.cid, self.worker)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        limit = self.credit.get(stream.stream_id)
        if limit is None:
            local = stream.max_stream_data_local
            if (
                stream.max_stream_data_local_sent == local
                and stream.receiver.highest_offset * 2 <= local
            ):
                return  # aioquic would neither raise nor send it (every stream, every packet)
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

    # ------------------------------------------------------------ private reads

    @property
    def handshake_complete(self) -> bool:
        return bool(self._handshake_complete)

    @property
    def closing(self) -> bool:
        return self._close_event is not None

    def unacked_total(self) -> int:
        """Stream bytes sent and not yet acknowledged, all streams together."""
        return sum(unacked_bytes(self, sid) for sid in self._streams)


def unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream and not yet acknowledged (what the QUIC core still holds)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    if isinstance(sender, CompactSender):
        return sender._buffer_stop - sender.acked_to
    return int(sender._buffer_stop - sender._buffer_start)


def control_stream(h3: H3Connection) -> int | None:
    """The local HTTP/3 control stream, where GOAWAY goes."""
    return h3._local_control_stream_id
