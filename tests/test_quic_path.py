"""The QUIC core on a path: the server probes for larger datagrams (adopted only once
acknowledged, started over when the client's address changes), and its TLS key
derivation gives the bytes qh3's own would."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from qh3 import tls
from qh3.quic.packet_builder import QuicDeliveryState

from quicproxy import _quic
from tests.test_quic_core import _pair

HOME = ("127.0.0.1", 4433)
AWAY = ("127.0.0.1", 5544)


def _shuttle(
    client: Any, server: Any, now: float, addr: Any = HOME, drop_above: int = 0
) -> tuple[float, list[int]]:
    """Move datagrams both ways, running timers due within a second (delayed ACKs,
    loss detection), until both are quiet; the sizes the server sent.
    ``drop_above``: server datagrams larger than this are lost on the way (a narrow path)."""
    sizes: list[int] = []
    for _ in range(2000):
        moved = False
        for side in (client, server):
            timer = side.get_timer()
            if timer is not None and timer <= now:
                side.handle_timer(now=now)
        for data, _ in server.datagrams_to_send(now=now):
            sizes.append(len(data))
            moved = True
            if not drop_above or len(data) <= drop_above:
                client.receive_datagram(data, HOME, now=now)
        for data, _ in client.datagrams_to_send(now=now):
            moved = True
            server.receive_datagram(data, addr, now=now)
        now += 0.002
        if not moved:
            timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
            if not timers or min(timers) > now + 1.0:
                break
            now = max(now, min(timers))
    return now, sizes


def _download(
    client: Any, server: Any, now: float, size: int, **kw: Any
) -> tuple[float, list[int]]:
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"GET", end_stream=True)
    now, _ = _shuttle(client, server, now, **kw)
    server.send_stream_data(sid, b"x" * size, end_stream=True)
    return _shuttle(client, server, now + 0.05, **kw)


def test_the_server_moves_to_the_probed_size_once_the_client_acknowledges_it(certs):
    client, server, now = _pair(certs, probe_size=1452)
    assert server._mtu_probe_pending == 1452  # the probe (PING + PADDING) left with the handshake
    assert server._max_datagram_size == 1350
    now, sizes = _shuttle(client, server, now)
    assert server._max_datagram_size == 1452  # acknowledged
    now, sizes = _download(client, server, now, 200_000)
    assert max(sizes) == 1452 and sizes.count(1452) >= 100  # the data rides in 1452-byte datagrams
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert sum(len(e.data) for e in events if hasattr(e, "data") and e.stream_id == 0) == 200_000


def test_a_lost_probe_leaves_the_configured_size(certs):
    client, server, now = _pair(certs, probe_size=1452, drop_above=1350)
    assert server._mtu_probe_pending == 1452  # sent, and lost on this narrow path
    now, sizes = _download(client, server, now, 100_000, drop_above=1350)
    assert sizes and max(sizes) <= 1350
    assert server._max_datagram_size == 1350 and server._mtu_probe_pending is None
    got = b""
    while (event := client.next_event()) is not None:
        if getattr(event, "stream_id", None) is not None and hasattr(event, "data"):
            got += event.data
    assert len(got) == 100_000


def test_without_probe_size_nothing_is_probed(certs):
    client, server, now = _pair(certs)
    now, sizes = _shuttle(client, server, now)
    now, sizes = _download(client, server, now, 100_000)
    assert sizes and max(sizes) <= 1350


def test_a_new_client_address_starts_over_from_the_configured_size(certs):
    """Migration: the new path may be narrower. Until the client acknowledges a probe
    on it, nothing larger than the configured size goes there; then the probe wins again."""
    client, server, now = _pair(certs, probe_size=1452)
    now, _ = _shuttle(client, server, now)
    assert server._max_datagram_size == 1452
    # the client's NAT rebinds: same connection, new address, and this path drops > 1350
    now, sizes = _download(client, server, now + 0.1, 100_000, addr=AWAY, drop_above=1350)
    data_sizes = [s for s in sizes if s != 1452]
    assert max(data_sizes) <= 1350 and sizes.count(1452) <= 2  # probes only, never data
    assert server._max_datagram_size == 1350
    got = b""
    while (event := client.next_event()) is not None:
        if hasattr(event, "data") and getattr(event, "stream_id", None) is not None:
            got += event.data
    assert len(got) >= 100_000  # the transfer completed on the narrow path


def test_a_late_ack_for_a_probe_sent_on_the_old_path_is_not_taken_for_the_new_one(certs):
    client, server, now = _pair(certs, probe_size=1452)
    old = server._mtu_probe_pending  # left with the handshake, not acknowledged yet
    assert old == 1452
    server.receive_datagram(client.datagrams_to_send(now=now + 1.0)[0][0], AWAY, now=now + 1.0)
    server._on_mtu_probe_delivery(QuicDeliveryState.ACKED, old)  # its ACK, late
    assert server._max_datagram_size == 1350
    now, _ = _shuttle(client, server, now + 1.0, addr=AWAY)  # the new path's own probe
    assert server._max_datagram_size == 1452


@pytest.mark.parametrize("algorithm", [256, 384])
@pytest.mark.parametrize("length", [12, 16, 32, 48, 64, 100])
def test_key_derivation_matches_qh3s_own(algorithm, length):
    secret = bytes(range(algorithm // 8))
    for label, context in [(b"quic key", b""), (b"c hs traffic", b"\x01" * 32), (b"finished", b"")]:
        want = tls.HKDFExpand(algorithm, length, tls.hkdf_label(label, context, length)).derive(
            secret
        )
        assert _quic.hkdf_expand_label(algorithm, secret, label, context, length) == want
    ours = _quic.hkdf_extract(algorithm, b"salt", b"key material")
    theirs = hmac.HMAC(b"salt", b"key material", f"sha{algorithm}").digest()
    assert ours == theirs
    assert tls.hkdf_expand_label is _quic.hkdf_expand_label  # what qh3 calls now
