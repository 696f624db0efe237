"""QUIC switches: Retry, 0-RTT (safe methods only), draining health, library API."""

from __future__ import annotations

import asyncio
import os
import time

from quicproxy._client import h3_client
from tests.helpers import fetch, https_url, tcp_client


async def test_retry_switch_validates_address_and_still_serves(make_proxy, backend, certs):
    proxy = await make_proxy(backend, quic={"retry": True})
    status, _, body = await fetch(proxy, certs, "h3", "GET", "/hello")
    assert (status, body) == (200, b"hello from backend /hello")


async def _tickets(proxy, certs):
    """Session tickets the proxy issues over one connection that made a GET."""
    tickets = []
    async with h3_client(
        https_url(proxy), cafile=certs[0], session_ticket_handler=tickets.append
    ) as client:
        assert (await client.request("GET", "/hello")).status == 200
        await asyncio.sleep(0.2)
    return tickets


async def test_0rtt_admits_safe_methods_and_answers_425_to_others(make_proxy, backend, certs):
    proxy = await make_proxy(backend, quic={"early_data": True})
    tickets = await _tickets(proxy, certs)
    assert tickets, "server issued no session ticket"
    ticket = tickets[-1]
    async with h3_client(
        https_url(proxy), cafile=certs[0], session_ticket=ticket, wait_connected=False
    ) as client:
        post = asyncio.ensure_future(client.request("POST", "/sha256", [], b"pay=1"))
        get = asyncio.ensure_future(client.request("GET", "/hello"))
        post_r, get_r = await post, await get
        assert client.proto._quic.tls.early_data_accepted
    assert post_r.status == 425
    assert get_r.status == 200
    assert not [r for r in backend.requests if r[1] == "/sha256"]


async def test_0rtt_is_off_by_default_so_no_tickets_are_issued(proxy, certs):
    assert await _tickets(proxy, certs) == []


async def test_health_turns_503_while_draining(proxy, certs):
    async with (
        h3_client(https_url(proxy), cafile=certs[0]) as h3c,
        tcp_client(certs, http2=True) as h2c,
        tcp_client(certs, http2=False) as h1c,
    ):
        url = https_url(proxy, "/_gwhealthz")
        before = [
            (await h2c.get(url)).status_code,
            (await h1c.get(url)).status_code,
            (await h3c.request("GET", "/_gwhealthz")).status,
        ]
        proxy.handler.draining = True
        after = [
            (await h2c.get(url)).status_code,
            (await h1c.get(url)).status_code,
            (await h3c.request("GET", "/_gwhealthz")).status,
        ]
        proxy.handler.draining = False
    assert before == [200, 200, 200]
    assert after == [503, 503, 503]


async def test_idle_timeout_is_applied(make_proxy, backend, certs):
    proxy = await make_proxy(backend, quic={"idle_timeout": 0.5})
    async with h3_client(https_url(proxy), cafile=certs[0]) as client:
        assert (await client.request("GET", "/hello")).status == 200
        await asyncio.sleep(2.0)
        assert client.proto._quic._close_event is not None


async def test_quic_socket_gets_a_large_receive_buffer(proxy):
    import socket
    from pathlib import Path

    from quicproxy._sockets import UDP_BUFFER

    sock = proxy._quic.socket.sock
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    cap = int(Path("/proc/sys/net/core/rmem_max").read_text()) * 2
    assert got >= (2 * UDP_BUFFER if os.geteuid() == 0 else min(2 * UDP_BUFFER, cap))


async def test_the_proxy_closes_a_connection_idle_past_its_timeout_after_activity(
    make_proxy, backend, certs
):
    # Every packet moves the idle deadline later: the proxy's own timer (not only the
    # client's) must still close the connection at the real deadline.
    proxy = await make_proxy(backend, quic={"idle_timeout": 1.0})
    async with h3_client(https_url(proxy), cafile=certs[0]) as client:
        for _ in range(6):  # 1.5 s of traffic, longer than the idle timeout
            await asyncio.sleep(0.25)
            assert (await client.request("GET", "/hello")).status == 200
        quiet = time.monotonic()
        assert len(proxy._quic.connections) == 1
        while proxy._quic.connections and time.monotonic() - quiet < 5:
            await asyncio.sleep(0.02)
        waited = time.monotonic() - quiet
    assert not proxy._quic.connections
    assert 0.9 < waited < 1.8, waited


async def test_0rtt_datagrams_read_with_their_initial_wait_with_it(make_proxy, backend, certs):
    """A resumed client's Initial and its 0-RTT datagrams read in one batch: the Initial
    waits its turn to be admitted, and the 0-RTT datagrams wait behind it instead of
    being dropped as packets of an unknown connection."""
    import ssl

    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    proxy = await make_proxy(backend, quic={"early_data": True})
    ticket = (await _tickets(proxy, certs))[-1]
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.server_name = "localhost"
    config.verify_mode = ssl.CERT_NONE
    config.session_ticket = ticket
    quic = QuicConnection(configuration=config)
    addr = ("127.0.0.1", proxy.https_port)
    quic.connect(addr, now=time.monotonic())
    h3 = H3Connection(quic)
    for n in range(8):  # more early data than the Initial's datagram holds
        sid = quic.get_next_available_stream_id()
        path = f"/hello?{n}&{'x' * 600}".encode()
        h3.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", path),
            ],
            end_stream=True,
        )
    datagrams = [data for data, _ in quic.datagrams_to_send(now=time.monotonic())]
    assert len(datagrams) >= 3 and quic.tls.session_resumed is False
    listener = proxy._quic
    before = listener.stats["handshakes"]
    for data in datagrams:  # one read batch, from a port nobody answers on
        listener.datagram_received(data, ("127.0.0.1", 9))
    assert listener.stats["handshakes"] == before
    deadline = time.monotonic() + 5
    while listener.stats["handshakes"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    conn = listener.by_cid[datagrams[0][6:14]]
    assert conn.received_bytes == sum(map(len, datagrams))  # none dropped
    assert conn.quic.tls.early_data_accepted


async def test_a_clienthello_split_over_two_datagrams_gets_one_flight_not_an_ack_first(
    make_proxy, backend, certs
):
    """A ClientHello too large for one datagram (post-quantum key shares do this) comes in
    two Initials; the server answers once both are in: its first datagram is the flight
    (ServerHello, certificate), not an ACK-only packet and a second send."""
    import socket

    from qh3.tls import Epoch

    from tests.hostile.probe import split_client_hello

    proxy = await make_proxy(backend)
    addr = ("127.0.0.1", proxy.https_port)
    quic, datagrams = split_client_hello(proxy.https_port)
    assert len(datagrams) == 2  # the ClientHello did not fit in one
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    try:
        for data in datagrams:
            sock.sendto(data, addr)
        first = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
    finally:
        sock.close()
    assert len(first) >= 1200  # Initial (ServerHello) + Handshake, padded: the flight
    quic.receive_datagram(first, addr, now=time.monotonic())
    assert quic._cryptos[Epoch.HANDSHAKE].recv.is_valid()  # it carried the ServerHello


async def test_the_listener_runs_an_http3_exchange_in_memory_before_it_binds(proxy):
    assert proxy._quic.warmed  # the first client of a fresh worker does not pay for first use


def test_warm_up_completes_a_request_on_the_listeners_configuration(certs):
    from quicproxy.quic._core import server_configuration
    from quicproxy.quic._h3 import warm_up

    cert, key = certs
    configuration = server_configuration(
        cert=cert, key=key, idle_timeout=30, max_datagram_size=1350, stream_window=65536
    )
    assert warm_up(configuration)


async def test_a_failing_warm_up_does_not_stop_the_start(make_proxy, backend, certs, monkeypatch):
    """A test double: no real input makes the in-memory exchange raise, so one is put in."""
    import quicproxy.quic._listen as quiclisten

    def broken(configuration):
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(quiclisten, "warm_up", broken)
    proxy = await make_proxy(backend)
    assert not proxy._quic.warmed
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/json")
    assert status == 200
