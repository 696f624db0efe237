"""Upstream failures and limits answer with the right status, and spare other streams."""

from __future__ import annotations

import pytest

from tests.helpers import free_port, h3, https_url, tcp_client

PROTOCOLS = ["h1", "h2", "h3"]


async def two_requests(proxy, certs, proto, first, second=("GET", "/hello", None, None)):
    """Send ``first`` then ``second`` on one connection; [(status, body), ...]."""
    out = []
    if proto == "h3":
        async with h3(proxy, certs) as client:
            for method, path, body, headers in (first, second):
                r = await client.request(method, path, headers or [], body)
                out.append((r.status, r.body))
        return out
    async with tcp_client(certs, http2=proto == "h2") as client:
        for method, path, body, headers in (first, second):
            r = await client.request(method, https_url(proxy, path), content=body, headers=headers)
            out.append((r.status_code, r.content))
    return out


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_unreachable_upstream_gives_502(make_proxy, certs, proto):
    proxy = await make_proxy(None, backend=f"http://127.0.0.1:{free_port()}")
    [(status, body), again] = await two_requests(proxy, certs, proto, ("GET", "/", None, None))
    assert again[0] == 502  # the connection stays usable
    assert status == 502
    assert b"502" in body and len(body) < 200


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_slow_upstream_gives_504_and_connection_survives(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend, upstream={"timeout": 0.5})
    results = await two_requests(proxy, certs, proto, ("GET", "/slow?s=3", None, None))
    assert results[0][0] == 504
    assert results[1] == (200, b"hello from backend /hello")


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_body_over_limit_gives_413_and_never_reaches_backend(
    make_proxy, backend, certs, proto
):
    proxy = await make_proxy(backend, limits={"max_body_bytes": 1000})
    results = await two_requests(proxy, certs, proto, ("POST", "/sha256", b"x" * 5000, None))
    assert results[0][0] == 413
    assert results[1] == (200, b"hello from backend /hello")
    assert not [r for r in backend.requests if r[1] == "/sha256"]


async def test_streamed_body_over_limit_gives_413(make_proxy, backend, certs):
    proxy = await make_proxy(backend, limits={"max_body_bytes": 100_000})

    async def chunks():
        for _ in range(50):
            yield b"y" * 10_000

    async with h3(proxy, certs) as client:
        r = await client.request("POST", "/sha256", [], chunks())
        assert r.status == 413
        again = await client.request("GET", "/hello")
        assert again.status == 200


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_oversized_headers_give_431(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend, limits={"max_header_bytes": 2048})
    big = [("x-big", "a" * 4000)]
    results = await two_requests(proxy, certs, proto, ("GET", "/hello", None, big))
    assert results[0][0] == 431
    if proto != "h1":
        assert results[1] == (200, b"hello from backend /hello")
    assert not [r for r in backend.requests if dict(r[2]).get("x-big")]


async def test_malformed_http1_request_gets_400_and_proxy_keeps_serving(proxy, certs):
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http_port)
    writer.write(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(1000), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400")
    async with tcp_client(certs, http2=True) as client:
        resp = await client.get(https_url(proxy, "/hello"))
    assert resp.status_code == 200


async def test_garbage_on_h2_connection_closes_it_without_hurting_others(proxy, certs):
    import asyncio
    import ssl

    ctx = ssl.create_default_context(cafile=certs[0])
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("localhost", proxy.https_port, ssl=ctx)
    writer.write(b"this is not the HTTP/2 preface at all\r\n\r\n" * 3)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # server closes: read hits EOF
    writer.close()
    assert b"\x00\x00\x08\x07" in data or data == b"" or len(data) > 0
    async with h3(proxy, certs) as client:
        assert (await client.request("GET", "/hello")).status == 200
