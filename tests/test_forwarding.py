"""Headers sent upstream, routing rules and the upstream keep-alive pool."""

from __future__ import annotations

import asyncio
import json

import pytest

from quicproxy import Route
from tests.backend import Backend
from tests.helpers import fetch, h3

PROTOCOLS = ["h1", "h2", "h3"]


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_forwarded_headers_set_and_client_supplied_ones_dropped(proxy, certs, proto):
    spoof = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "gopher"),
    ]
    status, _, body = await fetch(proxy, certs, proto, "GET", "/headers", headers=spoof)
    assert status == 200
    seen = dict(json.loads(body))
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"localhost:{proxy.https_port}"
    assert seen["host"] == f"localhost:{proxy.https_port}"


async def test_forwarded_headers_kept_from_trusted_proxy(make_proxy, backend, certs):
    proxy = await make_proxy(backend, trusted_proxies=["127.0.0.0/8"])
    spoof = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-real-ip", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
    ]
    _, _, body = await fetch(proxy, certs, "h2", "GET", "/headers", headers=spoof)
    seen = dict(json.loads(body))
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-real-ip"] == "203.0.113.7"
    assert seen["x-forwarded-host"] == "shop.example"


async def test_hop_by_hop_headers_are_not_forwarded(proxy, certs):
    hop = [
        ("connection", "keep-alive, x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "5"),
        ("proxy-authorization", "Basic eA=="),
        ("x-normal", "yes"),
    ]
    _, headers, body = await fetch(proxy, certs, "h1", "GET", "/headers", headers=hop)
    seen = dict(json.loads(body))
    assert "x-secret" not in seen and "proxy-authorization" not in seen
    assert "keep-alive" not in seen
    assert seen["x-normal"] == "yes"
    assert "keep-alive" not in headers  # the backend's keep-alive header is not passed on


async def test_routes_by_host_and_longest_path_prefix(make_proxy, backend, certs):
    api = await Backend("api").start()
    shop = await Backend("shop").start()
    try:
        proxy = await make_proxy(
            backend,
            routes=[
                {"path_prefix": "/api", "backends": [api.url]},
                {"host": "shop.example", "path_prefix": "/", "backends": [shop.url]},
            ],
        )
        _, _, body = await fetch(proxy, certs, "h2", "GET", "/api/users")
        assert body == b"hello from api /api/users"
        _, _, body = await fetch(proxy, certs, "h2", "GET", "/apix")
        assert body == b"hello from backend /apix"
        _, _, body = await fetch(
            proxy, certs, "h3", "GET", "/cart", headers=[("host", "shop.example")]
        )
        assert body in (b"hello from shop /cart", b"hello from backend /cart")
        _, _, body = await fetch(
            proxy, certs, "h1", "GET", "/cart", headers=[("host", "shop.example")]
        )
        assert body == b"hello from shop /cart"
    finally:
        await api.stop()
        await shop.stop()


async def test_round_robin_over_pool_members_and_routes_added_at_run_time(proxy, certs):
    one = await Backend("one").start()
    two = await Backend("two").start()
    try:
        route = Route(backends=[one.url, two.url], path_prefix="/rr", balance="round_robin")
        proxy.add_route(route)
        seen = []
        for _ in range(4):
            _, _, body = await fetch(proxy, certs, "h2", "GET", "/rr")
            seen.append(body.split()[2])
        assert seen == [b"one", b"two", b"one", b"two"]
    finally:
        await one.stop()
        await two.stop()


async def test_upstream_connections_are_kept_alive_and_reused(proxy, certs, backend):
    async with h3(proxy, certs) as client:
        for _ in range(30):
            assert (await client.request("GET", "/hello")).status == 200
        results = await asyncio.gather(*(client.request("GET", "/hello") for _ in range(20)))
    assert all(r.status == 200 for r in results)
    assert backend.connections <= 21
    assert proxy.handler.upstream.connections_opened == backend.connections


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_utf8_header_values_pass_byte_for_byte(proxy, certs, proto):
    """Bytes over 0x7F in a header value (obs-text, RFC 9110 §5.5: UTF-8 text in the wild)
    are passed on opaque, byte for byte; control bytes still get 400."""
    from tests.helpers import https_url, tcp_client

    note = "Café – 東京"
    if proto == "h3":
        async with h3(proxy, certs) as client:
            r = await client.request("GET", "/headers", [("x-note", note)])
            status, body = r.status, r.body
            bad = await client.request("GET", "/headers", [("x-note", "a\x01b")])
            assert bad.status == 400
    else:
        async with tcp_client(certs, http2=proto == "h2") as client:
            resp = await client.get(
                https_url(proxy, "/headers"), headers={"x-note": note.encode("utf-8")}
            )
            status, body = resp.status_code, resp.content
    assert status == 200
    assert dict(json.loads(body))["x-note"] == note
