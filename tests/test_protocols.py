"""Every protocol (h1, h2 over TLS; h3 over QUIC; plain HTTP) through the real proxy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import httpx
import pytest

from tests.backend import pattern_bytes
from tests.helpers import fetch, h3, http_url, https_url

PROTOCOLS = ["h1", "h2", "h3"]
MB20 = 20 * 1024 * 1024


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_health_endpoint_answers_ok_on_each_protocol(proxy, certs, proto):
    status, headers, body = await fetch(proxy, certs, proto, "GET", "/_gwhealthz")
    assert (status, body) == (200, b"OK")
    assert headers["content-type"].startswith("text/plain")


async def test_health_endpoint_answers_ok_on_plain_http(proxy):
    async with httpx.AsyncClient() as client:
        resp = await client.get(http_url(proxy, "/_gwhealthz"))
    assert (resp.status_code, resp.text) == (200, "OK")
    assert resp.headers["content-type"].startswith("text/plain")


async def test_plain_http_redirects_to_https_keeping_path_and_query(proxy):
    async with httpx.AsyncClient() as client:
        resp = await client.get(http_url(proxy, "/some/path?q=1&r=2"))
    assert resp.status_code == 308
    assert resp.headers["location"] == f"https://127.0.0.1:{proxy.https_port}/some/path?q=1&r=2"


async def test_redirect_omits_port_443(make_proxy, backend):
    proxy = await make_proxy(backend, listen={"alt_svc_port": 443})
    async with httpx.AsyncClient() as client:
        resp = await client.get(http_url(proxy, "/x?y=1"), headers={"host": "example.com"})
    assert resp.headers["location"] == "https://example.com/x?y=1"


async def test_plain_http_can_proxy_instead_of_redirecting(make_proxy, backend):
    proxy = await make_proxy(backend, listen={"plain_http": "proxy"})
    async with httpx.AsyncClient() as client:
        resp = await client.get(http_url(proxy, "/hello"))
    assert resp.status_code == 200
    assert resp.text == "hello from backend /hello"
    assert dict(backend.requests[-1][2])["x-forwarded-proto"] == "http"


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_every_response_advertises_h3_with_alt_svc(proxy, certs, proto):
    status, headers, body = await fetch(proxy, certs, proto, "GET", "/hello")
    assert status == 200 and body == b"hello from backend /hello"
    assert headers["alt-svc"] == f'h3=":{proxy.https_port}"; ma=86400'


async def test_alt_svc_port_is_configurable(make_proxy, backend, certs):
    proxy = await make_proxy(backend, listen={"alt_svc_port": 443})
    _, headers, _ = await fetch(proxy, certs, "h2", "GET", "/")
    assert headers["alt-svc"] == 'h3=":443"; ma=86400'


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_20mb_download_arrives_intact(proxy, certs, proto):
    status, _, body = await fetch(proxy, certs, proto, "GET", f"/bytes/{MB20}")
    assert status == 200
    assert len(body) == MB20
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern_bytes(MB20)).digest()


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_20mb_upload_arrives_intact(proxy, certs, proto):
    data = os.urandom(MB20)
    status, _, body = await fetch(
        proxy, certs, proto, "POST", "/sha256", data, [("content-type", "application/octet-stream")]
    )
    assert status == 200
    assert json.loads(body) == {"sha256": hashlib.sha256(data).hexdigest(), "size": MB20}


async def test_h3_upload_without_content_length_is_streamed(proxy, certs):
    data = os.urandom(3 * 1024 * 1024)

    async def chunks():
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async with h3(proxy, certs) as client:
        resp = await client.request("POST", "/sha256", [], chunks())
    assert resp.status == 200
    assert json.loads(resp.body)["sha256"] == hashlib.sha256(data).hexdigest()


async def test_100_concurrent_h3_streams_on_one_connection(proxy, certs, backend):
    async with h3(proxy, certs) as client:
        results = await asyncio.gather(
            *(client.request("GET", f"/bytes/{1000 + i}") for i in range(100))
        )
    assert [r.status for r in results] == [200] * 100
    assert [r.size for r in results] == [1000 + i for i in range(100)]
    assert len([r for r in backend.requests if r[1].startswith("/bytes/")]) == 100


async def test_niquests_upgrades_from_tcp_to_h3_via_alt_svc(proxy, certs):
    niquests = pytest.importorskip("niquests")
    async with niquests.AsyncSession() as session:
        first = await session.get(https_url(proxy, "/hello"), verify=certs[0])
        versions = [first.http_version]
        for _ in range(3):
            resp = await session.get(https_url(proxy, "/hello"), verify=certs[0])
            versions.append(resp.http_version)
            assert resp.status_code == 200
    assert first.headers["alt-svc"].startswith('h3=":')
    assert versions[0] in (11, 20)
    assert versions[-1] == 30


async def test_niquests_h3_only(proxy, certs):
    niquests = pytest.importorskip("niquests")
    async with niquests.AsyncSession(disable_http1=True, disable_http2=True) as session:
        resp = await session.get(https_url(proxy, "/hello"), verify=certs[0])
    assert resp.status_code == 200
    assert resp.http_version == 30
    assert resp.text == "hello from backend /hello"


async def test_h3_upload_to_a_stalled_backend_stays_within_the_stream_window(proxy, certs):
    """Flow control, not buffering: while the backend reads nothing, the proxy holds
    at most about one stream window of the upload."""
    data = os.urandom(16 * 1024 * 1024)
    window = proxy.config.quic.stream_window
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            for conn in proxy._quic.connections:
                for body in conn.streams.bodies.values():
                    peak = max(peak, body.buffered)
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        async with h3(proxy, certs) as client:
            resp = await client.request("POST", "/stall?s=4", [], data)
    finally:
        watcher.cancel()
    assert resp.status == 200
    assert json.loads(resp.body)["sha256"] == hashlib.sha256(data).hexdigest()
    assert 0 < peak <= window + 256 * 1024


async def test_quic_transport_settings_are_applied(make_proxy, backend, certs):
    proxy = await make_proxy(
        backend, quic={"congestion_control": "cubic", "max_datagram_size": 1200}
    )
    status, _, body = await fetch(proxy, certs, "h3", "GET", f"/bytes/{1 << 20}")
    assert status == 200 and len(body) == 1 << 20
    assert proxy._quic.configuration.max_datagram_size == 1200


@pytest.mark.parametrize("probe, largest", [(1452, 1452), (0, 1350)])
async def test_h3_datagrams_grow_to_the_probed_size_once_the_client_acknowledges_it(
    make_proxy, backend, certs, probe, largest
):
    """A real client on loopback acknowledges the 1452-byte probe, and the download
    rides in datagrams of that size; with probing off, nothing exceeds the configured
    size. (The client's receive path is only observed: each datagram's size is noted.)"""
    proxy = await make_proxy(backend, quic={"probe_datagram_size": probe})
    sizes: list[int] = []
    async with h3(proxy, certs) as client:
        received = client.proto.datagram_received

        def noted(data: bytes, addr: object) -> None:
            sizes.append(len(data))
            received(data, addr)

        client.proto.datagram_received = noted
        r = await client.request("GET", f"/bytes/{1 << 20}")
    assert r.status == 200 and len(r.body) == 1 << 20
    assert max(sizes) == largest
    assert sizes.count(largest) > 500  # the data itself, not just the probe
