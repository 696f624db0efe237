"""Stateless resets (RFC 9000 §10.3) under abuse: a flood of short-header junk for unknown
connections from many addresses is answered at the configured rate at most (in all and per
address), never with more bytes than it sent; tiny datagrams and long headers get nothing;
clients keep being served."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from quicproxy._metrics import metrics
from tests.helpers import fetch
from tests.hostile.probe import in_process, received, udp_socket

SOURCES = [f"127.0.0.{n}" for n in range(2, 42)]  # 40 client addresses on loopback


def junk_flood(sources: list[str], port: int, size: int, count: int, seconds: float) -> dict:
    """``count`` short-header datagrams of ``size`` bytes for random (unknown) connection
    IDs, round-robin from ``sources`` over ``seconds``; then every answer each source got."""
    socks = [udp_socket(host) for host in sources]
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
    start = time.monotonic()
    for i in range(count):
        data = bytearray(os.urandom(size))
        data[0] = 0x40 | (data[0] & 0x3F)  # short header, fixed bit
        socks[i % len(socks)].sendto(bytes(data), ("127.0.0.1", port))
        ahead = start + seconds * (i + 1) / count - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    answers = {host: received(sock) for host, sock in zip(sources, socks, strict=True)}
    for sock in socks:
        sock.close()
    return {"elapsed": elapsed, "answers": answers}


async def test_a_junk_flood_from_many_addresses_is_answered_at_the_rate_limit_only(
    make_proxy, backend, certs
):
    rate = 50
    proxy = await make_proxy(backend, quic={"stateless_reset_rate": rate})
    flood = asyncio.ensure_future(in_process(junk_flood, SOURCES, proxy.https_port, 60, 8000, 3.0))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/during")
    served_in = time.monotonic() - started
    result = await flood
    answers = result["answers"]
    total = sum(len(got) for got in answers.values())
    seconds = result["elapsed"] + 0.5
    # the global bucket: a second's burst, then ``rate`` a second
    assert 0 < total <= rate * (seconds + 1) + 1, f"{total} resets in {seconds:.1f} s"
    # per address: a tenth of the rate, a burst of two seconds' worth
    per_source = max(1, rate // 10)
    worst = max(len(got) for got in answers.values())
    assert worst <= per_source * (seconds + 2) + 1, f"one address got {worst} resets"
    for got in answers.values():
        for reset in got:
            assert 21 <= len(reset) < 60  # smaller than what triggered it
            assert reset[0] & 0xC0 == 0x40  # looks like a short-header packet
    listener = proxy._quic
    assert listener.stats["reset"] == total
    sent = metrics.value("quicproxy_quic_stateless_resets_total", result="sent")
    assert sent >= total  # counted for the scrape too (the registry is the process's)
    assert listener.stats["reset_limited"] >= 8000 - total - 10
    assert status == 200 and served_in < 1.0, f"a client waited {served_in:.2f} s"
    print(
        f"junk flood: 8000 datagrams, {total} resets in {seconds:.1f} s, client {served_in:.2f} s"
    )


async def test_tiny_datagrams_and_long_headers_of_unknown_connections_get_nothing(
    make_proxy, backend
):
    proxy = await make_proxy(backend)
    sock = udp_socket()
    sock.settimeout(0.5)
    try:
        for size in range(1, 22):  # a reset must be >= 21 bytes and smaller than this
            data = bytearray(os.urandom(size))
            data[0] = 0x40 | (data[0] & 0x3F)
            sock.sendto(bytes(data), ("127.0.0.1", proxy.https_port))
        handshake = bytes([0xE0]) + (1).to_bytes(4, "big") + b"\x08" + os.urandom(8) + b"\x00"
        for _ in range(5):  # a Handshake packet of an unknown connection, padded
            sock.sendto(handshake + os.urandom(100), ("127.0.0.1", proxy.https_port))
        await asyncio.sleep(0.3)
        got = received(sock)
    finally:
        sock.close()
    assert got == []
    assert proxy._quic.stats["reset"] == 0


async def test_one_address_gets_a_tenth_of_the_rate(make_proxy, backend):
    """One source alone cannot draw the whole budget: 10 a second at rate 100 (burst 20)."""
    proxy = await make_proxy(backend, quic={"stateless_reset_rate": 100})
    result = await in_process(junk_flood, ["127.0.0.1"], proxy.https_port, 80, 600, 1.5)
    got = len(result["answers"]["127.0.0.1"])
    seconds = result["elapsed"] + 0.5
    assert 10 <= got <= 20 + 10 * seconds + 1, f"{got} resets in {seconds:.1f} s"
    assert proxy._quic.stats["reset_limited"] >= 600 - got - 5
