"""QUIC listener under forged and abusive handshakes: no state for junk, Retry under load,
caps per address, handshake deadline; other clients keep being served throughout."""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from tests.helpers import fetch, h3, http_url
from tests.hostile.probe import (
    HealthProbe,
    client_initial,
    flood,
    in_process,
    in_thread,
    received,
    rss_kib,
    split_client_hello,
    udp_socket,
)

DCID = slice(6, 14)  # aioquic clients use 8-byte connection IDs: bytes 6..13 of an Initial


def forged(initial: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(initial)
        data[DCID] = rng.randbytes(8)
        out.append(bytes(data))
    return out


async def test_forged_initials_create_no_state_and_health_stays_fast(make_proxy, backend, certs):
    proxy = await make_proxy(backend)
    port = proxy.https_port
    real = client_initial(port)
    assert real[5] == 8 and len(real) >= 1200
    packets = forged(real, 8000, seed=1)
    rss_before = rss_kib()
    async with HealthProbe(proxy.http_port) as probe:
        sent = await in_process(flood, ["127.0.0.1"], packets, port, 4.0)
        await asyncio.sleep(0.5)
        status, _, _ = await fetch(proxy, certs, "h3", "GET", "/during")
    listener = proxy._quic
    assert sent == 8000
    assert listener.stats["handshakes"] <= 1  # only our own request's connection
    # every datagram was refused unread (over the rate), or examined and found forged
    assert listener.stats["invalid"] + listener.stats["shed"] >= 4000
    assert status == 200
    assert probe.failures == [] and probe.answers >= 10
    assert probe.slowest < 1.0, f"health took {probe.slowest:.2f}s during the flood"
    grown = rss_kib() - rss_before
    assert grown < 30 * 1024, f"RSS grew {grown} KiB"
    print(f"forged flood: health slowest {probe.slowest * 1000:.0f} ms, RSS +{grown} KiB")


def valid_initials(port: int, count: int) -> list[bytes]:
    return [client_initial(port) for _ in range(count)]


async def test_handshake_flood_from_many_addresses_gets_retry_and_expires(
    make_proxy, backend, certs
):
    proxy = await make_proxy(
        backend, quic={"retry_above": 40, "handshake_timeout": 2.0, "max_handshakes": 500}
    )
    port = proxy.https_port
    packets = await in_thread(valid_initials, port, 1200)
    sources = [f"127.0.0.{2 + i}" for i in range(100)]  # "spoofed" sources
    listener = proxy._quic
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(listener.connections))
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    async with HealthProbe(proxy.http_port) as probe, h3(proxy, certs) as open_conn:
        assert (await open_conn.request("GET", "/before")).status == 200
        flooding = asyncio.ensure_future(in_process(flood, sources, packets, port, 1.2))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        during = await open_conn.request("GET", "/during")  # an established connection
        took = time.monotonic() - started
        status, _, _ = await fetch(proxy, certs, "h3", "GET", "/new")  # answers the Retry
        await flooding
    watcher.cancel()
    assert during.status == 200 and took < 1.0, f"established h3 took {took:.2f}s"
    assert status == 200
    assert probe.failures == [] and probe.slowest < 1.0
    assert peak <= 42  # the flood's handshakes up to retry_above (+ our own two clients)
    assert listener.stats["retry"] >= 1000
    await asyncio.sleep(2.5)  # handshake_timeout: the flood's half-open connections go
    assert len(listener.connections) == 0 and len(listener.by_cid) == 0
    assert listener.handshakes == 0 and len(listener.per_address) == 0
    print(f"handshake flood: peak {peak} connections, {listener.stats['retry']} Retry sent")


async def test_one_address_is_capped_in_handshakes(make_proxy, backend, certs):
    proxy = await make_proxy(backend, quic={"retry_above": 10000, "max_handshakes_per_address": 20})
    port = proxy.https_port
    packets = await in_thread(valid_initials, port, 200)
    await in_process(flood, ["127.0.0.9"], packets, port, 1.0)
    await asyncio.sleep(0.3)
    listener = proxy._quic
    assert listener.per_address.count("127.0.0.9") == 20
    assert listener.stats["refused"] >= 150
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/other-address")
    assert status == 200


async def test_too_much_data_before_the_handshake_drops_the_connection(make_proxy, backend):
    proxy = await make_proxy(backend, quic={"max_handshake_bytes": 20000})
    port = proxy.https_port
    first = client_initial(port)
    # The first Initial opens a connection; the same DCID again and again is more
    # handshake data than allowed.
    await in_process(flood, ["127.0.0.1"], [first] * 40, port, 0.4)
    await asyncio.sleep(0.3)
    listener = proxy._quic
    # 40 x 1200 bytes: each connection the copies open is dropped past 20,000 bytes
    assert listener.stats["refused"] >= 2
    assert all(c.received_bytes <= 20000 for c in listener.connections)
    assert listener.stats["handshakes"] == listener.stats["refused"] + len(listener.connections)


async def test_garbage_and_unknown_versions_get_nothing_or_version_negotiation(make_proxy, backend):
    proxy = await make_proxy(backend)
    port = proxy.https_port
    sock = udp_socket()
    sock.settimeout(0.5)
    rng = random.Random(3)
    for size in (1, 20, 1199, 1200, 1500):
        sock.sendto(rng.randbytes(size), ("127.0.0.1", port))
    initial = bytearray(client_initial(port))
    initial[1:5] = (0x1A2A3A4A).to_bytes(4, "big")  # a version we do not speak
    sock.sendto(bytes(initial), ("127.0.0.1", port))
    answers = await in_thread(received, sock)  # the proxy runs in this thread's event loop
    sock.close()
    assert len(answers) == 1 and answers[0][1:5] == b"\0\0\0\0"  # Version Negotiation
    assert len(proxy._quic.connections) == 0


async def _admitted(listener, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while listener.stats["handshakes"] < count:
        assert time.monotonic() < deadline, f"{listener.stats['handshakes']}/{count} admitted"
        await asyncio.sleep(0.01)


async def test_new_initials_wait_their_turn_behind_known_connections(make_proxy, backend):
    """Datagrams read in one batch: a known connection's is handled as it is read, new
    Initials (a handshake each: key exchange, signature) are admitted 16 per event-loop
    turn, so a burst of them delays everybody else by one turn's worth at most."""
    proxy = await make_proxy(backend, quic={"retry_above": 10000})
    listener = proxy._quic
    first, *burst = await in_thread(valid_initials, proxy.https_port, 41)
    known_addr = ("127.0.0.1", 9)  # the server's answers go to the discard port
    listener.datagram_received(first, known_addr)
    assert listener.stats["handshakes"] == 0  # read, not handled yet
    await _admitted(listener, 1)
    known = listener.by_cid[first[DCID]]
    before = known.received_bytes
    for i, data in enumerate(burst):
        listener.datagram_received(data, ("127.0.0.1", 20000 + i))
    listener.datagram_received(first, known_addr)  # last of the batch, handled first
    assert known.received_bytes == before + len(first)
    assert listener.stats["handshakes"] == 1
    await asyncio.sleep(0)  # one event-loop turn
    assert listener.stats["handshakes"] == 1 + 16
    await _admitted(listener, 41)
    assert listener.stats["shed"] == 0


async def test_admission_counts_handshakes_not_datagrams(make_proxy, backend):
    """A post-quantum ClientHello spans two Initials. Admission counts handshakes: in one
    event-loop turn 16 clients (32 datagrams) are admitted, and each gets its whole
    server flight at once (not a lone ACK); the others wait for the next turn."""
    proxy = await make_proxy(backend, quic={"retry_above": 10000})
    listener = proxy._quic
    hellos = [(await in_thread(split_client_hello, proxy.https_port))[1] for _ in range(20)]
    assert all(len(pair) == 2 for pair in hellos), [list(map(len, p)) for p in hellos]
    clients = [udp_socket() for _ in hellos]
    try:
        for sock in clients:
            sock.setblocking(False)
        for sock, pair in zip(clients, hellos, strict=True):  # one batch, as read
            for data in pair:
                listener.datagram_received(data, sock.getsockname())
        await asyncio.sleep(0)  # one event-loop turn
        assert listener.stats["handshakes"] == 16
        flights = [received(sock) for sock in clients]
        for got in flights[:16]:  # Initial + Handshake: ServerHello, certificate, Finished
            assert got and got[0][0] & 0xF0 == 0xC0, got
            assert sum(map(len, got)) > 1500, [len(d) for d in got]
        assert flights[16:] == [[]] * 4
        await _admitted(listener, 20)
        assert all(received(sock) for sock in clients[16:])
    finally:
        for sock in clients:
            sock.close()


async def test_admission_handles_64_queued_datagrams_per_turn_at_most(make_proxy, backend):
    """The datagrams queued behind an Initial (the rest of a ClientHello, 0-RTT, here
    resends) are bounded per turn too: 64, the rest wait for the next turn."""
    proxy = await make_proxy(backend, quic={"retry_above": 10000, "max_handshake_bytes": 1 << 20})
    listener = proxy._quic
    initial = await in_thread(client_initial, proxy.https_port)
    for _ in range(100):
        listener.datagram_received(initial, ("127.0.0.1", 9))
    await asyncio.sleep(0)  # one event-loop turn
    assert listener.stats["handshakes"] == 1
    assert len(listener._waiting) == 100 - 64
    await asyncio.sleep(0)
    assert not listener._waiting
    assert listener.stats["handshakes"] == 1


async def test_the_queue_of_new_initials_is_bounded(make_proxy, backend):
    proxy = await make_proxy(backend, quic={"retry_above": 10000})
    listener = proxy._quic
    initials = await in_thread(valid_initials, proxy.https_port, 300)
    for i, data in enumerate(initials):  # one batch, from 100 addresses
        listener.datagram_received(data, (f"127.0.0.{2 + i % 100}", 20000 + i))
    assert listener.stats["shed"] == 300 - 256  # dropped unread: the clients resend
    await _admitted(listener, 256)
    # bytes too: 20 Initials padded to 65,200 bytes overflow 1 MiB at the 17th
    big = [data + bytes(64000) for data in await in_thread(valid_initials, proxy.https_port, 20)]
    for i, data in enumerate(big):
        listener.datagram_received(data, ("127.0.1.1", 30000 + i))
    assert listener.stats["shed"] == 44 + 4
    await _admitted(listener, 256 + 16)
    async with httpx.AsyncClient() as client:
        text = (await client.get(http_url(proxy, "/metrics"))).text
    dropped = 'quicproxy_quic_initials_dropped_total{reason="queue"} 48.0'
    assert dropped in text.splitlines()
