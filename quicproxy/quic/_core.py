"""The QUIC core: the one module that knows the QUIC library (qh3).

Everything the listener and the HTTP/3 adapter need from the QUIC library goes
through here: reading a packet header, checking that an Initial decrypts,
Retry, Version Negotiation and stateless reset packets, session tickets that carry
their own state (sealed under the keys of ``_keys``), the connection object (with a budget for
the frames a client sends that cost work and produce nothing, ``FrameGuard``) and
the few private attributes the proxy relies on. Swapping the QUIC library means
rewriting this module (and the h3 framing in ``_h3.py``, on qh3's public API), nothing
else; ``_h3.py`` and the listener use no private attribute of qh3.

qh3 1.9 is aioquic's design (the connection's state machine in Python) with the
per-packet work in Rust: packet protection and building, stream send and receive
buffers, range sets, the pacer, QPACK and TLS primitives. In memory, one server
connection spent ~12 ms of CPU per MiB sent against aioquic's ~41, ~74 us per
small request against ~130, and ~1.5 ms per handshake against ~2.0; with the short
1-RTT packet path (``_packet.py``) and the idle streams kept out of qh3's send
queue, ~5 ms per MiB on an HTTP/3 connection (qh3 2.x moves the whole state machine
to Rust but grants a stream's receive credit as soon as its data is delivered, with
no hook to withhold it: the memory bound below would be lost).

Private qh3 attributes used, and why (``PRIVATE`` lists them; a test fails
loudly when an upgrade removes one):

- ``qh3.quic.connection.QuicStream``: replaced by ``ProxyStream``, whose receive
  window never grows past what the proxy granted (``credit``); qh3 doubles a
  stream's window as data arrives (and on every STREAM_DATA_BLOCKED), whether or
  not anyone read it. ``QuicConnection._streams_dirty_limits``: where a raised
  window is queued for qh3 to announce. Its ``is_blocked`` also holds a reset
  stream's data back (see ``CreditedConnection._reset_sent``); ``_handle_stop_sending_frame``
  is overridden to know when the peer's STOP_SENDING reset one.
- ``QuicConnection._streams`` and the sender's ``_pending``: bytes written to a
  stream and not sent yet (send back-pressure). ``_streams_queue``: streams qh3
  dropped from it are put back, and idle ones wait outside it while packets are
  built (see ``CreditedConnection.datagrams_to_send``).
- ``QuicConnection._handshake_complete``: 0-RTT requests are marked replayable.
- ``QuicConnection._initialize`` and ``_is_client``, and the TLS context's
  ``_new_session_ticket`` (the NewSessionTicket a server is about to send): a server's
  session tickets carry their sealed state (``SessionTickets``), so any process with the
  fleet's secret resumes them; qh3 keeps the state in the process that issued them.
- ``QuicConnection._close_event``: whether the connection is closing.
- ``QuicConnection._host_cids``, ``_host_cid_seq_map``,
  ``_local_initial_source_connection_id`` and ``_replenish_connection_ids``:
  connection IDs carry the owning worker's index and the id of the secret their
  stateless-reset token is derived from (``stamp``); the token (qh3: random) is
  derived from the connection ID, so any process with the secret can reset it.
- ``QuicConnection._remote_active_connection_id_limit``: four connection IDs each
  way instead of eight (see ``ACTIVE_CIDS``; ours through the configuration).
- ``QuicConnection._crypto_buffers``: three 16 KiB TLS output buffers, replaced by
  small ones once the handshake is done.
- ``QuicConnection._spaces`` (``ack_at`` of the 1-RTT space): acknowledgements
  are delayed so they ride on the response (see ``CreditedConnection``).
- ``QuicConnection._loss`` (``bytes_in_flight``): whether everything sent was
  acknowledged (closing a drained connection).
- ``H3Connection._local_control_stream_id``: where an HTTP/3 GOAWAY is written.
- ``H3Connection._decoder``: replaced by a QPACK decoder without a dynamic table (see
  ``ProxyH3``), ``_get_local_settings`` (the SETTINGS announced) and ``_decode_headers``
  (a header block that is not UTF-8 or too large becomes a refusal) overridden;
  ``H3Connection._stream`` (an HTTP/3 stream's parsing state): dropped when the proxy
  refuses a request stream before qh3 saw its headers (``ProxyH3.forget``).
- ``QuicConnection._local_max_streams_bidi`` and ``_local_max_streams_uni``: replaced by
  ``StreamCredit``, raised as the peer's request streams finish, not as they open (qh3
  doubles a limit once the peer has opened half of it). ``_streams_finished``: where a
  finished stream is remembered when ``CreditedConnection`` discards it (as qh3 does);
  replaced by ``FinishedStreams``, which does not grow with every request.
- ``QuicConnection._network_paths``, ``_max_datagram_size``, ``_mtu_probe_sizes``,
  ``_mtu_probe_pending``, ``_on_mtu_probe_delivery`` and the congestion controller's
  ``_max_datagram_size``: qh3's path MTU probe, turned on for the server and started
  over on each new path (see ``CreditedConnection._probe_datagram_size``).
- ``qh3.tls`` / ``qh3.quic.crypto`` ``hkdf_expand_label`` and ``hkdf_extract``: replaced
  by one-shot HMAC versions (same bytes, a fraction of the cost).
- ``qh3.quic.connection.EPOCHS``: memoised (it returns frozensets: immutable, shareable).
- ``qh3.quic.connection.QuicPacketBuilder``: replaced by ``_packet.PacketBuilder``,
  which builds 1-RTT packets on a short path (the builder attributes it uses are in
  ``_packet.PRIVATE``).
- The frame handlers ``_handle_<type>_frame`` of every frame type a client may send
  (``_GUARDED_FRAMES``; qh3 binds them into its per-connection dispatch table),
  ``_assert_stream_can_receive``, ``_get_or_create_stream``, ``_local_max_data``,
  ``_find_network_path``, the 1-RTT space's ``packet_number`` and
  ``_local_max_streams_bidi`` / ``_uni`` (``used``: packets sent and streams opened refill
  the budget): frames that cost work and produce nothing are budgeted,
  *_BLOCKED frames never raise a window, and a connection keeps a few network paths (see
  ``FrameGuard``).
- ``QuicConnection._initialize`` (where qh3 builds the connection's ``tls.Context``),
  ``tls.Context._server_handle_hello`` and ``tls.pull_client_hello``: with several
  certificate pairs, the ClientHello's server name is read first and the pair chosen
  for it is put on the TLS context before qh3 answers (see ``CreditedConnection``).
"""

from __future__ import annotations

import datetime
import functools
import hmac
import ipaddress
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from qh3 import tls
from qh3._hazmat import (
    AeadAes128Gcm,
    Buffer,
    BufferReadError,
    DecoderStreamError,
    QpackDecoder,
    QUICHeaderProtection,
)
from qh3.h3.connection import (
    H3_ALPN,
    ErrorCode,
    H3Connection,
    QpackDecompressionFailed,
    Setting,
)
from qh3.quic import connection as quic_connection_module
from qh3.quic import crypto as quic_crypto_module
from qh3.quic import events as quic_events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.crypto import INITIAL_SALT_VERSION_1, INITIAL_SALT_VERSION_2
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from qh3.quic.stream import QuicStream
from qh3.tls import SessionTicket

from quicproxy.quic import _packet
from quicproxy.quic._h3gate import QpackError, field_section_size
from quicproxy.quic._keys import RESET_TOKEN_SIZE, QuicKeys
from quicproxy.quic._packet import PacketBuilder

__all__ = [
    "PRIVATE",
    "MIN_INITIAL_SIZE",
    "MIN_RESET_SIZE",
    "Header",
    "CreditedConnection",
    "FinishedStreams",
    "ProxyH3",
    "ProxyStream",
    "TooLarge",
    "Undecodable",
    "StreamCredit",
    "QuicConfiguration",
    "RetryTokens",
    "SessionTicket",
    "SessionTickets",
    "events",
    "initial_decrypts",
    "stateless_reset",
    "owner",
    "generation",
    "parse_header",
    "stamp",
    "stream_answered",
    "server_configuration",
    "unsent_bytes",
    "version_negotiation",
]

log = logging.getLogger("quicproxy")

events = quic_events
"The QUIC event classes (ConnectionTerminated, StreamReset, HandshakeCompleted, ...)."

MIN_INITIAL_SIZE = 1200
"A client's first datagram is padded to at least this size (RFC 9000 §14.1)."

_BUDGETED_FRAMES = (
    "ping",
    "crypto",
    "reset_stream",
    "stop_sending",
    "max_data",
    "max_stream_data",
    "max_streams_bidi",
    "max_streams_uni",
    "new_connection_id",
    "retire_connection_id",
    "path_challenge",
    "path_response",
)
"Frame types of which every one spends ``FrameGuard``'s budget."

_GUARDED_FRAMES = (
    *_BUDGETED_FRAMES,
    "ack",
    "padding",
    "stream",
    "streams_blocked",
    "data_blocked",
    "stream_data_blocked",
)
"Frame types whose qh3 handlers ``FrameGuard`` overrides."

PRIVATE = [
    (quic_connection_module, "QuicStream"),
    (quic_connection_module, "EPOCHS"),
    (quic_connection_module, "QuicPacketBuilder"),
    *((_packet.packet_builder.QuicPacketBuilder, name) for name in _packet.PRIVATE),
    (tls, "hkdf_expand_label"),
    (tls, "hkdf_extract"),
    (quic_crypto_module, "hkdf_expand_label"),
    (quic_crypto_module, "hkdf_extract"),
    ("connection", "_network_paths"),
    ("connection", "_max_datagram_size"),
    ("connection", "_mtu_probe_sizes"),
    ("connection", "_mtu_probe_pending"),
    (QuicConnection, "_on_mtu_probe_delivery"),
    ("cc", "_max_datagram_size"),
    (QuicConnection, "_replenish_connection_ids"),
    ("connection", "_streams_dirty_limits"),
    ("connection", "_streams_queue"),
    (QuicConnection, "_handle_stop_sending_frame"),
    ("connection", "_host_cids"),
    ("connection", "_host_cid_seq_map"),
    ("connection", "_local_initial_source_connection_id"),
    ("connection", "_remote_active_connection_id_limit"),
    ("connection", "_streams"),
    ("connection", "_handshake_complete"),
    ("connection", "_close_event"),
    ("connection", "_spaces"),
    ("connection", "_crypto_buffers"),
    ("connection", "_loss"),
    ("recovery", "bytes_in_flight"),
    ("space", "ack_at"),
    ("space", "packet_number"),
    ("sender", "_pending"),
    ("h3", "_local_control_stream_id"),
    *((QuicConnection, f"_handle_{name}_frame") for name in _GUARDED_FRAMES),
    (QuicConnection, "_assert_stream_can_receive"),
    (QuicConnection, "_get_or_create_stream"),
    (QuicConnection, "_find_network_path"),
    ("connection", "_local_max_data"),
    ("connection", "_local_max_streams_bidi"),
    ("connection", "_local_max_streams_uni"),
    ("h3", "_decoder"),
    ("h3", "_stream"),
    (H3Connection, "_get_local_settings"),
    (H3Connection, "_decode_headers"),
    ("connection", "_streams_finished"),
    (QuicConnection, "_initialize"),
    ("connection", "_is_client"),
    ("tls", "_new_session_ticket"),
    (tls.Context, "_server_handle_hello"),
    (tls, "pull_client_hello"),
]
"(owner, attribute) pairs this module reads or overrides; checked by a test."

ACTIVE_CIDS = 4
"""Connection IDs each side keeps for the other (qh3: 8). Three spares are plenty
for a client that migrates; each one costs a NEW_CONNECTION_ID frame at the end of
every handshake and an entry in the listener's table for the connection's life."""

SPENT_CRYPTO_BUFFER = 1024
"""Capacity of each TLS output buffer after the handshake: nothing more is written for the
Initial and Handshake epochs, and a server's 1-RTT messages (its session ticket) are out."""

PROBE_AFTER = 8
"""Datagrams in one flush that show a connection sending in bulk: then (and not for a
short exchange) the larger datagram size is probed for."""

ACK_DELAY = 0.020
"""Longest wait before acknowledging a lone 1-RTT packet: under the 25 ms max_ack_delay
qh3 advertises, long enough that the ACK usually rides on the response."""


class ProxyStream(QuicStream):
    """qh3's stream, whose receive window stops at ``limit`` when one is set.

    qh3 doubles a stream's receive window whenever the peer has sent more than half
    of it, and on every STREAM_DATA_BLOCKED, whether or not the data was read. A
    request stream (client-initiated, bidirectional) starts limited to its initial
    window; the proxy raises the limit as it consumes the body (``CreditedConnection.credit``),
    so a slow upstream slows the client instead of filling memory. Other streams
    (the peer's HTTP/3 control and QPACK streams, read as they arrive) keep qh3's rule.
    """

    __slots__ = ("limit", "_local")

    def __init__(
        self,
        stream_id: int | None = None,
        max_stream_data_local: int = 0,
        max_stream_data_remote: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        self.limit: int | None = None
        self._local = 0
        super().__init__(
            stream_id, max_stream_data_local, max_stream_data_remote, readable, writable
        )
        if stream_id is not None and stream_id % 4 == 0 and readable and writable:
            self.limit = max_stream_data_local

    @property
    def max_stream_data_local(self) -> int:
        return self._local

    @max_stream_data_local.setter
    def max_stream_data_local(self, value: int) -> None:
        limit = self.limit
        if limit is not None and value > limit:
            value = max(self._local, limit)
        self._local = value


quic_connection_module.QuicStream = ProxyStream  # type: ignore[misc]


def hkdf_expand_label(
    algorithm: int, secret: bytes, label: bytes, hash_value: bytes, length: int
) -> bytes:
    """TLS 1.3's HKDF-Expand-Label (RFC 8446 §7.1), as qh3's, with one-shot HMACs
    (``hmac.digest``): qh3 builds an HMAC object per block, and a handshake derives a
    few dozen keys that way (~14 % of a server's handshake CPU)."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + bytes((len(hash_value),)) + hash_value
    digest = f"sha{algorithm}"
    out = block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes((counter,)), digest)
        out += block
        counter += 1
    return out[:length]


def hkdf_extract(algorithm: int, salt: bytes, key_material: bytes) -> bytes:
    """HKDF-Extract (RFC 5869), as qh3's, with a one-shot HMAC."""
    return hmac.digest(salt, key_material, f"sha{algorithm}")


for _module in (tls, quic_crypto_module):
    _module.hkdf_expand_label = hkdf_expand_label  # type: ignore[attr-defined]
    _module.hkdf_extract = hkdf_extract  # type: ignore[attr-defined]

# 1-RTT packets are built on a short path (see _packet.py).
quic_connection_module.QuicPacketBuilder = PacketBuilder  # type: ignore[misc]

# qh3 builds its frame-handler table per connection, with a fresh frozenset of epochs
# for each of its ~33 entries: the same few sets, built once (~20 us per connection).
quic_connection_module.EPOCHS = functools.cache(quic_connection_module.EPOCHS)


class FinishedStreams(set[int]):
    """qh3's record of the streams it discarded (``_streams_finished``), kept compact.

    qh3 adds every finished stream's ID to a set it keeps for the connection's life, so a
    long-lived connection grew by ~66 bytes per request without bound. Here, per stream
    type (ID % 4), the IDs finished from the first one on without a gap are one number
    (``floors``: the lowest ID of that type not known finished); only IDs finished above a
    gap (a stream still open below them) are held, until the gap closes."""

    __slots__ = ("floors",)

    def __init__(self) -> None:
        super().__init__()
        self.floors = [0, 1, 2, 3]

    def add(self, stream_id: int) -> None:
        kind = stream_id & 3
        floor = self.floors[kind]
        if stream_id < floor:
            return
        if stream_id != floor:
            super().add(stream_id)
            return
        floor += 4
        while super().__contains__(floor):
            super().discard(floor)
            floor += 4
        self.floors[kind] = floor

    def __contains__(self, stream_id: object) -> bool:
        if not isinstance(stream_id, int):
            return False
        return stream_id < self.floors[stream_id & 3] or super().__contains__(stream_id)


class _Credit(dict[int, int]):
    """Request stream id -> receive limit granted so far (bytes consumed + window).
    Setting one raises that stream's window and queues the MAX_STREAM_DATA frame."""

    __slots__ = ("_conn",)

    def __init__(self, conn: QuicConnection) -> None:
        super().__init__()
        self._conn = conn

    def __setitem__(self, stream_id: int, limit: int) -> None:
        super().__setitem__(stream_id, limit)
        conn = self._conn
        stream = conn._streams.get(stream_id)
        if isinstance(stream, ProxyStream) and (stream.limit is None or limit > stream.limit):
            stream.limit = limit
            stream.max_stream_data_local = limit
            conn._streams_dirty_limits.add(stream)


class StreamCredit:
    """A MAX_STREAMS limit (what qh3 reads of its ``Limit``) that holds.

    qh3 doubles a stream limit as soon as the peer has *opened* more than half of it, so
    with a limit of 100 a client can keep thousands of requests open at once. Here the
    limit is raised by one only as one of the peer's streams finishes (``finished``):
    the concurrency advertised holds at every moment, and a stream beyond it is qh3's
    own STREAM_LIMIT_ERROR. A limit nobody raises (unidirectional streams: HTTP/3 needs
    three of them) stays at its initial value."""

    __slots__ = ("frame_type", "name", "sent", "value", "opened")

    def __init__(self, frame_type: int, name: str, value: int) -> None:
        self.frame_type = frame_type
        self.name = name
        self.sent = value
        self.value = value
        self.opened = 0

    @property
    def used(self) -> int:
        """What qh3 compares with half the limit to double it: never more than 0."""
        return 0

    @used.setter
    def used(self, count: int) -> None:
        self.opened = max(self.opened, count)

    def finished(self) -> None:
        self.value += 1


@dataclass
class ServerConfiguration(QuicConfiguration):
    """qh3's configuration plus the datagram size the server probes for (0: none)."""

    probe_size: int = 0


def server_configuration(
    *,
    cert: str,
    key: str,
    idle_timeout: float,
    max_datagram_size: int,
    stream_window: int,
    probe_size: int = 0,
) -> QuicConfiguration:
    configuration = ServerConfiguration(
        probe_size=probe_size,
        alpn_protocols=H3_ALPN,
        is_client=False,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        active_connection_id_limit=ACTIVE_CIDS,
        max_stream_data=stream_window,
        max_data=16 * stream_window,
    )
    configuration.load_cert_chain(cert, key)
    return configuration


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


def initial_decrypts(data: bytes, header: Header) -> bool:
    """True when an Initial packet opens with the keys its DCID implies.

    A forged Initial (a real one with its DCID rewritten, random bytes) fails
    here, before any connection state exists for it. Only the client's
    direction is derived, with one-shot HMACs and qh3's AEAD:
    this runs for every unknown Initial, so it has to be cheap."""
    if header.version == QuicProtocolVersion.VERSION_2:
        salt, prefix = INITIAL_SALT_VERSION_2, b"quicv2 "
    elif header.version == QuicProtocolVersion.VERSION_1:
        salt, prefix = INITIAL_SALT_VERSION_1, b"quic "
    else:
        return False
    secret = hkdf_expand_label(256, hkdf_extract(256, salt, header.dcid), b"client in", b"", 32)
    key = hkdf_expand_label(256, secret, prefix + b"key", b"", 16)
    iv = hkdf_expand_label(256, secret, prefix + b"iv", b"", 12)
    hp = hkdf_expand_label(256, secret, prefix + b"hp", b"", 16)
    packet = data[: header.packet_length]
    try:
        plain_header, packet_number = QUICHeaderProtection("aes-128-ecb", hp).remove(
            packet, header.encrypted_offset
        )
        AeadAes128Gcm(key, iv).decrypt(packet_number, packet[len(plain_header) :], plain_header)
    except Exception:
        return False
    return True


def version_negotiation(header: Header, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=header.dcid, destination_cid=header.scid, supported_versions=versions
    )


MIN_RESET_SIZE = 21
"""The smallest stateless reset: a short header's first byte, 38 unpredictable bits and
the 16-byte token (RFC 9000 §10.3)."""

RESET_SIZE = 43
"""A stateless reset's size when the datagram that triggered it is larger: a small
1-RTT packet's (RFC 9000 §10.3 suggests answering up to 43-byte packets one byte shorter)."""


def stateless_reset(dcid: bytes, size: int, keys: QuicKeys) -> bytes | None:
    """A stateless reset (RFC 9000 §10.3) for a datagram of ``size`` bytes to connection
    ID ``dcid``: shorter than it (two endpoints resetting each other's resets run out
    of bytes, §10.3.3) and never below ``MIN_RESET_SIZE``; None when it cannot be both.
    It looks like a short-header packet: fixed bit set, the rest unpredictable."""
    length = min(size - 1, RESET_SIZE)
    if length < MIN_RESET_SIZE:
        return None
    head = bytearray(os.urandom(length - RESET_TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)
    return bytes(head) + keys.reset_token(dcid)


_TOKEN_LIFETIME = 30.0
"Clients answer a Retry at once; a token older than this is refused (RFC 9000 §8.1.4)."


def _address_bytes(addr: Any) -> bytes:
    return ipaddress.ip_address(addr[0]).packed + struct.pack("!H", addr[1])


_CLOCK_SKEW = 5.0
"Seconds a token may seem to come from the future (another node's clock)."


class RetryTokens:
    """Stateless Retry: tokens bind the client address, the original DCID and the
    Retry's source CID (where the client must write next), sealed with AES-GCM under
    the current Retry key (``_keys``: shared by the fleet, or of this process),
    and expire after 30 s of wall-clock time. A token starts with its key's id; any
    accepted key validates it (rotation)."""

    def __init__(
        self,
        worker: int | None = None,
        keys: QuicKeys | None = None,
        generation: int | None = None,
    ) -> None:
        self.keys = keys or QuicKeys.random()
        self.worker = worker
        self.generation = generation
        self._aeads: dict[bytes, AESGCM] = {}

    def _aead(self, key: bytes) -> AESGCM:
        aead = self._aeads.get(key)
        if aead is None:
            if len(self._aeads) > 4:  # keys rotated away
                self._aeads.clear()
            aead = self._aeads[key] = AESGCM(key)
        return aead

    def retry_packet(self, header: Header, addr: Any, now: float) -> bytes:
        """A Retry for an Initial; ``now`` is wall-clock time (``time.time()``)."""
        assert header.version is not None
        source_cid = stamp(os.urandom(8), self.worker, None, self.generation)  # ours to check
        plain = (
            struct.pack("!dB", now, len(header.dcid))
            + header.dcid
            + bytes([len(source_cid)])
            + source_cid
        )
        keys = self.keys.current
        head = bytes([keys.id]) + os.urandom(12)
        token = head + self._aead(keys.retry).encrypt(head[1:], plain, _address_bytes(addr))
        return encode_quic_retry(
            version=header.version,
            source_cid=source_cid,
            destination_cid=header.scid,
            original_destination_cid=header.dcid,
            retry_token=token,
        )

    def validate(self, header: Header, addr: Any, now: float) -> bytes | None:
        """The original DCID the token was issued for, or None if it is not ours/valid."""
        token = header.token
        if len(token) < 1 + 12 + 16 + 9:
            return None
        for keys in self.keys.for_id(token[0]):
            try:
                plain = self._aead(keys.retry).decrypt(
                    token[1:13], token[13:], _address_bytes(addr)
                )
                issued, size = struct.unpack_from("!dB", plain)
                odcid = plain[9 : 9 + size]
                rest = plain[9 + size :]
                retry_cid = rest[1 : 1 + rest[0]]
            except (InvalidTag, ValueError, IndexError, struct.error):
                continue
            if retry_cid != header.dcid or not -_CLOCK_SKEW <= now - issued <= _TOKEN_LIFETIME:
                return None
            return odcid
        return None


TICKET_AAD = b"quicproxy session ticket"
_TICKET = struct.Struct("!HIdI?I")
"A sealed ticket's fields before its secret: suite, age_add, issued, lifetime, early data."


class SessionTickets:
    """TLS session tickets (resumption, 0-RTT) that carry their own state: the
    resumption secret, cipher suite, issue time, lifetime and age_add, sealed with
    AES-256-GCM under the current ticket key (``_keys``) and prefixed with its id.
    Any process holding the secret resumes a ticket another issued (qh3 keeps tickets
    in the process: ``_SealingContext`` seals them as qh3 builds them).

    A ticket is taken once per process (0-RTT replay is refused here, not across the
    fleet: a replayed ClientHello may be accepted once by each replica, which is why
    0-RTT admits safe methods only; see ``Handler``)."""

    def __init__(self, keys: QuicKeys, limit: int = 10000) -> None:
        self.keys = keys
        self.limit = limit
        self._used: dict[bytes, None] = {}

    def seal(
        self, secret: bytes, cipher_suite: int, age_add: int, lifetime: int, early: int | None
    ) -> bytes:
        keys = self.keys.current
        plain = _TICKET.pack(
            cipher_suite, age_add, time.time(), lifetime, early is not None, early or 0
        )
        head = bytes([keys.id]) + os.urandom(12)
        return head + AESGCM(keys.ticket).encrypt(head[1:], plain + secret, TICKET_AAD)

    def fetch(self, label: bytes) -> SessionTicket | None:
        """The ticket a client offers, if one of the accepted keys sealed it and this
        process has not taken it before."""
        if len(label) < 1 + 12 + 16 + _TICKET.size or label in self._used:
            return None
        for keys in self.keys.for_id(label[0]):
            try:
                plain = AESGCM(keys.ticket).decrypt(label[1:13], label[13:], TICKET_AAD)
                suite, age_add, issued, lifetime, has_early, early = _TICKET.unpack_from(plain)
                cipher_suite = tls.CipherSuite(suite)
            except (InvalidTag, ValueError, struct.error):
                continue
            if len(self._used) >= self.limit:
                self._used.pop(next(iter(self._used)))
            self._used[label] = None
            start = datetime.datetime.fromtimestamp(issued, datetime.UTC)
            start = start.replace(tzinfo=None)  # qh3 compares naive UTC times
            return SessionTicket(
                age_add=age_add,
                cipher_suite=cipher_suite,
                not_valid_after=start + datetime.timedelta(seconds=lifetime),
                not_valid_before=start,
                resumption_secret=plain[_TICKET.size :],
                server_name="",
                ticket=label,
                max_early_data_size=early if has_early else None,
            )
        return None

    def store(self, ticket: SessionTicket) -> None:
        """qh3 hands over each ticket it issued: nothing to keep, it carries its state."""


class _SealingContext(tls.Context):
    """qh3's server TLS context whose NewSessionTicket carries its sealed state: the
    ticket bytes are set as qh3 creates the message, before it is written out."""

    tickets: SessionTickets

    @property
    def _new_session_ticket(self) -> Any:
        return self.__dict__.get("_new_session_ticket")

    @_new_session_ticket.setter
    def _new_session_ticket(self, message: Any) -> None:
        schedule = self.key_schedule
        if message is not None and schedule is not None:
            # the resumption secret, as qh3's _build_session_ticket derives it next
            master = schedule.derive_secret(b"res master")
            secret = hkdf_expand_label(
                schedule.algorithm,
                master,
                b"resumption",
                message.ticket_nonce,
                schedule.digest_size,
            )
            message.ticket = self.tickets.seal(
                secret,
                schedule.cipher_suite,
                message.ticket_age_add,
                message.ticket_lifetime,
                message.max_early_data_size,
            )
        self.__dict__["_new_session_ticket"] = message


def stamp(
    cid: bytes, worker: int | None, key_id: int | None = None, generation: int | None = None
) -> bytes:
    """A connection ID whose first byte names the worker that owns the connection, whose
    second names the secret its stateless-reset token comes from and whose third the
    generation (the run of the proxy on this port: a restart's new process has another)."""
    if len(cid) < 3:
        return cid
    if worker is not None:
        cid = bytes([worker]) + cid[1:]
    if key_id is not None:
        cid = cid[:1] + bytes([key_id]) + cid[2:]
    if generation is not None:
        cid = cid[:2] + bytes([generation]) + cid[3:]
    return cid


def owner(cid: bytes) -> int:
    """The worker a connection ID was stamped for (see :func:`stamp`)."""
    return cid[0] if cid else -1


def generation(cid: bytes) -> int:
    """The generation a connection ID was stamped for (see :func:`stamp`)."""
    return cid[2] if len(cid) > 2 else -1


class _Probe(int):
    """A datagram size to probe, and the network path it is for."""

    path: Any

    def __new__(cls, size: int, path: Any) -> _Probe:
        probe = super().__new__(cls, size)
        probe.path = path
        return probe


FRAME_BURST = 512
"""Frames that cost work and produce nothing a connection may send at once (see
``FrameBudget``); a hostile datagram is cut off after this many such frames."""

FRAME_RATE = 64.0
"""Such frames per second on top (and more per packet sent, per stream opened)."""

FRAMES_PER_STREAM = 4
"""Budget earned by each stream the client opens: its request may end in a RESET_STREAM
and a STOP_SENDING, be blocked on flow control, be granted credit."""

STREAM_FRAMES = 4
"""STREAM frames a packet carries before one for a stream it already wrote to spends the
budget (a browser packs dozens of requests' HEADERS in a packet, one frame each; 150
one-byte STREAM frames on one stream cost ~900 us)."""

REPEAT_COST = 1 / 16
"""What a STREAMS_BLOCKED repeating the previous one costs: Chrome sends one for every
request it queues behind MAX_STREAMS (402 for a page of 600 resources, 64 a packet)."""

MAX_PATHS = 4
"""Network paths (client addresses) a connection keeps: the current one and the three
latest others, pending validation first to go (qh3 keeps every address ever seen)."""

EXCESSIVE_LOAD = ErrorCode.H3_EXCESSIVE_LOAD
"HTTP/3's H3_EXCESSIVE_LOAD: the application error a frame flood is closed with."


class FrameBudget:
    """Token bucket for the frames that cost work and produce nothing by themselves: each
    costs qh3 0.3-3 us, and a datagram holds hundreds of them (PING, MAX_DATA, an empty
    STREAM frame: 400-950 us a datagram, for ever). One token each: every frame but STREAM,
    ACK and PADDING (``_BUDGETED_FRAMES``, and DATA_BLOCKED, STREAM_DATA_BLOCKED,
    STREAMS_BLOCKED: ``REPEAT_COST`` when it repeats the previous one), an ACK frame or
    padding run past a packet's first, a packet of nothing but padding, a STREAM frame for
    a stream the packet already wrote to past its ``STREAM_FRAMES``-th.

    ``FRAME_BURST`` tokens, refilled at ``FRAME_RATE`` a second, by one for each 1-RTT
    packet the connection sends and by ``FRAMES_PER_STREAM`` for each stream the client
    opens. Real clients send such frames in proportion to what they are sent or ask for:
    a PING in every 4th to 20th packet acknowledging a download (ngtcp2 after 3 or 10
    ACK-only packets, Chrome after 19), credit (MAX_*) as they read, a reset or a
    STREAM_DATA_BLOCKED per request, STREAMS_BLOCKED per request queued; otherwise a few:
    PINGs for keep-alive and loss probes, a PATH_CHALLENGE on migrating, a dozen CRYPTO
    fragments and PINGs in Chrome's first flight. Chrome loading a page of 600 resources
    over one connection stays above half the burst."""

    __slots__ = ("tokens", "at", "earned")

    def __init__(self) -> None:
        self.tokens = float(FRAME_BURST)
        self.at = 0.0
        self.earned = 0

    def spend(self, now: float, earned: int, cost: float = 1.0) -> bool:
        """One frame received at ``now``, ``earned`` being packets sent and streams opened
        (weighted) so far; False once the budget is exhausted."""
        tokens = self.tokens + (now - self.at) * FRAME_RATE + (earned - self.earned)
        self.at = now
        self.earned = earned
        self.tokens = tokens = min(tokens, FRAME_BURST) - cost
        return tokens >= 0


_handle_ack_frame = QuicConnection._handle_ack_frame
_handle_stream_frame = QuicConnection._handle_stream_frame


class FrameGuard(QuicConnection):
    """qh3's connection, bounded against frames that cost work and produce nothing and
    against a client that writes from ever new addresses.

    - Frames of the kinds ``FrameBudget`` lists spend its tokens; over budget, the
      connection is closed with ``EXCESSIVE_LOAD`` (an application CONNECTION_CLOSE, as
      HTTP/2's flood guard answers ENHANCE_YOUR_CALM): a datagram of 1,240 PINGs costs a
      few hundred frames' work once, not 1,240 for every datagram of a flood.
    - DATA_BLOCKED and STREAM_DATA_BLOCKED never raise a window (qh3 doubled it for each,
      until MAX_DATA no longer fitted a varint and building packets raised): the proxy
      grants request streams credit as it consumes, qh3 the others as data arrives. A limit
      above the one we advertised is a lie: PROTOCOL_VIOLATION.
    - At most ``MAX_PATHS`` network paths: qh3 scans its list of every address ever seen
      for each datagram (5,000 addresses: 80 -> 400 us a datagram).

    On the normal path a STREAM or ACK frame costs one comparison and a store more
    (~0.15 us, against qh3's 2-6 us for the frame); the other kinds are a few a connection.
    The budgeted handlers are made by ``_budgeted`` below the class."""

    __slots__ = (
        "_frame_budget",
        "_padded",
        "_acked",
        "_streamed",
        "_stream_frames",
        "_packet_streams",
        "_streams_blocked",
    )

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._frame_budget = FrameBudget()
        self._padded: Any = None  # the receive context (packet) of the last padding run
        self._acked: Any = None  # ... of the last ACK frame
        self._streamed: Any = None  # ... of the last STREAM frame
        self._stream_frames = 0  # STREAM frames in that packet
        self._packet_streams: set[int] = set()  # streams written to past STREAM_FRAMES
        self._streams_blocked: tuple[int, int] = (0, -1)  # the last (type, limit)

    def _spend(self, context: Any, frame_type: int, cost: float = 1.0) -> None:
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        earned = space.packet_number if space else 0
        opened = self._local_max_streams_bidi.used + self._local_max_streams_uni.used
        if self._frame_budget.spend(context.time, earned + FRAMES_PER_STREAM * opened, cost):
            return
        if self._close_event is None:
            log.warning(
                "QUIC frame flood (type 0x%x) from %s: closing",
                frame_type,
                context.network_path.addr[0],
            )
        raise QuicConnectionError(
            error_code=EXCESSIVE_LOAD, frame_type=None, reason_phrase="excessive load"
        )

    def _handle_ack_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        """As qh3; a packet's second and later ACK frames (clients send one) spend the
        budget: each costs qh3 ~2 us, hundreds fit in a datagram."""
        if context is self._acked:
            self._spend(context, frame_type)
        self._acked = context
        _handle_ack_frame(self, context, frame_type, buf)

    def _handle_stream_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        if context is self._streamed:
            self._stream_frames += 1
            if self._stream_frames > STREAM_FRAMES:
                self._stream_again(context, frame_type, buf)
        else:
            self._streamed = context
            self._stream_frames = 1
        _handle_stream_frame(self, context, frame_type, buf)

    def _stream_again(self, context: Any, frame_type: int, buf: Any) -> None:
        """Past a packet's ``STREAM_FRAMES``-th STREAM frame: one for a stream this part
        of the packet already wrote to spends the budget (clients write a stream's data in
        one frame a packet; a flood of tiny frames on one stream costs ~6 us each)."""
        seen = self._packet_streams
        if self._stream_frames == STREAM_FRAMES + 1:
            seen.clear()
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        if stream_id in seen:
            self._spend(context, frame_type)
        else:
            seen.add(stream_id)

    def _handle_streams_blocked_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        """Spends the budget, only ``REPEAT_COST`` when it repeats the previous one."""
        start = buf.tell()
        last, self._streams_blocked = self._streams_blocked, (frame_type, buf.pull_uint_var())
        buf.seek(start)
        self._spend(context, frame_type, REPEAT_COST if last == self._streams_blocked else 1.0)
        super()._handle_streams_blocked_frame(context, frame_type, buf)

    def _handle_padding_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        """A packet's first padding run is free; later runs, and a packet of nothing but
        padding, spend the budget."""
        start = buf.tell()
        super()._handle_padding_frame(context, frame_type, buf)
        if context is self._padded or (start == 1 and buf.eof()):
            self._spend(context, frame_type)
        self._padded = context

    def _handle_data_blocked_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        self._spend(context, frame_type)
        if buf.pull_uint_var() > self._local_max_data.value:
            raise QuicConnectionError(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=frame_type,
                reason_phrase="DATA_BLOCKED above MAX_DATA",
            )

    def _handle_stream_data_blocked_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        self._spend(context, frame_type)
        stream_id = buf.pull_uint_var()
        limit = buf.pull_uint_var()
        self._assert_stream_can_receive(frame_type, stream_id)
        stream = self._get_or_create_stream(frame_type, stream_id)
        if limit > stream.max_stream_data_local:
            raise QuicConnectionError(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=frame_type,
                reason_phrase="STREAM_DATA_BLOCKED above MAX_STREAM_DATA",
            )

    def _find_network_path(self, addr: Any) -> Any:
        """As qh3, over at most ``MAX_PATHS`` paths: a new address makes room first (qh3
        appends it once its packet is handled)."""
        paths = self._network_paths
        for path in paths:
            if path.addr == addr:
                return path
        if len(paths) >= MAX_PATHS:
            others = paths[1:]  # the first is the current path
            pending = [path for path in others if not path.is_validated]
            paths.remove(pending[0] if pending else others[0])
        return super()._find_network_path(addr)


def _budgeted(name: str) -> Any:
    """qh3's handler of frame type ``name``, spending ``FrameGuard``'s budget first."""
    handler = getattr(QuicConnection, name)

    def guarded(self: FrameGuard, context: Any, frame_type: int, buf: Any) -> None:
        self._spend(context, frame_type)
        handler(self, context, frame_type, buf)

    guarded.__name__ = guarded.__qualname__ = name
    return guarded


for _name in _BUDGETED_FRAMES:
    setattr(FrameGuard, f"_handle_{_name}_frame", _budgeted(f"_handle_{_name}_frame"))


CertificatePair = tuple[Any, list[Any], Any]
"A server certificate (qh3's), its intermediate chain and its private key."


def _choose_by_server_name(
    context: tls.Context, certificates: Callable[[str | None], CertificatePair]
) -> None:
    """Make ``context`` read the ClientHello's server name before answering it, and
    take the pair ``certificates`` chooses for that name (the signature algorithm
    qh3 then offers follows the chosen key)."""
    answer = context._server_handle_hello

    def handle_hello(input_buf: Buffer, *outputs: Buffer) -> None:
        start = input_buf.tell()
        try:
            name = tls.pull_client_hello(input_buf).server_name
        except Exception:  # a malformed hello: qh3 refuses it below, with its alert
            name = None
        input_buf.seek(start)
        cert, chain, key = certificates(name)
        context.certificate = cert
        context.certificate_chain = chain
        context.certificate_private_key = key
        answer(input_buf, *outputs)

    context._server_handle_hello = handle_hello  # type: ignore[method-assign,assignment]


class CreditedConnection(FrameGuard):
    """qh3's QuicConnection whose request-stream receive windows follow what the proxy
    consumed (see ``ProxyStream``): ``credit[stream_id] = limit`` grants more.

    With several workers, every connection ID it issues carries the worker's
    index in its first byte (and the generation, the proxy's run, in its third), so a
    datagram that reaches another worker (the client's address changed) or another
    process on the port (a restart) can be handed to the owner.

    With ``certificates`` (a server name, or None, to the certificate, its chain and
    its private key), the pair is chosen when the ClientHello arrives, by its SNI.
    """

    __slots__ = (
        "credit",
        "worker",
        "generation",
        "keys",
        "tickets",
        "on_cid_issued",
        "_unacked",
        "_probe_path",
        "_probe",
        "_certificates",
    )

    def __init__(
        self,
        *args: Any,
        worker: int | None = None,
        keys: QuicKeys | None = None,
        tickets: SessionTickets | None = None,
        generation: int | None = None,
        certificates: Callable[[str | None], CertificatePair] | None = None,
        **kw: Any,
    ) -> None:
        self._certificates = certificates
        self.tickets = tickets
        "Seals the session tickets this connection issues (see ``SessionTickets``)."
        if tickets is not None:
            kw.setdefault("session_ticket_fetcher", tickets.fetch)
            kw.setdefault("session_ticket_handler", tickets.store)
        super().__init__(*args, **kw)
        self.credit: dict[int, int] = _Credit(self)
        self._streams_finished = FinishedStreams()
        self._hold_stream_limits()
        self._unacked = 0
        self.worker = worker
        self.generation = generation
        self.keys = keys
        "Where stateless-reset tokens come from (None: qh3's random ones)."
        self.on_cid_issued: Any = None
        """Called with each connection ID made after the first, before it is sent: qh3
        reports it (``ConnectionIdIssued``) only after the packet announcing it has left,
        and a client that switches to it at once must find its connection (not a reset)."""
        self._probe_path: Any = None  # set up by the first datagram (its path)
        self._probe: _Probe | None = None
        if worker is not None or keys is not None:
            first = self._host_cids[0]
            self._stamp(first)
            self.host_cid = first.cid
            self._local_initial_source_connection_id = first.cid

    def _initialize(self, peer_cid: bytes) -> None:
        """As qh3; a server's TLS context seals the session tickets it issues and, with
        SNI pairs, answers with the pair chosen by the ClientHello's server name."""
        super()._initialize(peer_cid)
        if self.tickets is not None and not self._is_client:
            self.tls.__class__ = _SealingContext
            self.tls.tickets = self.tickets  # type: ignore[attr-defined]
        if self._certificates is not None and not self._is_client:
            _choose_by_server_name(self.tls, self._certificates)

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """As qh3, but 1-RTT acknowledgements follow RFC 9000 §13.2.2: at once from
        the second ack-eliciting datagram on, else after ``ACK_DELAY`` (qh3 waits
        1 ms, so nearly every request got an ACK-only packet of its own)."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        pending = space is not None and space.ack_at is not None
        super().receive_datagram(data, addr, now=now)
        paths = self._network_paths
        if paths and paths[0] is not self._probe_path:
            self._probe_datagram_size()
        if space is None or space.ack_at is None:
            self._unacked = 0
        elif not pending:
            self._unacked = 1
            space.ack_at = now + ACK_DELAY
        else:
            self._unacked += 1
            if self._unacked >= 2:
                space.ack_at = now - 1e-9  # due, and before ``now``: not held by the pacer

    def _probe_datagram_size(self) -> None:
        """Start over on the current path: the configured datagram size, then one probe
        (PING + PADDING) of ``probe_size`` once the connection sends in bulk (a flush of
        ``PROBE_AFTER`` datagrams: a short exchange gains nothing from larger ones). qh3
        sends it (capped at the peer's max_udp_payload_size), does not count its loss as
        congestion, and adopts the size only when the probe is acknowledged; qh3 probes
        only as a client, and once per connection: a new path (migration) may be narrower."""
        configuration = self._configuration
        size = getattr(configuration, "probe_size", 0)
        self._probe_path = self._network_paths[0] if self._network_paths else None
        if self._max_datagram_size != configuration.max_datagram_size:
            self._max_datagram_size = configuration.max_datagram_size
            self._loss._cc._max_datagram_size = configuration.max_datagram_size
        self._mtu_probe_sizes = []
        self._mtu_probe_pending = None
        self._probe = None
        if size > configuration.max_datagram_size:
            self._probe = _Probe(size, self._probe_path)

    def _on_mtu_probe_delivery(self, delivery: Any, probe_size: int) -> None:
        """As qh3, unless the probe left on an earlier path (its ACK can come late)."""
        if getattr(probe_size, "path", self._probe_path) is self._probe_path:
            super()._on_mtu_probe_delivery(delivery, probe_size)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """As qh3; a delayed ACK becomes due, so it rides in the packet this data
        goes out in (qh3 only writes ACKs that are due). An empty write sends nothing
        (the HTTP/3 layer writes its QPACK decoder stream after every header block, mostly
        empty) and leaves the ACK waiting for the response."""
        super().send_stream_data(stream_id, data, end_stream)
        if not data and not end_stream:
            return
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None:
            space.ack_at = 0.0

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """As qh3, keeping every open stream in its send queue: when a packet fills up
        (or the congestion window ends it) while qh3 writes a stream's frame, qh3 drops
        that stream from the queue for good, and its data or RESET_STREAM never leaves."""
        out = self._send_from_active_streams(now)
        if self._probe is not None and len(out) >= PROBE_AFTER:
            self._mtu_probe_sizes = [self._probe]  # qh3 sends it with the next flush
            self._probe = None
        if self._requeue():
            out += self._send_from_active_streams(now)
            self._requeue()
        return out

    def _send_from_active_streams(self, now: float) -> list[tuple[bytes, Any]]:
        """qh3's datagrams_to_send with only the streams that have something to send in
        its queue. qh3 checks every stream of the queue for every packet it builds; an
        HTTP/3 connection holds six that are idle nearly always (the control and QPACK
        streams of both sides), which cost ~11 % of a bulk download's CPU. The idle ones
        (no data, FIN, RESET_STREAM or STOP_SENDING to send, not finished both ways) wait
        outside for the call and go back behind the others, in order. Streams finished
        both ways are discarded here (``_discard``), not by qh3."""
        queue = self._streams_queue
        active: list[Any] = []
        idle: list[Any] = []
        for stream in queue:
            sender = stream.sender
            if sender.is_finished and stream.receiver.is_finished:
                self._discard(stream)
            elif sender.reset_pending or stream.receiver.stop_pending:
                active.append(stream)
            elif stream.is_blocked or sender.buffer_is_empty:
                idle.append(stream)
            else:
                active.append(stream)
        if len(active) == len(queue):
            return super().datagrams_to_send(now=now)
        queue[:] = active
        try:
            return super().datagrams_to_send(now=now)
        finally:
            queue.extend(idle)

    def _hold_stream_limits(self) -> None:
        """MAX_STREAMS raised as the peer's streams finish, never as they open."""
        for name in ("_local_max_streams_bidi", "_local_max_streams_uni"):
            limit = getattr(self, name)
            setattr(self, name, StreamCredit(limit.frame_type, limit.name, limit.value))

    def _discard(self, stream: Any) -> None:
        """Forget a stream finished both ways, as qh3 does while building packets, and give
        the peer one more request stream for it (the MAX_STREAMS goes out in this flush)."""
        stream_id = stream.stream_id
        del self._streams[stream_id]
        self._streams_finished.add(stream_id)
        self._streams_dirty_limits.discard(stream)
        limit = self._local_max_streams_bidi
        if stream_id % 4 == 0 and isinstance(limit, StreamCredit):  # a client's request
            limit.finished()

    def _requeue(self) -> bool:
        queue = self._streams_queue
        if len(queue) == len(self._streams):
            return False
        queued = set(queue)
        queue.extend(s for s in self._streams.values() if s not in queued)
        return True

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        super().reset_stream(stream_id, error_code)
        self._reset_sent(stream_id)

    def _handle_stop_sending_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        """As qh3 (the peer's STOP_SENDING resets our sending part), marking the reset."""
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        super()._handle_stop_sending_frame(context, frame_type, buf)
        self._reset_sent(stream_id)

    def _reset_sent(self, stream_id: int) -> None:
        """A request stream's sending part was reset: it is blocked for good. qh3's sender
        puts data lost in flight back in its queue even after a reset, and would send it
        (and data never sent before) past the final size the RESET_STREAM announced.
        (qh3 itself sets ``is_blocked`` only on streams it opens, held by MAX_STREAMS.)"""
        stream = self._streams.get(stream_id)
        if stream is not None and stream_id % 4 == 0:
            stream.is_blocked = True

    def shed_handshake_buffers(self) -> None:
        """Once the handshake is complete: qh3 keeps a 16 KiB TLS output buffer per
        epoch for the connection's life; empty ones are swapped for small ones."""
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
            if self.worker is not None or self.keys is not None:
                self._stamp(fresh)
            if self.on_cid_issued is not None:
                self.on_cid_issued(fresh.cid)

    def _stamp(self, connection_id: Any) -> None:
        """Stamp one of our connection IDs for this worker and the current secret, give
        it the stateless-reset token derived from it, and update qh3's index of them."""
        keys = self.keys
        self._host_cid_seq_map.pop(connection_id.cid, None)
        connection_id.cid = stamp(
            connection_id.cid,
            self.worker,
            keys.current.id if keys is not None else None,
            self.generation,
        )
        if keys is not None:
            connection_id.stateless_reset_token = keys.reset_token(connection_id.cid)
        self._host_cid_seq_map[connection_id.cid] = connection_id.sequence_number

    # ------------------------------------------------------------ private reads

    @property
    def handshake_complete(self) -> bool:
        return bool(self._handshake_complete)

    @property
    def closing(self) -> bool:
        return self._close_event is not None

    def all_acknowledged(self) -> bool:
        """Nothing waits to be sent on any stream and nothing sent is unacknowledged."""
        if self._loss.bytes_in_flight:
            return False
        return not any(unsent_bytes(self, sid) for sid in self._streams)


def unsent_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream that the QUIC core has not sent yet (or must resend)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return sum(stop - start for start, stop in stream.sender._pending)


def stream_answered(quic: QuicConnection, stream_id: int) -> bool:
    """Whether the proxy has written to (or reset) a stream, or already forgot it."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return True
    sender = stream.sender
    return bool(sender.highest_offset or sender.reset_pending or sender.is_finished)


def control_stream(h3: H3Connection) -> int | None:
    """The local HTTP/3 control stream, where GOAWAY goes."""
    return h3._local_control_stream_id


class Undecodable(list[tuple[bytes, bytes]]):
    """The headers of a request whose header block could not be decoded."""


class TooLarge(list[tuple[bytes, bytes]]):
    """The headers of a request whose header block was too large to be decoded."""


_PLACEHOLDER = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"-"),
    (b":path", b"/"),
]


class ProxyH3(H3Connection):
    """qh3's HTTP/3 layer (its private settings and header decoding overridden) without
    its H3_DATAGRAM setting: qh3 always announces it,
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

    def forget(self, stream_id: int) -> None:
        """A request stream refused before qh3 saw its headers: its parsing state goes."""
        self._stream.pop(stream_id, None)
        self.oversize.pop(stream_id, None)

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
        The request gets a 400 instead, as on h2 (see ``_h3.H3Conn._request``); a block that
        refers to the dynamic table (there is none) closes the connection. An oversize
        block (its stand-in, see ``_h3gate``) is not decoded: the request gets 431."""
        head = self.oversize.pop(stream_id, None)
        if head is not None:
            return TooLarge(_PLACEHOLDER if head else [])  # trailers: ignored
        try:
            return super()._decode_headers(stream_id, frame_data)
        except DecoderStreamError:
            try:
                field_section_size(frame_data or b"")
            except QpackError as exc:
                raise QpackDecompressionFailed(str(exc)) from None
            return Undecodable(_PLACEHOLDER)  # valid for qh3's checks; never forwarded
