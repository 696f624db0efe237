"""The QUIC core's contract with aioquic: the private attributes it relies on exist, and
the listener's packet checks accept real packets and refuse forged ones."""

from __future__ import annotations

import random

import pytest
from aioquic.h3.connection import H3Connection
from aioquic.quic.configuration import QuicConfiguration

from quicproxy import _quic
from tests.hostile.probe import client_initial


def test_every_private_aioquic_attribute_the_core_uses_still_exists(certs):
    """Fails loudly when an aioquic upgrade renames or removes one (see _quic.py)."""
    server = QuicConfiguration(is_client=False)
    server.load_cert_chain(*certs)
    conn = _quic.CreditedConnection(
        configuration=server, original_destination_connection_id=b"x" * 8
    )
    client = _quic.client_configuration()
    owners = {
        "connection": conn,
        "h3": H3Connection(_quic.CreditedConnection(configuration=client)),
    }
    sid = conn.get_next_available_stream_id()
    conn.send_stream_data(sid, b"abc")  # a stream, for its sender's attributes
    owners["sender"] = conn._streams[sid].sender
    missing = []
    for owner, name in _quic.PRIVATE:
        target = owners[owner] if isinstance(owner, str) else owner
        if not hasattr(target, name):
            missing.append(f"{getattr(target, '__name__', owner)}.{name}")
    assert missing == [], f"aioquic no longer has {missing}: update quicproxy/_quic.py"
    assert _quic.unacked_bytes(conn, sid) == 3 and conn.unacked_total() == 3
    assert conn.handshake_complete is False and conn.closing is False


def test_a_real_initial_decrypts_and_a_rewritten_one_does_not():
    real = client_initial(4433)
    header = _quic.parse_header(real, 8)
    assert header is not None and header.initial and len(header.dcid) == 8
    assert _quic.initial_decrypts(real, header)
    rng = random.Random(5)
    for _ in range(50):
        forged = bytearray(real)
        forged[6:14] = rng.randbytes(8)
        h = _quic.parse_header(bytes(forged), 8)
        assert h is not None and not _quic.initial_decrypts(bytes(forged), h)
    flipped = bytearray(real)
    flipped[header.packet_length - 20] ^= 0x01  # one payload bit: the AEAD tag fails
    assert not _quic.initial_decrypts(bytes(flipped), header)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x40", b"\xc0\x00\x00\x00\x01\xff"])
def test_headers_that_are_not_quic_parse_to_none(data):
    assert _quic.parse_header(data, 8) is None
