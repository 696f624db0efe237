"""The QUIC core's contract with aioquic: the private attributes it relies on exist, and
the listener's packet checks accept real packets and refuse forged ones."""

from __future__ import annotations

import random

import pytest
from aioquic import tls
from aioquic.h3.connection import H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStreamSender

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
    dialing = _quic.CreditedConnection(configuration=client)
    dialing.connect(("127.0.0.1", 4433), now=0.0)  # creates the packet number spaces
    owners["space"] = dialing._spaces[tls.Epoch.ONE_RTT]
    owners["recovery"] = QuicConnection(configuration=client)._loss
    owners["pacer"] = owners["recovery"]._pacer
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


def _pair(certs) -> tuple[QuicConnection, _quic.CreditedConnection, float]:
    """A real aioquic client and our server connection, handshake done in memory."""
    server_cfg = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    server_cfg.load_cert_chain(*certs)
    client = QuicConnection(configuration=_quic.client_configuration(verify_mode=0))
    now = 1.0
    client.connect(("127.0.0.1", 4433), now=now)
    first = client.datagrams_to_send(now=now)
    header = _quic.parse_header(first[0][0], 8)
    assert header is not None
    server = _quic.CreditedConnection(
        configuration=server_cfg, original_destination_connection_id=header.dcid
    )
    flights = [(client, server, first)]
    while flights:
        sender, receiver, datagrams = flights.pop()
        for data, _ in datagrams:
            receiver.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        out = receiver.datagrams_to_send(now=now)
        if out:
            flights.append((receiver, sender, out))
        now += 0.001
    assert server.handshake_complete
    return client, server, now


def test_a_lone_request_is_acknowledged_late_and_a_second_packet_at_once(certs):
    """ACKs ride on the response: one ack-eliciting datagram waits up to ACK_DELAY (no
    ACK-only packet for it), a second one is acknowledged in the next flush (RFC 9000
    §13.2.2), so bulk uploads keep their ACK clock."""
    client, server, now = _pair(certs)
    server.datagrams_to_send(now=now + 1.0)  # anything the handshake left to acknowledge
    now += 1.0
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"x" * 100, end_stream=False)
    (data, _), *_ = client.datagrams_to_send(now=now)
    server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    assert server.datagrams_to_send(now=now) == []  # nothing but an ACK to say: wait
    timer = server.get_timer()
    assert timer is not None and timer >= now + _quic.ACK_DELAY - 1e-9
    client.send_stream_data(sid, b"y" * 100, end_stream=False)
    (data, _), *_ = client.datagrams_to_send(now=now)
    server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    assert len(server.datagrams_to_send(now=now)) == 1  # the second one: ACK now
    # a response written meanwhile carries the ACK: no separate ACK-only packet
    now += 0.005  # past the pacer
    client.send_stream_data(sid, b"z" * 100, end_stream=True)
    (data, _), *_ = client.datagrams_to_send(now=now)
    server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    assert server.datagrams_to_send(now=now) == []
    now += 0.005
    server.send_stream_data(sid, b"answer", end_stream=True)
    assert len(server.datagrams_to_send(now=now)) == 1
    assert server._spaces[tls.Epoch.ONE_RTT].ack_at is None


def test_an_http3_request_gets_no_ack_only_packet_the_response_carries_it(certs):
    """Decoding a request's headers writes the QPACK decoder stream, mostly nothing;
    an empty write must not make the ACK due, or every request costs a packet of its own."""
    client, server, now = _pair(certs)
    h3_client, h3_server = H3Connection(client), H3Connection(server)

    def deliver(sender: QuicConnection, receiver: QuicConnection, h3: H3Connection) -> list:
        for data, _ in sender.datagrams_to_send(now=now):
            receiver.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        got, event = [], receiver.next_event()
        while event is not None:
            got += h3.handle_event(event)
            event = receiver.next_event()
        return got

    for _ in range(3):  # settings, their ACKs: a quiet connection
        deliver(client, server, h3_server)
        deliver(server, client, h3_client)
        now += 0.1
    sid = client.get_next_available_stream_id()
    h3_client.send_headers(
        sid,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],
        end_stream=True,
    )
    assert [e.stream_id for e in deliver(client, server, h3_server)] == [sid]
    assert server.datagrams_to_send(now=now) == []  # no ACK-only packet
    h3_server.send_headers(sid, [(b":status", b"200")], end_stream=True)
    assert len(server.datagrams_to_send(now=now + 0.001)) == 1  # the response, with the ACK
    assert server._spaces[tls.Epoch.ONE_RTT].ack_at is None


def _burst(pacer, window: int, rtt: float) -> int:
    """Datagrams the pacer lets out at once after a pause (its full burst)."""
    pacer.update_rate(congestion_window=window, smoothed_rtt=rtt)
    pacer.evaluation_time = now = 5.0
    now += 1.0
    sent = 0
    while pacer.next_send_time(now) is None and sent < 100:
        pacer.update_after_send(now)
        sent += 1
    return sent


@pytest.mark.parametrize("window, rtt", [(26_000_000, 0.001), (4_000_000, 0.0002)])
def test_the_pacer_sends_bursts_at_rates_over_a_datagram_per_microsecond(window, rtt):
    """Seen on a loopback download: aioquic's pacer let one datagram out per event-loop
    turn there (its burst came out shorter than its 1 us packet-time floor)."""
    assert _burst(QuicPacketPacer(max_datagram_size=1350), window, rtt) <= 2
    assert _burst(_quic.BurstPacer(max_datagram_size=1350), window, rtt) == _quic.BURST_PACKETS


@pytest.mark.parametrize("window, rtt", [(100_000, 0.05), (1_000_000, 0.02), (20_000, 0.1)])
def test_the_pacer_is_aioquics_below_that_rate(window, rtt):
    ours = _burst(_quic.BurstPacer(max_datagram_size=1350), window, rtt)
    assert ours == _burst(QuicPacketPacer(max_datagram_size=1350), window, rtt)
    assert 2 <= ours <= _quic.BURST_PACKETS


def test_connections_pace_with_the_burst_pacer(certs):
    client, server, _ = _pair(certs)
    assert isinstance(server._loss._pacer, _quic.BurstPacer)


def test_an_idle_connection_sheds_its_handshake_buffers_and_shares_frame_handlers(certs):
    """What an idle connection keeps: the TLS output buffers (16 KiB each in aioquic) are
    small once the handshake is done, the frame handler table is shared, and the
    connection still handles frames (a request stream after the handshake)."""
    client, server, now = _pair(certs)
    server.shed_handshake_buffers()
    assert all(buf.capacity <= _quic.SPENT_CRYPTO_BUFFER for buf in server._crypto_buffers.values())
    other = _pair(certs)[1]
    assert (
        server._QuicConnection__frame_handlers._table
        is other._QuicConnection__frame_handlers._table
    )
    with pytest.raises(KeyError):
        server._QuicConnection__frame_handlers[0x7F]  # unknown frame type, as aioquic expects
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"GET", end_stream=True)
    (data, _), *_ = client.datagrams_to_send(now=now + 0.01)
    server.receive_datagram(data, ("127.0.0.1", 4433), now=now + 0.01)
    received = [
        e for e in iter(server.next_event, None) if isinstance(e, _quic.events.StreamDataReceived)
    ]
    assert received and received[-1].data == b"GET" and received[-1].end_stream


def test_four_connection_ids_each_way_and_all_of_ours_carry_the_worker(certs):
    """aioquic keeps eight; four (three spares) are enough to migrate, and every one
    costs a NEW_CONNECTION_ID frame per handshake and a table entry per connection."""
    client, server, now = _pair(certs)
    server.worker = 1
    client.datagrams_to_send(now=now)  # nothing left in flight
    assert server._local_active_connection_id_limit == _quic.ACTIVE_CIDS == 4
    assert len(server._host_cids) == _quic.ACTIVE_CIDS
    assert len(client._peer_cid_available) == _quic.ACTIVE_CIDS - 1  # what we issued
    assert len(server._peer_cid_available) <= _quic.ACTIVE_CIDS - 1  # what it may issue us
    # the client retires one: a fresh one replaces it, stamped for this worker
    client.change_connection_id()
    for _ in range(3):
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        now += 0.05
    assert len(server._host_cids) == _quic.ACTIVE_CIDS
    assert server._host_cids[-1].sequence_number == _quic.ACTIVE_CIDS  # the fresh one
    assert _quic.owner(server._host_cids[-1].cid) == 1


@pytest.mark.parametrize("seed", range(6))
def test_the_compact_sender_sends_what_aioquics_sends_and_frees_acknowledged_bytes(certs, seed):
    """The same writes, frames, losses and out-of-order ACKs through aioquic's sender and
    ours: the same frames come out (resent losses included), the same bytes count as
    unacknowledged, both finish together; ours holds at most twice that plus one write."""
    _, server, _ = _pair(certs)
    sid = server.get_next_available_stream_id()
    server.send_stream_data(sid, b"")
    ours = server._streams[sid].sender
    assert isinstance(ours, _quic.CompactSender)
    theirs = QuicStreamSender(sid, True)
    rng = random.Random(seed)
    payload = rng.randbytes(600_000)
    written = 0
    in_flight: list[tuple[int, int, bool]] = []
    while not (ours.is_finished and theirs.is_finished):
        if written < len(payload) and rng.random() < 0.3:
            size = rng.choice([1, 1300, 65536])
            chunk = payload[written : written + size]
            written += len(chunk)
            for sender in (ours, theirs):
                sender.write(chunk, end_stream=written == len(payload))
        for _ in range(rng.randint(0, 20)):
            a, b = ours.get_frame(1300), theirs.get_frame(1300)
            assert (a is None) == (b is None)
            if a is None:
                break
            assert (a.offset, a.data, a.fin) == (b.offset, b.data, b.fin)
            assert a.data == payload[a.offset : a.offset + len(a.data)]
            in_flight.append((a.offset, a.offset + len(a.data), a.fin))
        rng.shuffle(in_flight)
        for _ in range(rng.randint(0, len(in_flight))):
            start, stop, fin = in_flight.pop()
            state = QuicDeliveryState.LOST if rng.random() < 0.1 else QuicDeliveryState.ACKED
            for sender in (ours, theirs):
                sender.on_data_delivery(state, start, stop, fin)
        unacked = theirs._buffer_stop - theirs._buffer_start
        assert _quic.unacked_bytes(server, sid) == unacked
        assert len(ours._buffer) <= 2 * unacked + 65536
        assert ours.is_finished == theirs.is_finished
    assert _quic.unacked_bytes(server, sid) == 0 and len(ours._buffer) == 0
