"""``https://`` upstreams whose ALPN chooses h2: the multiplexed HTTP/2 client over
verified TLS.

Real backends over loopback, with certificates from the test CA of
tests/test_upstream_tls.py: the ``h2`` library's server (tests/h2backend.py) behind TLS
offering h2 alone, a grpcio server with TLS server credentials (its own process), a
server whose ALPN offer changes between connections, and clients over h1, h2 and h3.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from quicproxy._config import UpstreamConfig
from quicproxy.upstream._h1 import UpstreamPool
from quicproxy.upstream._h2 import H2Pool
from quicproxy.upstream._member import Member, TlsProfile
from tests.backend import Backend, pattern_bytes
from tests.grpc_backend import grpc_backend
from tests.h2backend import H2Backend
from tests.helpers import fetch, https_url, tcp_client
from tests.test_grpc import _items, h3_call, h3_grpc
from tests.test_upstream_h2 import _h2_request
from tests.test_upstream_tls import pki as pki  # the test CA and its certificates

PROTOCOLS = ["h1", "h2", "h3"]


def server_context(pair: tuple[str, str], alpn: list[str], client_ca: str | None = None):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*pair)
    ctx.set_alpn_protocols(alpn)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


@pytest.fixture
async def h2_tls(pki: dict[str, Any]) -> AsyncIterator[Any]:
    """Starts h2-only TLS backends: ``await h2_tls(cert="good", client_ca=None)``."""
    started: list[H2Backend] = []

    async def make(cert: str = "good", client_ca: str | None = None, **kw: Any) -> H2Backend:
        backend = H2Backend(tls=server_context(pki[cert], ["h2"], client_ca), **kw)
        started.append(await backend.start())
        return backend

    yield make
    for backend in started:
        await backend.stop()


def _upstream(pki: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return {"tls": {"ca": pki["ca"], **tls}}


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("quicproxy")]


# --------------------------------------------------------------------------- h2 over TLS


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_an_h2_only_tls_backend_is_reached_over_http2(make_proxy, h2_tls, pki, certs, proto):
    backend = await h2_tls()
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    status, _, body = await fetch(proxy, certs, proto, "GET", "/hello")
    assert (status, body) == (200, b"hello /hello")
    upload = pattern_bytes(300_000)
    status, _, body = await fetch(proxy, certs, proto, "POST", "/echo", body=upload)
    assert status == 200 and body == upload
    assert backend.alpn == ["h2"] and backend.streams_seen == 2  # one connection, HTTP/2
    assert proxy.handler.upstream.alpn[next(iter(proxy.handler.upstream.alpn))] == "h2"
    assert proxy.handler.upstream_h2.connections_opened == 1


async def test_concurrent_first_requests_share_one_tls_connection(make_proxy, h2_tls, pki, certs):
    """No warm-up: 60 requests arrive while the member's protocol is still unknown; one
    connection is opened and learned, all 60 ride it as concurrent streams."""
    backend = await h2_tls()
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    async with tcp_client(certs, http2=True) as client:
        results = await asyncio.gather(
            *(client.get(https_url(proxy, f"/slow/{i}")) for i in range(60))
        )
    assert [r.status_code for r in results] == [200] * 60
    assert [r.content for r in results] == [f"hello /slow/{i}".encode() for i in range(60)]
    assert backend.connections == 1 and backend.alpn == ["h2"]
    assert backend.max_concurrent > 10  # multiplexed, not one after another
    assert proxy.handler.upstream.connections_opened == 1


async def test_a_full_tls_connection_opens_another(make_proxy, h2_tls, pki, certs):
    backend = await h2_tls(max_streams=4)
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    async with tcp_client(certs, http2=True) as client:
        await client.get(https_url(proxy, "/hello"))
        results = await asyncio.gather(
            *(client.get(https_url(proxy, f"/slow/{i}")) for i in range(20))
        )
    assert [r.status_code for r in results] == [200] * 20
    assert backend.max_concurrent <= 4 and 2 <= backend.connections <= 6
    assert set(backend.alpn) == {"h2"}


async def test_goaway_over_tls_fails_no_request(make_proxy, h2_tls, pki, certs):
    backend = await h2_tls()
    backend.goaway_after = 15
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    async with tcp_client(certs, http2=True) as client:
        gets = [client.get(https_url(proxy, f"/slow/{i}")) for i in range(40)]
        results = await asyncio.gather(*gets)
    assert [r.status_code for r in results] == [200] * 40
    assert backend.connections >= 2 and backend.ignored > 0  # refused ones sent again


async def test_trailers_both_ways_over_tls(make_proxy, h2_tls, pki, certs):
    backend = await h2_tls()
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    status, data, trailers = await asyncio.to_thread(
        _h2_request, proxy, certs, "/echo", b"ping", [("x-sum", "42")]
    )
    assert (status, data) == (200, b"ping")
    assert backend.request_trailers == [[("x-sum", "42")]]
    assert ("x-sum", "42") in trailers and ("x-echoed", "1") in trailers


async def test_h2_connections_resume_the_members_session(make_proxy, h2_tls, pki, certs):
    backend = await h2_tls()
    backend.goaway_after = 1  # each connection takes one stream: every request opens one
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    async with tcp_client(certs, http2=True) as client:
        for i in range(4):
            assert (await client.get(https_url(proxy, f"/n/{i}"))).status_code == 200
    assert backend.connections == 4 and backend.alpn == ["h2"] * 4
    assert backend.resumed == 3 and proxy.handler.upstream.tls_resumed == 3


@pytest.mark.parametrize(
    ("cert", "reason"),
    [("wrong_name", "certificate name mismatch"), ("unknown_ca", "unknown CA")],
)
async def test_a_failed_verification_is_a_502_with_its_reason(
    make_proxy, h2_tls, pki, certs, caplog, cert, reason
):
    backend = await h2_tls(cert)
    proxy = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    with caplog.at_level(logging.DEBUG):
        for proto in PROTOCOLS:
            caplog.clear()
            status, _, body = await fetch(proxy, certs, proto, "GET", "/secret")
            assert status == 502 and body == b"502 Bad Gateway\n"
            records = _records(caplog)
            assert [r.levelno for r in records] == [logging.WARNING], records
            assert reason in records[0].getMessage()
            assert not any(r.exc_info for r in caplog.records)
    assert backend.streams_seen == 0 and backend.connections == 0


async def test_an_mtls_h2_backend_needs_the_client_certificate(
    make_proxy, h2_tls, pki, certs, caplog
):
    backend = await h2_tls(client_ca=pki["ca"])
    without = await make_proxy(None, backend=backend.url, upstream=_upstream(pki))
    with caplog.at_level(logging.DEBUG):
        status, _, _ = await fetch(without, certs, "h2", "GET", "/")
    assert status == 502
    records = _records(caplog)
    assert len(records) == 1 and "client certificate" in records[0].getMessage(), records
    assert not any(r.exc_info for r in caplog.records)
    assert backend.streams_seen == 0
    cert, key = pki["client"]
    with_cert = await make_proxy(
        None, backend=backend.url, upstream=_upstream(pki, cert=cert, key=key)
    )
    for proto in PROTOCOLS:
        assert (await fetch(with_cert, certs, proto, "GET", "/"))[0] == 200
    assert backend.streams_seen == 3 and backend.alpn[-1] == "h2"


# --------------------------------------------------------------------------- ALPN choice


class SwitchingBackend:
    """One TLS port whose ALPN offer the test changes: an ``h2`` library server on the
    connections that chose h2, an h11 server on the others."""

    def __init__(self, pair: tuple[str, str]) -> None:
        self.ctx = server_context(pair, ["h2"])
        self.h2 = H2Backend()
        self.h1 = Backend("h1-side")
        self.alpn: list[str | None] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> SwitchingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def offer(self, *alpn: str) -> None:
        self.ctx.set_alpn_protocols(list(alpn))  # new handshakes only
        for writer in list(self.writers):
            writer.close()  # the proxy must connect again, and learn again

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        self.alpn.append(chosen)
        self.writers.add(writer)
        try:
            if chosen == "h2":
                await self.h2._serve(reader, writer)
            else:
                await self.h1._client(reader, writer)
        finally:
            self.writers.discard(writer)

    async def stop(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.close()


async def test_the_alpn_choice_is_learned_again_on_reconnect(make_proxy, pki, certs):
    backend = await SwitchingBackend(pki["good"]).start()
    try:
        proxy = await make_proxy(
            None, backend=f"https://localhost:{backend.port}", upstream=_upstream(pki)
        )
        async with tcp_client(certs, http2=True) as client:

            async def get(path: str) -> bytes:
                resp = await client.get(https_url(proxy, path))
                assert resp.status_code == 200
                return resp.content

            assert await get("/a") == b"hello /a" and await get("/b") == b"hello /b"
            assert backend.alpn == ["h2"] and backend.h2.streams_seen == 2
            backend.offer("http/1.1")
            await asyncio.sleep(0.1)  # the proxy sees its connection closed
            assert b"h1-side" in await get("/c")
            assert b"h1-side" in await get("/d")
            assert backend.alpn == ["h2", "http/1.1"] and len(backend.h1.requests) == 2
            backend.offer("h2", "http/1.1")
            await asyncio.sleep(0.1)
            assert await get("/e") == b"hello /e" and await get("/f") == b"hello /f"
        assert backend.alpn == ["h2", "http/1.1", "h2"] and backend.h2.streams_seen == 4
    finally:
        await backend.stop()


async def test_a_tunnel_dial_offers_http1_alone(pki):
    """WebSocket tunnels are HTTP/1.1 Upgrades: their connection to a member that speaks
    h2 to requests still chooses http/1.1, and does not change what was learned."""
    backend = await SwitchingBackend(pki["good"]).start()
    backend.offer("h2", "http/1.1")
    cfg = UpstreamConfig()
    pool = UpstreamPool(cfg)
    h2pool = H2Pool(pool)
    member = Member("localhost", backend.port, "https", TlsProfile(ca=pki["ca"]))
    try:
        assert await h2pool.speaks_h2(member)
        reader, writer = await pool.dial(member)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
        assert pool.alpn[member] == "h2" and backend.alpn == ["h2", "http/1.1"]
    finally:
        await h2pool.aclose()
        await pool.aclose()
        await backend.stop()


# --------------------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def grpc_tls_port(pki: dict[str, Any]) -> Iterator[int]:
    with grpc_backend(tls=pki["good"]) as proc:
        yield proc.port  # type: ignore[attr-defined]


@pytest.fixture
async def grpc_tls_proxy(make_proxy, grpc_tls_port, pki):
    return await make_proxy(
        None, backend=f"https://localhost:{grpc_tls_port}", upstream=_upstream(pki)
    )


def _grpc_calls(proxy: Any, certs: tuple[str, str]) -> dict[str, Any]:
    root = Path(certs[0]).read_bytes()
    options = [("grpc.ssl_target_name_override", "localhost")]
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    with grpc.secure_channel(f"127.0.0.1:{proxy.https_port}", creds, options=options) as ch:
        reply, call = ch.unary_unary("/test.Echo/Unary").with_call(b"hi", timeout=10)
        stream = list(ch.unary_stream("/test.Echo/ServerStream")(b"100", timeout=10))
        counted = ch.stream_unary("/test.Echo/ClientStream")(iter([b"x" * 10] * 100), timeout=10)
        bidi = ch.stream_stream("/test.Echo/Bidi")(iter([b"a", b"bb", b"ccc"]), timeout=10)
        echoed = list(bidi)
        return {
            "unary": reply,
            "trailers": dict(call.trailing_metadata()),
            "server_stream": stream,
            "client_stream": counted,
            "bidi": echoed,
            "bidi_trailers": dict(bidi.trailing_metadata()),
        }


async def test_grpc_over_an_https_member_from_h2(grpc_tls_proxy, certs):
    got = await asyncio.to_thread(_grpc_calls, grpc_tls_proxy, certs)
    assert got["unary"] == b"echo:hi" and got["trailers"]["x-trailer"] == "unary-done"
    assert got["server_stream"] == [b"%d" % i for i in range(100)]
    assert got["client_stream"] == b"100 1000"
    assert got["bidi"] == [b"a", b"bb", b"ccc"] and got["bidi_trailers"]["x-count"] == "3"
    assert grpc_tls_proxy.handler.upstream_h2.connections_opened == 1  # grpcio chose h2


async def test_grpc_over_an_https_member_from_h3(grpc_tls_proxy, certs):
    async with h3_grpc(grpc_tls_proxy, certs) as proto:
        headers, got, trailers = await h3_call(
            proto, "localhost", "/test.Echo/Unary", _items([b"over-h3"])
        )
        _, streamed, stream_trailers = await h3_call(
            proto, "localhost", "/test.Echo/Bidi", _items([b"1", b"22", b"333"])
        )
    assert headers[":status"] == "200" and got == [b"echo:over-h3"]
    assert trailers["grpc-status"] == "0" and trailers["x-trailer"] == "unary-done"
    assert streamed == [b"1", b"22", b"333"] and stream_trailers["x-count"] == "3"


# --------------------------------------------------------------------------- failures


async def test_concurrent_first_requests_share_one_failed_connect(make_proxy, pki, certs):
    """A member whose TLS handshake never completes: the requests that waited for the
    first connection get its failure (502 together), not one connect timeout after
    another, and the backend sees one connection."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never answers the ClientHello

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(
            None,
            backend=f"https://localhost:{port}",
            upstream={**_upstream(pki), "connect_timeout": 0.5},
        )
        started = asyncio.get_running_loop().time()
        async with tcp_client(certs, http2=True) as client:
            answers = await asyncio.gather(
                *(client.get(https_url(proxy, f"/{i}")) for i in range(10))
            )
        took = asyncio.get_running_loop().time() - started
    finally:
        for writer in accepted:
            writer.close()
        server.close()
    assert [r.status_code for r in answers] == [502] * 10
    assert len(accepted) == 1
    assert took < 3.0  # one after another: 10 x 0.5 s


async def test_a_backend_choosing_h2_but_not_speaking_it_is_a_502(make_proxy, pki, certs, caplog):
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        liar, "127.0.0.1", 0, ssl=server_context(pki["good"], ["h2"])
    )
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(None, backend=f"https://localhost:{port}", upstream=_upstream(pki))
        with caplog.at_level(logging.INFO, logger="quicproxy"):
            status, _, body = await fetch(proxy, certs, "h2", "GET", "/")
            assert (await fetch(proxy, certs, "h1", "GET", "/"))[0] == 502
    finally:
        server.close()
    assert status == 502 and body == b"502 Bad Gateway\n"
    assert "did not answer as HTTP/2" in caplog.text and "certificate" not in caplog.text
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)
