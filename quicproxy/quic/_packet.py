"""Part of the QUIC core (``_core.py``): qh3's packet builder with a short path for
1-RTT packets, which carry nearly every byte a server sends.

qh3 starts and ends every packet through one general routine: it checks the packet
type against a set built per call, picks the epoch, makes a list for a frame logger
that is off, and ends each 1-RTT datagram through a second routine. Per 1-RTT packet
that is most of the Python work outside the connection's own loop (~15 % of a
server's CPU per MiB sent). ``PacketBuilder`` does the same steps for 1-RTT packets,
in the same order and with the same results (``tests/test_quic_packet.py`` compares
its datagrams byte for byte with qh3's), and leaves every other packet type to qh3.

qh3 attributes used (all the builder's own, listed in ``PRIVATE``): the buffer and its
capacities, the packet being built, the datagram and packet lists, per-space packet
numbers, the padding flag and the frame logger.
"""

from __future__ import annotations

from typing import Any

from qh3.quic import packet_builder
from qh3.quic.packet import QuicPacketType
from qh3.tls import Epoch

__all__ = ["PacketBuilder", "PRIVATE"]

_ONE_RTT = QuicPacketType.ONE_RTT
_ONE_RTT_CODE = int(QuicPacketType.ONE_RTT)
_EPOCH = Epoch.ONE_RTT
_SAMPLE_PADDING = packet_builder.PACKET_NUMBER_MAX_SIZE - packet_builder.PACKET_NUMBER_SEND_SIZE
"""Header protection samples 16 bytes from 4 bytes past the packet number; a packet
number is written in 2, so a payload shorter than this is padded up to it."""
_SMALL_ROOM = 128
"qh3's rule: with less room than this left in a datagram, a packet starts a new one."
_Stop = packet_builder.QuicPacketBuilderStop
_Sent = packet_builder.QuicSentPacket

PRIVATE = [
    "_buffer",
    "_buffer_capacity",
    "_flight_capacity",
    "_aead_tag_size",
    "_packet",
    "_packet_crypto",
    "_packet_start",
    "_packet_type",
    "_header_size",
    "_packet_numbers",
    "_peer_cid",
    "_host_cid",
    "_peer_token",
    "_spin_bit",
    "_version",
    "_quic_logger",
    "_datagrams",
    "_packets",
    "_datagram_init",
    "_datagram_needs_padding",
    "_datagram_flight_bytes",
    "_flight_bytes",
    "_total_bytes",
    "_end_packet",
    "_flush_current_datagram",
]
"The qh3 builder attributes this module reads or overrides; checked by a test."


class PacketBuilder(packet_builder.QuicPacketBuilder):
    """qh3's QuicPacketBuilder; 1-RTT packets take the short path."""

    __slots__ = ()

    def start_packet(self, packet_type: QuicPacketType, crypto: Any) -> None:
        if packet_type is not _ONE_RTT:
            super().start_packet(packet_type, crypto)
            return
        if self._packet is not None:
            self._end_packet()
        buf = self._buffer
        start = buf.tell()
        if self._buffer_capacity - start < _SMALL_ROOM:
            self._flush_current_datagram()
            start = 0
        if self._datagram_init:
            self._open_datagram()
        header_size = 3 + len(self._peer_cid)  # flags, CID, 2-byte packet number
        if start + header_size >= self._buffer_capacity:
            raise _Stop
        packet = _Sent(_EPOCH, False, False, False, self._packet_numbers[_EPOCH], packet_type)
        self._packet = packet
        self._packet_crypto = crypto
        self._aead_tag_size = crypto.aead_tag_size
        self._packet_start = start
        self._packet_type = packet_type
        self._header_size = header_size
        if self._quic_logger is not None:
            frames: list[dict] = []
            packet.quic_logger_frames = frames
            self.quic_logger_frames = frames
        buf.seek(start + header_size)

    def _open_datagram(self) -> None:
        """A new datagram's capacities: the total and in-flight budgets left (as qh3)."""
        if self.max_total_bytes is not None:
            left = self.max_total_bytes - self._total_bytes
            if left < self._buffer_capacity:
                self._buffer_capacity = left
        self._flight_capacity = self._buffer_capacity
        if self.max_flight_bytes is not None:
            left = self.max_flight_bytes - self._flight_bytes
            if left < self._flight_capacity:
                self._flight_capacity = left
        self._datagram_flight_bytes = 0
        self._datagram_init = False
        self._datagram_needs_padding = False

    def _end_packet(self) -> None:
        if self._packet_type is not _ONE_RTT:
            super()._end_packet()
            return
        buf = self._buffer
        end = buf.tell()
        packet = self._packet
        assert packet is not None
        start = self._packet_start
        header_size = self._header_size
        size = end - start
        if size <= header_size:  # nothing written: the packet is dropped
            buf.seek(start)
            self._packet = None
            self.quic_logger_frames = None
            return
        padding = _SAMPLE_PADDING + header_size - size
        if self._datagram_needs_padding:  # e.g. PATH_CHALLENGE: padded to the full size
            flight_room = self._flight_capacity - end - self._aead_tag_size
            if flight_room > padding:
                padding = flight_room
            self._datagram_needs_padding = False
        if padding > 0:
            packet.in_flight = True
            if self._quic_logger is not None:
                frames = packet.quic_logger_frames
                assert frames is not None  # set by start_packet when logging
                frames.append(self._quic_logger.encode_padding_frame())
        else:
            padding = 0
        crypto = self._packet_crypto
        assert crypto is not None
        sent = packet.sent_bytes = crypto.finalize_packet(
            buf,
            start,
            size,
            padding,
            header_size,
            False,
            self._version,
            _ONE_RTT_CODE,
            self._peer_cid,
            self._host_cid,
            self._peer_token,
            self._spin_bit,
            packet.packet_number,
        )
        self._packets.append(packet)
        if packet.in_flight:
            self._datagram_flight_bytes += sent
        # a short-header packet ends its datagram (nothing can follow it)
        self._datagrams.append(buf.data)
        self._flight_bytes += self._datagram_flight_bytes
        self._total_bytes += buf.tell()
        self._datagram_init = True
        buf.seek(0)
        self._packet_numbers[_EPOCH] += 1
        self._packet = None
        self.quic_logger_frames = None
