"""Stream abuse and upstream failures shared by h2 and h3: HTTP/3 rapid reset, truncated
upstream responses signalled on every protocol, upstream connection caps."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.helpers import fetch, h3, https_url, tcp_client
from tests.hostile.probe import HealthProbe

H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_CANCELLED = 0x10C


async def test_h3_rapid_reset_closes_the_connection_and_spares_the_backend(
    make_proxy, backend, certs
):
    proxy = await make_proxy(backend)
    head = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", b"/slow?s=1"),
    ]
    async with HealthProbe(proxy.http_port) as probe, h3(proxy, certs) as client:
        proto = client.proto
        quic = proto._quic
        started = time.monotonic()
        for _ in range(40):
            for _ in range(25):
                if quic._close_event is not None:
                    break
                sid = quic.get_next_available_stream_id()
                proto.h3.send_headers(sid, head, end_stream=False)
                proto.transmit()  # HEADERS out, then at once RESET_STREAM
                quic.reset_stream(sid, H3_REQUEST_CANCELLED)
            proto.transmit()
            await asyncio.sleep(0.01)
        for _ in range(100):
            if quic._close_event is not None:
                break
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        closed = quic._close_event
        status, _, _ = await fetch(proxy, certs, "h3", "GET", "/after")
    await asyncio.sleep(0.3)
    slow = [r for r in backend.requests if r[1].startswith("/slow")]
    assert closed is not None and closed.error_code == H3_EXCESSIVE_LOAD and took < 5
    assert len(slow) <= 20, f"{len(slow)} reset requests reached the backend"
    assert status == 200 and probe.failures == [] and probe.slowest < 1.0
    print(f"h3 rapid reset: {len(slow)} reached the backend, closed after {took:.2f}s")


@pytest.mark.parametrize("proto", ["h1", "h2", "h3"])
async def test_an_upstream_dying_mid_response_is_not_a_clean_end(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend)
    path = "/abort/10000000?after=1000000"  # promises 10 MB, sends 1 MB, then drops
    started = time.monotonic()
    if proto == "h3":
        async with h3(proxy, certs) as client:
            resp = await client.request("GET", path, timeout=10)
        assert resp.status == 200 and resp.reset and resp.size < 10_000_000
    else:
        async with tcp_client(certs, http2=proto == "h2") as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(https_url(proxy, path))
    assert time.monotonic() - started < 3.0
    assert (await fetch(proxy, certs, proto, "GET", "/after"))[0] == 200


async def test_upstream_connections_are_capped_and_the_overflow_gets_503(
    make_proxy, backend, certs
):
    proxy = await make_proxy(
        backend, upstream={"max_connections_per_member": 3, "queue_timeout": 0.5}
    )
    async with tcp_client(certs, http2=True) as client:
        calls = [client.get(https_url(proxy, "/slow?s=1.5")) for _ in range(10)]
        answers = await asyncio.gather(*calls)
    statuses = sorted(r.status_code for r in answers)
    assert backend.open_max <= 3
    assert statuses.count(200) == 3 and statuses.count(503) == 7
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.text == "503 Service Unavailable\n"  # no upstream address, no detail
    assert (await fetch(proxy, certs, "h2", "GET", "/after"))[0] == 200


@pytest.mark.parametrize("proto", ["h2", "h3"])
async def test_a_stalled_request_body_times_out(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend, timeouts={"body": 1.0})

    async def stalling():
        yield b"x" * 1000
        await asyncio.sleep(4)  # the clients send all before they read: they stall too
        yield b"y"

    if proto == "h3":
        async with h3(proxy, certs) as client:
            status = (await client.request("POST", "/sha256", body=stalling())).status
    else:
        async with tcp_client(certs, http2=True) as client:
            r = await client.post(https_url(proxy, "/sha256"), content=stalling())
            status = r.status_code
    # Without the body deadline the upload would finish after 4 s and answer 200.
    assert status == 408
    assert (await fetch(proxy, certs, proto, "GET", "/after"))[0] == 200
