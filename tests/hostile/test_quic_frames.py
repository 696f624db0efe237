"""QUIC frames that cost work and produce nothing, and one connection seen from many addresses:
a real aioquic HTTP/3 client whose 1-RTT packets carry frames written by hand (sealed with
the client's own keys, sent from its own socket or from new addresses).

What is asserted: *_BLOCKED frames claiming limits we never granted close the connection
with PROTOCOL_VIOLATION (no ERROR log, no traceback, the proxy's windows unchanged); at our
limits they are hints the connection answers through; floods of PING, PATH_CHALLENGE,
padding, repeated ACK frames, STREAMS_BLOCKED, NEW/RETIRE_CONNECTION_ID close it with
H3_EXCESSIVE_LOAD (a 1,240-PING datagram after a few hundred frames, not all of them), while
a second client is served; every frame type at extreme values is answered through or closed
with a code, never an ERROR log; a connection fed from 5,000 source addresses keeps a short
path list and a flat cost per datagram; Chromium loading a page of 600 resources stays well
inside the budget."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import time
from collections import Counter
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.tls import Epoch

from quicproxy._metrics import metrics
from quicproxy.quic import _core as _quic
from tests.helpers import chromium_args, fetch, h3_from, run_chromium
from tests.hostile.probe import in_process

PROTOCOL_VIOLATION = 0x0A
H3_EXCESSIVE_LOAD = 0x107
MAX_VARINT = (1 << 62) - 1


def varints(*values: int) -> bytes:
    return b"".join(encode_uint_var(v) for v in values)


def craft(quic: Any, payload: bytes) -> bytes:
    """One 1-RTT packet of the client's connection carrying ``payload`` (frames, already
    encoded; the first frame's type below 0x40), with the client's next packet number."""
    builder = QuicPacketBuilder(
        host_cid=quic.host_cid,
        peer_cid=quic._peer_cid.cid,
        version=quic._version,
        is_client=True,
        max_datagram_size=1500,
        packet_number=quic._packet_number,
        spin_bit=quic._spin_bit,
    )
    builder.start_packet(QuicPacketType.ONE_RTT, quic._cryptos[Epoch.ONE_RTT])
    buf = builder.start_frame(payload[0])
    buf.push_bytes(payload[1:])
    datagrams, _ = builder.flush()
    quic._packet_number = builder.packet_number
    assert len(datagrams) == 1
    return datagrams[0]


def send(client: Any, payloads: list[bytes]) -> None:
    """Hand-written packets, from the client's own socket (its address)."""
    proto = client.proto
    server = proto._quic._network_paths[0].addr
    for payload in payloads:
        proto._transport.sendto(craft(proto._quic, payload), server)


def flood_from(fd: int, port: int, datagrams: list[bytes], seconds: float) -> int:
    """From a forked process: ``datagrams`` out of the client's socket (a duplicate of
    ``fd``), evenly over ``seconds``. Meant for :func:`in_process`."""
    sock = socket.socket(fileno=os.dup(fd))
    start = time.monotonic()
    sent = 0
    for i, data in enumerate(datagrams):
        try:
            sock.sendto(data, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
        ahead = start + seconds * (i + 1) / len(datagrams) - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    sock.close()
    return sent


async def closed_with(client: Any, within: float = 3.0) -> Any:
    """The client's record of the CONNECTION_CLOSE it received (None if none came)."""
    deadline = time.monotonic() + within
    quic = client.proto._quic
    while quic._close_event is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return quic._close_event


def server_side(proxy: Any, client: Any) -> Any:
    """The proxy's end of ``client``'s connection (by the connection ID it writes to)."""
    return proxy._quic.by_cid[client.proto._quic._peer_cid.cid]


def errors(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ------------------------------------------------------------------ *_BLOCKED


async def test_blocked_frames_claiming_limits_never_granted_close_with_protocol_violation(
    make_proxy, backend, certs, caplog
):
    """DATA_BLOCKED / STREAM_DATA_BLOCKED above what the proxy advertised: qh3 doubled the
    window for each one, until MAX_DATA overflowed a varint in the output path (an ERROR with
    a traceback, and the connection went silent). Now: PROTOCOL_VIOLATION at the first."""
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    for frames in (
        varints(0x14, MAX_VARINT),  # DATA_BLOCKED
        varints(0x15, 2, MAX_VARINT),  # STREAM_DATA_BLOCKED, the client's control stream
        varints(0x15, 4, 1 << 40),  # STREAM_DATA_BLOCKED, the next request stream (opens it)
    ):
        async with h3_from("127.0.0.1", proxy, certs) as client:
            assert (await client.request("GET", "/before")).status == 200
            server = server_side(proxy, client).quic
            window = server._local_max_data.value
            send(client, [frames] * 64)
            close = await closed_with(client)
            assert close is not None, f"{frames.hex()}: still open"
            assert close.error_code == PROTOCOL_VIOLATION and close.frame_type == frames[0]
            assert server._local_max_data.value == window
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/after")
    assert status == 200
    assert errors(caplog) == []


async def test_blocked_frames_at_our_limits_raise_nothing_and_the_connection_answers(
    make_proxy, backend, certs, caplog
):
    """What real clients send (ngtcp2, quic-go, Chrome: once per limit): a hint. The proxy
    grants credit as it consumes (and qh3 as data arrives), never on the peer's word."""
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        quic = client.proto._quic
        server = server_side(proxy, client).quic
        window = server._local_max_data.value
        control = server._streams[2].max_stream_data_local
        assert quic._remote_max_data == window
        frames = (
            varints(0x14, quic._remote_max_data)
            + varints(0x15, 2, quic._streams[2].max_stream_data_remote)
            + varints(0x16, 1)  # STREAMS_BLOCKED (bidi), under our limit
        )
        send(client, [frames] * 20)
        answer = await client.request("GET", "/after", timeout=5)
        assert answer.status == 200
        assert quic._close_event is None
        assert server._local_max_data.value == window
        assert server._streams[2].max_stream_data_local == control
    assert errors(caplog) == []


# ------------------------------------------------------------------ floods


def _pings(count: int) -> bytes:
    return b"\x01" * count


async def test_ping_flood_closes_with_excessive_load_and_another_client_is_served(
    make_proxy, backend, certs, caplog
):
    """1,240 PING frames a datagram, 2,000 datagrams a second, one connection: closed with
    H3_EXCESSIVE_LOAD after a few hundred frames (not 1,240 per datagram for ever)."""
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    port = proxy.https_port
    seconds, rate = 3.0, 2000
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        quic = client.proto._quic
        datagrams = [craft(quic, _pings(1240)) for _ in range(int(seconds * rate))]
        assert 1250 < len(datagrams[0]) < 1300
        fd = client.proto._transport.get_extra_info("socket").fileno()
        conn = server_side(proxy, client)
        received = conn.received_bytes
        cpu, wall = time.process_time(), time.monotonic()
        flooding = asyncio.ensure_future(in_process(flood_from, fd, port, datagrams, seconds))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        status, _, _ = await fetch(proxy, certs, "h3", "GET", "/during")
        took = time.monotonic() - started
        sent = await flooding
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        close = await closed_with(client)
    handled = (conn.received_bytes - received) // len(datagrams[0])
    per_datagram = cpu / sent * 1e6
    print(
        f"PING flood: {sent} datagrams sent in {wall:.1f}s, {handled} reached the connection;"
        f" proxy CPU {cpu:.2f}s, {per_datagram:.0f} us per datagram; second client {took:.2f}s"
    )
    assert sent >= 0.9 * len(datagrams)
    assert close is not None and close.error_code == H3_EXCESSIVE_LOAD, close
    assert status == 200 and took < 1.0, f"second client took {took:.2f}s"
    assert per_datagram < 60, f"{per_datagram:.0f} us of proxy CPU per flood datagram"
    assert errors(caplog) == []


FLOODS = {
    "PATH_CHALLENGE": varints(0x1A) + bytes(range(8)),
    "STREAMS_BLOCKED": varints(0x17, 3),
    "RETIRE_CONNECTION_ID": varints(0x19, 1),
    "NEW_CONNECTION_ID": varints(0x18, 1, 0, 8) + bytes(range(8)) + bytes(16),
    "PADDING between PINGs": b"\x01\x00",
    "MAX_DATA 0": varints(0x10, 0),
    "MAX_STREAM_DATA 0, our control stream": varints(0x11, 3, 0),
    "MAX_STREAMS 0": varints(0x13, 0),
    "RESET_STREAM, the same again and again": varints(0x04, 4, 0, 0),
    "STOP_SENDING of a finished stream": varints(0x05, 0, 0),
    "CRYPTO, empty": varints(0x06, 0, 0),
    "STREAM, one byte already received": varints(0x0E, 2, 0, 1) + b"\x00",
}
"""Frames repeated ~1,000 bytes' worth a packet, 30 packets: each costs qh3 0.3-3 us, and
each used to cost 400-950 us of proxy CPU a datagram, for as long as the client liked."""


async def test_floods_of_useless_frames_close_with_excessive_load(
    make_proxy, backend, certs, caplog
):
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    for name, frame in FLOODS.items():
        async with h3_from("127.0.0.1", proxy, certs) as client:
            assert (await client.request("GET", "/before")).status == 200
            per_packet = 1000 // len(frame)
            send(client, [frame * per_packet] * 30)
            close = await closed_with(client)
            assert close is not None, f"{name}: still open"
            assert close.error_code == H3_EXCESSIVE_LOAD, (name, close)
    # ACK frames: one a packet is what clients send; 200 copies of it (~2 us each for qh3)
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        largest = client.proto._quic._spaces[Epoch.ONE_RTT].ack_queue.bounds().stop - 1
        send(client, [varints(0x02, largest, 0, 0, 0) * 200] * 3)
        close = await closed_with(client)
        assert close is not None and close.error_code == H3_EXCESSIVE_LOAD, close
    # padding-only packets (no frame but PADDING), one a datagram: the budget's refill
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        for _ in range(10):
            if client.proto._quic._close_event is not None:
                break  # the client has dropped its keys
            send(client, [b"\x00" * 100] * 100)
            await asyncio.sleep(0.01)
        close = await closed_with(client)
        assert close is not None and close.error_code == H3_EXCESSIVE_LOAD, close
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/after")
    assert status == 200
    assert errors(caplog) == []


async def test_new_token_and_unsolicited_path_response_are_protocol_violations(
    make_proxy, backend, certs, caplog
):
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    for frame in (varints(0x07, 4) + b"abcd", varints(0x1B) + bytes(8)):
        async with h3_from("127.0.0.1", proxy, certs) as client:
            send(client, [frame])
            close = await closed_with(client)
            assert close is not None and close.error_code == PROTOCOL_VIOLATION, close
    assert errors(caplog) == []


async def test_what_real_clients_send_stays_far_under_the_budget(make_proxy, backend, certs):
    """Keep-alive and PTO PINGs, a PATH_CHALLENGE, padded ACK-only packets, a few BLOCKED
    hints: many times what browsers, quinn, ngtcp2, qh3 or aioquic send in a second."""
    proxy = await make_proxy(backend)
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        quic = client.proto._quic
        for _ in range(20):
            send(
                client,
                [b"\x01", b"\x01" + bytes(40), varints(0x1A) + bytes(8) + bytes(1100)]
                + [varints(0x14, quic._remote_max_data), b"\x01\x00\x00"],
            )
            await asyncio.sleep(0.05)
        for _ in range(5):
            assert (await client.request("GET", "/after", timeout=5)).status == 200
        assert quic._close_event is None


EXTREMES = {
    "ACK of packets never sent": varints(0x02, MAX_VARINT, MAX_VARINT, 0, 0),
    "RESET_STREAM past the window": varints(0x04, 0, MAX_VARINT, MAX_VARINT),
    "RESET_STREAM, stream ID past MAX_STREAMS": varints(0x04, MAX_VARINT - 3, 0, 0),
    "STOP_SENDING, a request stream": varints(0x05, 0, MAX_VARINT),
    "STOP_SENDING, our control stream": varints(0x05, 3, MAX_VARINT),
    "STOP_SENDING, a stream of ours never opened": varints(0x05, 4, 0),
    "CRYPTO at the last offset": varints(0x06, MAX_VARINT, 1) + b"x",
    "CRYPTO far ahead": varints(0x06, 1 << 20, 4) + b"abcd",
    "STREAM at the last offset": varints(0x0E, 0, MAX_VARINT, 1) + b"x",
    "STREAM with FIN past the window": varints(0x0F, 0, MAX_VARINT - 1, 1) + b"x",
    "MAX_DATA": varints(0x10, MAX_VARINT),
    "MAX_STREAM_DATA": varints(0x11, 0, MAX_VARINT),
    "MAX_STREAM_DATA, our control stream": varints(0x11, 3, MAX_VARINT),
    "MAX_STREAMS bidi": varints(0x12, 1 << 60),
    "MAX_STREAMS uni past 2^60": varints(0x13, MAX_VARINT),
    "DATA_BLOCKED at 0": varints(0x14, 0),
    "STREAM_DATA_BLOCKED, a stream of ours": varints(0x15, 3, 0),
    "STREAMS_BLOCKED past 2^60": varints(0x16, MAX_VARINT),
    "NEW_CONNECTION_ID": varints(0x18, 5, 0, 8) + bytes(range(8)) + bytes(16),
    "RETIRE_CONNECTION_ID unknown": varints(0x19, MAX_VARINT),
    "RETIRE_CONNECTION_ID current": varints(0x19, 0),
    "HANDSHAKE_DONE": varints(0x1E),
    "DATAGRAM": varints(0x30) + b"xx",
    "unknown type": varints(0x21),
}


async def test_every_frame_type_at_extreme_values_is_answered_or_closed_with_a_code(
    make_proxy, backend, certs, caplog
):
    """No frame a client can send reaches an ERROR log or stops the connection's output:
    50 of it, then the connection either answers a request or was closed with a code."""
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(
        backend, quic={"max_connections_per_address": 100, "max_handshakes_per_address": 100}
    )
    outcomes = {}
    for name, frame in EXTREMES.items():
        async with h3_from("127.0.0.1", proxy, certs) as client:
            send(client, [frame] * 50)
            close = await closed_with(client, 0.3)
            if close is None:
                answer = await client.request("GET", "/after", timeout=5)
                outcomes[name] = answer.status
            else:
                outcomes[name] = hex(close.error_code)
    print(outcomes)
    # 200, or a transport error (FLOW_CONTROL, STREAM_LIMIT, STREAM_STATE, FRAME_ENCODING,
    # CONNECTION_ID_LIMIT, PROTOCOL_VIOLATION, CRYPTO_BUFFER_EXCEEDED), H3_CLOSED_CRITICAL_STREAM
    codes = {200, "0x3", "0x4", "0x5", "0x7", "0x9", "0xa", "0xd", "0x104"}
    assert set(outcomes.values()) <= codes, outcomes
    assert outcomes["ACK of packets never sent"] == "0xa"
    assert outcomes["MAX_DATA"] == outcomes["DATA_BLOCKED at 0"] == 200
    assert errors(caplog) == []


# ------------------------------------------------------------------ paths


def _from_addresses(conn: Any, port: int, batches: list[list[bytes]]) -> None:
    """In a child process: each batch from its own new source addresses (127.0.x.y),
    one datagram each, sent when the parent asks."""
    index = 0
    while (i := conn.recv()) is not None:
        for data in batches[i]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.1.{index // 250}.{1 + index % 250}", 0))
            sock.sendto(data, ("127.0.0.1", port))
            sock.close()
            index += 1
        conn.send(i)


async def test_a_connection_seen_from_5000_addresses_keeps_a_short_path_list_and_flat_cost(
    make_proxy, backend, certs, caplog
):
    """Every datagram from a new address (a NAT rebinding, a hostile client): qh3 kept all
    of them in a list scanned per datagram, so each cost more than the last (80 -> 400 us).
    Now the list is capped and the cost per datagram flat."""
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend)
    port = proxy.https_port
    batches, size = 10, 500
    async with h3_from("127.0.0.1", proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        quic = client.proto._quic
        # an ACK frame, as clients send: not a probing frame (the new path is taken up)
        ack = varints(0x02, quic._spaces[Epoch.ONE_RTT].ack_queue.bounds().stop - 1, 0, 0, 0)
        plan = [[craft(quic, ack) for _ in range(size)] for _ in range(batches)]
        conn = server_side(proxy, client)
        paths: list[int] = []
        costs: list[float] = []
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        sender = ctx.Process(target=_from_addresses, args=(child, port, plan), daemon=True)
        sender.start()
        try:
            for i in range(batches):
                expected = conn.received_bytes + sum(map(len, plan[i]))
                cpu = time.process_time()
                parent.send(i)
                deadline = time.monotonic() + 20
                while conn.received_bytes < expected and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                assert conn.received_bytes >= expected, f"batch {i}: datagrams lost"
                costs.append((time.process_time() - cpu) / size * 1e6)
                paths.append(len(conn.quic._network_paths))
                assert parent.recv() == i
        finally:
            parent.send(None)
            sender.join(5)
        first, last = costs[0], costs[-1]
        print(
            f"5,000 addresses: {first:.0f} us per datagram (first 500), {last:.0f} us (last"
            f" 500); per batch {[round(c) for c in costs]}; paths kept {paths}"
        )
        assert max(paths) <= 4, paths
        assert last < 2 * first, f"{first:.0f} -> {last:.0f} us per datagram"
        assert quic._close_event is None
        answer = await client.request("GET", "/after", timeout=10)  # from its own address
        assert answer.status == 200
    assert errors(caplog) == []


async def test_a_browser_loading_600_resources_stays_well_inside_the_budget(
    make_proxy, backend, certs, tmp_path, caplog, monkeypatch
):
    """Chromium over HTTP/3, one page of 300 scripts and 300 images: its first flight (a
    dozen CRYPTO fragments and PINGs), STREAMS_BLOCKED for every request queued behind
    MAX_STREAMS (up to 64 a packet), dozens of HEADERS a packet. Every request is answered,
    nothing is closed, and the budget never falls to half."""
    caplog.set_level(logging.WARNING)
    spent: Counter[int] = Counter()
    lowest = [float(_quic.FRAME_BURST)]
    spend = _quic.FrameGuard._spend

    def watched(self: Any, context: Any, frame_type: int, cost: float = 1.0) -> None:
        spent[frame_type] += 1
        spend(self, context, frame_type, cost)
        lowest[0] = min(lowest[0], self._frame_budget.tokens)

    monkeypatch.setattr(_quic.FrameGuard, "_spend", watched)
    proxy = await make_proxy(backend, listen={"host": ""})  # chromium tries ::1 first
    origin = f"localhost:{proxy.https_port}"
    tags = '<script src="https://{o}/s{i}.js"></script><img src="https://{o}/i{i}">'.replace(
        "{o}", origin
    )
    page = tmp_path / "page.html"
    page.write_text("<html><body>" + "".join(tags.format(i=i) for i in range(300)) + "</body>")
    args = chromium_args(tmp_path / "profile", proxy) + ["--dump-dom", f"file://{page}"]
    status, out, err = await run_chromium(args)
    assert status == 0, err.decode()[-2000:]
    answered = metrics.value(
        "quicproxy_requests_total", protocol="h3", status_class="2xx", route="default"
    )
    print(f"chromium, 600 resources: budget spent {dict(spent)}, lowest {lowest[0]:.0f}")
    # every resource answered; Chromium may fetch one again under load (seen once on a
    # loaded 2-core box: /s228.js twice, 0.55 s apart, both 200)
    assert 600 <= answered <= 606
    assert sum(spent.values()) > 20  # it did draw on the budget
    assert lowest[0] > _quic.FRAME_BURST / 2
    assert errors(caplog) == [] and not [r for r in caplog.records if "flood" in r.getMessage()]
