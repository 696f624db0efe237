"""The QUIC core on a path: the server probes for larger datagrams (adopted only once
acknowledged, started over when the client's address changes), and its TLS key
derivation gives the bytes qh3's own would."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from qh3 import tls
from qh3.quic.packet_builder import QuicDeliveryState

from quicproxy.quic import _core as _quic
from tests.test_quic_core import _pair

HOME = ("127.0.0.1", 4433)
AWAY = ("127.0.0.1", 5544)


def _shuttle(
    client: Any,
    server: Any,
    now: float,
    addr: Any = HOME,
    drop_above: int = 0,
    until: Any = None,
) -> tuple[float, list[int]]:
    """Move datagrams both ways, running timers due within a second (delayed ACKs,
    loss detection), until both are quiet; the sizes the server sent.
    ``drop_above``: server datagrams larger than this are lost on the way (a narrow path);
    ``until``: stop as soon as this is true after a flush of the server's."""
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
        if until is not None and until():
            break
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


def _received(client: Any) -> int:
    got = 0
    while (event := client.next_event()) is not None:
        if getattr(event, "stream_id", None) is not None and hasattr(event, "data"):
            got += len(event.data)
    return got


def test_the_server_moves_to_the_probed_size_once_a_bulk_transfer_starts(certs):
    client, server, now = _pair(certs, probe_size=1452)
    now, sizes = _shuttle(client, server, now)
    now, small = _download(client, server, now, 4_000)  # a short exchange: no probe
    assert server._mtu_probe_pending is None and max(sizes + small) <= 1350
    now, sizes = _download(client, server, now, 200_000)
    assert server._max_datagram_size == 1452  # probed and acknowledged
    assert max(sizes) == 1452 and sizes.count(1452) >= 100  # the data rides in them
    assert _received(client) == 204_000


def test_a_lost_probe_leaves_the_configured_size(certs):
    client, server, now = _pair(certs, probe_size=1452, drop_above=1350)
    now, sizes = _download(client, server, now, 100_000, drop_above=1350)
    assert sizes.count(1452) == 1  # the probe, lost on this narrow path
    assert max(s for s in sizes if s != 1452) <= 1350
    assert server._max_datagram_size == 1350 and server._mtu_probe_pending is None
    assert _received(client) == 100_000


def test_without_probe_size_nothing_is_probed(certs):
    client, server, now = _pair(certs)
    now, sizes = _download(client, server, now, 100_000)
    assert sizes and max(sizes) <= 1350


def test_a_new_client_address_starts_over_from_the_configured_size(certs):
    """Migration: the new path may be narrower. Until the client acknowledges a probe
    on it, nothing larger than the configured size goes there."""
    client, server, now = _pair(certs, probe_size=1452)
    now, _ = _download(client, server, now, 100_000)
    assert server._max_datagram_size == 1452
    # the client's NAT rebinds: same connection, new address, and this path drops > 1350
    now, sizes = _download(client, server, now + 0.1, 100_000, addr=AWAY, drop_above=1350)
    assert max(s for s in sizes if s != 1452) <= 1350 and sizes.count(1452) <= 1  # a probe
    assert server._max_datagram_size == 1350
    assert _received(client) == 200_000  # the transfer completed on the narrow path


def test_a_late_ack_for_a_probe_sent_on_the_old_path_is_not_taken_for_the_new_one(certs):
    client, server, now = _pair(certs, probe_size=1452)
    sid = client.get_next_available_stream_id()
    client.send_stream_data(sid, b"GET", end_stream=True)
    now, _ = _shuttle(client, server, now)
    server.send_stream_data(sid, b"x" * 100_000, end_stream=True)
    # a bulk transfer starts; stop as soon as the probe is out (and not acknowledged)
    probing = lambda: server._mtu_probe_pending is not None  # noqa: E731
    now, _ = _shuttle(client, server, now, drop_above=1350, until=probing)
    old = server._mtu_probe_pending
    assert old == 1452
    client.send_ping(1)
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, AWAY, now=now)  # the client moved
    server._on_mtu_probe_delivery(QuicDeliveryState.ACKED, old)  # the old probe's ACK, late
    assert server._max_datagram_size == 1350
    now, _ = _shuttle(client, server, now + 1.0, addr=AWAY)  # the new path's own probe
    assert server._max_datagram_size == 1452
    assert _received(client) == 100_000


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
