"""The QUIC core's packet builder (``quic/_packet.PacketBuilder``) against qh3's own: the
same calls give the same datagrams, byte for byte, and the same packet records, for
1-RTT packets alone, coalesced behind Initial and Handshake packets, padded, cut short
by the congestion and amplification budgets, and empty."""

from __future__ import annotations

import random
from typing import Any

import pytest
from qh3.quic import connection as quic_connection
from qh3.quic import packet_builder
from qh3.quic.crypto import CryptoPair
from qh3.quic.logger import QuicLoggerTrace
from qh3.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion

from quicproxy.quic import _core as _quic
from quicproxy.quic import _packet as _quicpacket

TYPES = [QuicPacketType.ONE_RTT] * 6 + [QuicPacketType.INITIAL, QuicPacketType.HANDSHAKE]
FRAMES = [
    QuicFrameType.STREAM_BASE | 0x02,
    QuicFrameType.ACK,
    QuicFrameType.PING,
    QuicFrameType.CRYPTO,
    QuicFrameType.MAX_DATA,
    QuicFrameType.PATH_CHALLENGE,
    QuicFrameType.PADDING,
]


def _crypto(cid: bytes) -> CryptoPair:
    pair = CryptoPair()
    pair.setup_initial(cid, is_client=False, version=QuicProtocolVersion.VERSION_1)
    return pair


def _script(seed: int) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """Builder settings and a random run of calls, the same for both builders."""
    rng = random.Random(seed)
    settings = {
        "host_cid": rng.randbytes(8),
        "peer_cid": rng.randbytes(rng.choice([0, 4, 8, 20])),
        "version": QuicProtocolVersion.VERSION_1,
        "is_client": False,
        "max_datagram_size": rng.choice([1200, 1350, 1452]),
        "packet_numbers": {e: rng.randrange(0, 1 << 20) for e in (0, 2, 3)},
        "peer_token": rng.randbytes(rng.choice([0, 0, 16])),
        "spin_bit": rng.random() < 0.5,
        "quic_logger": QuicLoggerTrace(is_client=False, odcid=b"") if seed % 2 else None,
    }
    budgets = {
        "max_flight_bytes": rng.choice([None] * 4 + [rng.randrange(0, 40000)]),
        "max_total_bytes": rng.choice([None] * 4 + [rng.randrange(1200, 40000)]),
    }
    calls: list[tuple[Any, ...]] = [("budgets", budgets)]
    for _ in range(rng.randrange(1, 40)):
        calls.append(("start_packet", rng.choice(TYPES)))
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            if rng.random() < 0.1:
                calls.append(("pad_datagram",))
            size = rng.choice([0, 1, 5, 30, 200, 200, 1100] + [1400] * (seed % 3 == 0))
            calls.append(("frame", rng.choice(FRAMES), size, rng.randbytes(size)))
    return settings, calls


def _run(cls: type, seed: int) -> list[Any]:
    """What a builder of ``cls`` produced for the script, step by step."""
    settings, calls = _script(seed)
    crypto = _crypto(settings["host_cid"])
    builder = cls(**settings)
    trace: list[Any] = []
    for call in calls:
        try:
            if call[0] == "budgets":
                for name, value in call[1].items():
                    setattr(builder, name, value)
            elif call[0] == "start_packet":
                builder.start_packet(call[1], crypto)
            elif call[0] == "pad_datagram":
                builder.pad_datagram()
            else:
                _, frame, size, data = call
                buf = builder.start_frame(frame, capacity=size + 1, handler=len, handler_args=[])
                buf.push_bytes(data)
            trace.append(("ok", builder.packet_numbers))
        except packet_builder.QuicPacketBuilderStop:
            trace.append("stop")  # as in qh3: the datagrams built so far are sent
            break
    datagrams, packets = builder.flush()
    trace.append(datagrams)
    trace.append([_record(p) for p in packets])
    trace.append(dict(builder.packet_numbers))
    return trace


def _record(p: packet_builder.QuicSentPacket) -> tuple[Any, ...]:
    return (
        p.epoch,
        p.packet_type,
        p.packet_number,
        p.in_flight,
        p.is_ack_eliciting,
        p.is_crypto_packet,
        p.sent_bytes,
        p.delivery_handlers,
        p.quic_logger_frames or None,  # qh3 leaves an empty list when no logger is set
    )


@pytest.mark.parametrize("seed", range(300))
def test_the_short_path_builds_what_qh3_builds(seed):
    ours = _run(_quicpacket.PacketBuilder, seed)
    theirs = _run(packet_builder.QuicPacketBuilder, seed)
    assert ours == theirs
    assert ours[-3] or ours[-2] == []  # some scripts send nothing, most send datagrams


def test_the_scripts_cover_the_cases_that_matter():
    """The seeds above reach 1-RTT packets coalesced behind long ones, padded 1-RTT
    datagrams, budget stops and many packets in one datagram list."""
    coalesced = padded = stopped = bulk = 0
    for seed in range(300):
        trace = _run(_quicpacket.PacketBuilder, seed)
        records = trace[-2]
        stopped += "stop" in trace
        bulk += len(trace[-3]) >= 10
        types = [r[1] for r in records]
        for a, b in zip(types, types[1:], strict=False):
            coalesced += a != QuicPacketType.ONE_RTT and b == QuicPacketType.ONE_RTT
        _, calls = _script(seed)
        padded += any(c[0] == "pad_datagram" for c in calls) and bool(records)
    assert coalesced > 10 and padded > 10 and stopped > 10 and bulk > 10


def test_qh3_connections_build_with_it():
    assert quic_connection.QuicPacketBuilder is _quic.PacketBuilder
