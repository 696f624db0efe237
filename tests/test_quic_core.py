"""The QUIC core's contract with qh3: the private attributes it relies on exist, request
streams get only the receive window granted, and the listener's packet checks accept real
packets (from aioquic, a real client) and refuse forged ones."""

from __future__ import annotations

import random
from typing import Any

import pytest
from aioquic.h3.connection import H3Connection as ClientH3
from aioquic.quic import events as client_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from qh3 import tls

from quicproxy.quic import _core as _quic
from quicproxy.quic._core import ProxyH3 as H3
from tests.hostile.probe import client_initial


def test_every_private_qh3_attribute_the_core_uses_still_exists(certs):
    """Fails loudly when a qh3 upgrade renames or removes one (see quic/_core.py)."""
    client, conn, _ = _pair(certs)
    owners: dict[str, object] = {
        "connection": conn,
        "h3": H3(conn),
        "recovery": conn._loss,
        "space": conn._spaces[tls.Epoch.ONE_RTT],
        "cc": conn._loss._cc,
        "tls": conn.tls,
    }
    sid = conn.get_next_available_stream_id()
    conn.send_stream_data(sid, b"abc")  # a stream, for its sender's attributes
    owners["sender"] = conn._streams[sid].sender
    missing = []
    for owner, name in _quic.PRIVATE:
        target = owners[owner] if isinstance(owner, str) else owner
        if not hasattr(target, name):
            missing.append(f"{getattr(target, '__name__', owner)}.{name}")
    assert missing == [], f"qh3 no longer has {missing}: update quicproxy/quic/_core.py"
    assert _quic.unsent_bytes(conn, sid) == 3 and not conn.all_acknowledged()
    assert conn.handshake_complete is True and conn.closing is False
    assert isinstance(conn._streams[sid], _quic.ProxyStream)


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


WINDOW = 1 << 20


def _pair(
    certs, probe_size: int = 0, drop_above: int = 0
) -> tuple[QuicConnection, _quic.CreditedConnection, float]:
    """A real aioquic client and our server connection, handshake done in memory
    (``drop_above``: server datagrams larger than this are lost on the way)."""
    server_cfg = _quic.server_configuration(
        cert=certs[0],
        key=certs[1],
        idle_timeout=60.0,
        max_datagram_size=1350,
        stream_window=WINDOW,
        probe_size=probe_size,
    )
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"], verify_mode=0)
    )
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
            if receiver is client and drop_above and len(data) > drop_above:
                continue
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
    ack_at = server._spaces[tls.Epoch.ONE_RTT].ack_at
    assert ack_at is not None and ack_at >= now + _quic.ACK_DELAY - 1e-9
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
    h3_client, h3_server = ClientH3(client), H3(server)

    def deliver(sender: Any, receiver: Any, h3: Any) -> list:
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


def test_an_idle_connection_sheds_its_handshake_buffers(certs):
    """The TLS output buffers (16 KiB each in qh3) are small once the handshake is done,
    and the connection still handles frames (a request stream after the handshake)."""
    client, server, now = _pair(certs)
    server.shed_handshake_buffers()
    assert all(buf.capacity <= _quic.SPENT_CRYPTO_BUFFER for buf in server._crypto_buffers.values())
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


def _send_until_blocked(client: QuicConnection, server: Any, sid: int, now: float) -> int:
    """The client writes 3 MiB on a request stream; return what reached the server."""
    client.send_stream_data(sid, b"x" * (3 << 20))
    got = 0
    for _ in range(400):
        moved = 0
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            moved += 1
        for event in iter(server.next_event, None):
            if isinstance(event, _quic.events.StreamDataReceived):
                got += len(event.data)
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            moved += 1
        now += 0.002
        if not moved:
            break
    return got


def test_a_request_stream_window_grows_only_with_credit_granted(certs):
    """qh3 doubles a stream's window as data arrives; the proxy's request streams keep
    theirs until the proxy has used the data (a slow upstream slows the client)."""
    client, server, now = _pair(certs)
    sid = client.get_next_available_stream_id()
    assert _send_until_blocked(client, server, sid, now) == WINDOW  # nothing granted
    stream = server._streams[sid]
    assert stream.max_stream_data_local == WINDOW
    assert client._streams[sid].max_stream_data_remote == WINDOW
    # what qh3 does on STREAM_DATA_BLOCKED or past half the window: doubling, clamped
    stream.max_stream_data_local *= 2
    assert stream.max_stream_data_local == WINDOW
    server.credit[sid] = WINDOW + 512 * 1024  # the proxy used half a window
    assert _send_until_blocked(client, server, sid, now + 1) == 512 * 1024
    assert client._streams[sid].max_stream_data_remote == WINDOW + 512 * 1024


def test_other_peer_streams_keep_qh3s_growing_window(certs):
    """The peer's unidirectional streams (HTTP/3 control, QPACK) are read as they arrive:
    their window grows as qh3's does, so a long-lived one never stalls."""
    client, server, now = _pair(certs)
    sid = client.get_next_available_stream_id(is_unidirectional=True)
    assert _send_until_blocked(client, server, sid, now) == 3 << 20


def test_nothing_is_sent_past_a_reset_even_when_data_in_flight_is_lost(certs):
    """qh3's sender queues lost data again even after a reset and would send it, and
    more, beyond the final size its RESET_STREAM announced. The proxy's streams hold it."""
    client, server, now = _pair(certs)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"GET", end_stream=True)
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    server.send_stream_data(sid, b"x" * 1_000_000)
    stream = server._streams[sid]
    final = None
    reset_seen = False
    for i in range(40):
        out = server.datagrams_to_send(now=now)
        if i == 5:
            server.reset_stream(sid, 0x102)
            final = stream.sender.highest_offset
        for k, (data, _) in enumerate(out):
            if not (i == 4 and k < 3):  # lose three datagrams sent just before the reset
                client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
        for event in iter(client.next_event, None):
            reset_seen |= isinstance(event, client_events.StreamReset)
        now += 0.01
    assert reset_seen and final is not None
    assert stream.sender.highest_offset == final
    assert client._close_event is None and sid not in server._streams  # reset acknowledged


def test_a_stream_qh3_drops_from_its_send_queue_is_put_back(certs):
    """When a stream's frame does not fit (here: a congestion window one frame short),
    qh3 leaves that stream out of its send queue for good; a reset then never leaves.
    The core puts it back, so the RESET_STREAM goes once the window allows."""
    client, server, now = _pair(certs)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"GET", end_stream=True)
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, ("127.0.0.1", 4433), now=now)
    server.datagrams_to_send(now=now)
    server.reset_stream(sid, 0x102)
    cc = server._loss._cc
    window = cc.congestion_window
    cc.congestion_window = cc.bytes_in_flight + 30  # a packet header and a few bytes
    server.datagrams_to_send(now=now)
    assert server._streams[sid] in server._streams_queue
    cc.congestion_window = window
    reset = False
    for data, _ in server.datagrams_to_send(now=now + 0.01):
        client.receive_datagram(data, ("127.0.0.1", 4433), now=now + 0.01)
    for event in iter(client.next_event, None):
        reset |= isinstance(event, client_events.StreamReset)
    assert reset


def test_retry_tokens_bind_address_cids_and_age_and_refuse_forgeries():
    """A real client's answer to our Retry validates to its original DCID; a token
    from another address, for another DCID, too old, truncated, flipped or random is
    refused (None), never an exception out of the listener."""
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"], verify_mode=0)
    )
    server_addr, client_addr = ("127.0.0.1", 4433), ("127.0.0.1", 50000)
    client.connect(server_addr, now=1.0)
    first = _quic.parse_header(client.datagrams_to_send(now=1.0)[0][0], 8)
    assert first is not None
    tokens = _quic.RetryTokens()
    client.receive_datagram(tokens.retry_packet(first, client_addr, 1.0), server_addr, now=1.0)
    answer = _quic.parse_header(client.datagrams_to_send(now=1.0)[0][0], 8)
    assert answer is not None and answer.token
    assert tokens.validate(answer, client_addr, 2.0) == first.dcid
    assert tokens.validate(answer, ("127.0.0.2", 50000), 2.0) is None
    assert tokens.validate(answer, client_addr, 1.0 + 31.0) is None
    other_dcid = _quic.Header(**{**answer.__dict__, "dcid": b"x" * 8})
    assert tokens.validate(other_dcid, client_addr, 2.0) is None
    assert _quic.RetryTokens().validate(answer, client_addr, 2.0) is None  # another key
    rng = random.Random(7)
    token = bytearray(answer.token)
    forged = [bytes(token[:n]) for n in (0, 1, 12, 36, len(token) - 1)]
    for _ in range(50):
        flipped = bytearray(token)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        forged += [bytes(flipped), rng.randbytes(rng.randrange(80))]
    for bad in forged:
        header = _quic.Header(**{**answer.__dict__, "token": bad})
        assert tokens.validate(header, client_addr, 2.0) is None


def test_idle_streams_wait_outside_the_send_queue_and_still_send_later(certs, monkeypatch):
    """While a response is sent in bulk, qh3 builds packets with only the streams that
    have something to send in its queue (not the six idle HTTP/3 control and QPACK
    streams); afterwards every stream is back, and an idle one that gets data (a GOAWAY
    on the control stream) sends it in the next flush."""
    client, server, now = _pair(certs)
    ClientH3(client)  # the client's control and QPACK streams
    h3_server = H3(server)

    def exchange(rounds: int = 1) -> list[Any]:
        nonlocal now
        got = []
        for _ in range(rounds):
            for a, b in ((client, server), (server, client)):
                for data, _ in a.datagrams_to_send(now=now):
                    b.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            got += list(iter(client.next_event, None))
            list(iter(server.next_event, None))
            now += 0.01
        return got

    exchange(3)  # settings and their ACKs: six idle unidirectional streams on each side
    assert len(server._streams) == 6
    seen: list[int] = []
    write = type(server).__mro__[1]._write_application

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        seen.append(len(self._streams_queue))
        write(self, *args, **kw)

    monkeypatch.setattr(type(server).__mro__[1], "_write_application", spy)
    sid = server.get_next_available_stream_id(is_unidirectional=True)
    server.send_stream_data(sid, b"\x21" + b"x" * 200_000, end_stream=True)  # reserved type
    received = sum(
        len(e.data)
        for e in exchange(60)
        if isinstance(e, client_events.StreamDataReceived) and e.stream_id == sid
    )
    assert received == 200_001
    assert seen and max(seen) == 1  # only the stream with data was in qh3's queue
    assert set(map(id, server._streams_queue)) == set(map(id, server._streams.values()))
    goaway = _quic.control_stream(h3_server)
    assert goaway is not None
    server.send_stream_data(goaway, b"\x07\x01\x00")  # GOAWAY(0) on the idle control stream
    events = exchange(1)
    assert any(
        isinstance(e, client_events.StreamDataReceived) and e.stream_id == goaway for e in events
    )


def test_only_the_quic_core_imports_the_quic_library():
    """Swapping the QUIC library means rewriting the core (``quic/_core.py`` and its packet
    builder ``quic/_packet.py``) and the HTTP/3 framing in ``quic/_h3.py``, nothing else."""
    import ast
    from pathlib import Path

    package = Path(_quic.__file__).parent.parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            if any(name == "qh3" or name.startswith("qh3.") for name in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"quic/_core.py", "quic/_packet.py", "quic/_h3.py"}


def test_finished_streams_are_one_number_per_type_until_a_gap():
    """qh3's record of discarded streams: what finished in order is a floor per stream type,
    only what finished above a stream still open is held, and membership is unchanged."""
    done = _quic.FinishedStreams()
    for sid in range(0, 4000, 4):  # a thousand requests, one after the other
        done.add(sid)
    assert len(done) == 0 and 0 in done and 3996 in done and 4000 not in done
    done.add(4004)  # 4000 still open
    done.add(4008)
    assert len(done) == 2 and 4004 in done and 4000 not in done
    done.add(4000)  # the gap closes
    assert len(done) == 0 and 4008 in done and 4012 not in done
    done.add(3)  # a server-initiated unidirectional stream: a type of its own
    assert 3 in done and 7 not in done and 2 not in done
    assert "x" not in done
