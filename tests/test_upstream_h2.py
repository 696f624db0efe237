"""``h2c://`` upstreams: a real HTTP/2 server (the ``h2`` library, tests/h2backend.py)
behind the proxy. One connection shared by many requests, its MAX_CONCURRENT_STREAMS
respected, flow control end to end, GOAWAY during load, a backend dying mid-body,
trailers both ways, and the config's URL schemes."""

from __future__ import annotations

import asyncio
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest

from quicproxy._config import parse_backend, parse_upstream
from quicproxy._errors import ConfigError
from tests.h2backend import H2Backend
from tests.helpers import h3, https_url, tcp_client


@pytest.fixture
async def h2backend():
    b = await H2Backend().start()
    yield b
    await b.stop()


def test_backend_url_schemes():
    assert parse_upstream("backend", "h2c://10.0.0.1:50051") == ("h2c", "10.0.0.1", 50051)
    assert parse_upstream("backend", "h2c://a") == ("h2c", "a", 80)
    assert parse_upstream("backend", "http://a:8080") == ("http", "a", 8080)
    assert parse_upstream("backend", "a:8080")[0] == "http"
    with pytest.raises(ConfigError, match="h2c://HOST:PORT"):
        parse_upstream("backend", "grpc://a:1")
    with pytest.raises(ConfigError, match="waf.url"):
        parse_backend("waf.url", "h2c://a:1")


@pytest.mark.parametrize("proto", ["h1", "h2", "h3"])
async def test_requests_over_h2c(make_proxy, h2backend, certs, proto):
    proxy = await make_proxy(None, backend=h2backend.url)
    if proto == "h3":
        async with h3(proxy, certs) as client:
            r = await client.request("GET", "/hello")
            assert (r.status, r.body) == (200, b"hello /hello")
        return
    async with tcp_client(certs, http2=proto == "h2") as client:
        r = await client.get(https_url(proxy, "/hello"))
        assert (r.status_code, r.content) == (200, b"hello /hello")
        r = await client.post(https_url(proxy, "/echo"), content=b"a" * 300_000)
        assert r.status_code == 200 and r.content == b"a" * 300_000


async def test_concurrent_requests_share_one_connection(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)
    async with tcp_client(certs, http2=True) as client:
        await client.get(https_url(proxy, "/hello"))  # the connection is up
        results = await asyncio.gather(
            *(client.get(https_url(proxy, f"/slow/{i}")) for i in range(60))
        )
    assert all(r.status_code == 200 for r in results)
    assert h2backend.connections == 1
    assert h2backend.max_concurrent > 10  # multiplexed, not one after another


async def test_max_concurrent_streams_respected(make_proxy, certs):
    backend = await H2Backend(max_streams=4).start()
    try:
        proxy = await make_proxy(None, backend=backend.url)
        async with tcp_client(certs, http2=True) as client:
            await client.get(https_url(proxy, "/hello"))
            results = await asyncio.gather(
                *(client.get(https_url(proxy, f"/slow/{i}")) for i in range(20))
            )
        assert all(r.status_code == 200 for r in results)
        assert backend.max_concurrent <= 4
        assert 2 <= backend.connections <= 6
    finally:
        await backend.stop()


async def test_at_the_connection_cap_requests_wait_for_a_stream(make_proxy, certs):
    backend = await H2Backend(max_streams=4).start()
    try:
        upstream = {"max_connections_per_member": 1}
        proxy = await make_proxy(None, backend=backend.url, upstream=upstream)
        async with tcp_client(certs, http2=True) as client:
            results = await asyncio.gather(
                *(client.get(https_url(proxy, f"/slow/{i}")) for i in range(12))
            )
        assert [r.status_code for r in results] == [200] * 12
        assert backend.connections == 1 and backend.max_concurrent <= 4
    finally:
        await backend.stop()


async def test_slow_client_holds_back_the_backend(make_proxy, h2backend, certs):
    """Credit goes back to the backend only as the client reads: a client that grants
    no window beyond h2's default 64 KiB holds the backend to about the proxy's
    stream window (256 KiB) on top, not the 16 MiB it wants to send."""
    proxy = await make_proxy(None, backend=h2backend.url)
    size = 16 << 20
    client = await asyncio.to_thread(_H2Client, proxy, certs)
    try:
        await asyncio.to_thread(client.start, f"/big?{size}")
        await asyncio.sleep(1.5)
        held = h2backend.sent
        got = await asyncio.to_thread(client.drain)
    finally:
        client.sock.close()
    assert got == size
    assert held < 1 << 20, held


class _H2Client:
    """An h2-library client over TLS whose window grows only as it reads."""

    def __init__(self, proxy, certs) -> None:
        ctx = ssl.create_default_context(cafile=certs[0])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="latin-1"))
        self.conn.initiate_connection()

    def start(self, path: str) -> None:
        head = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
                (":path", path)]  # fmt: skip
        self.conn.send_headers(1, head, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.got = 0
        while not self._read_once(acknowledge=False, until=h2.events.ResponseReceived):
            pass

    def _read_once(self, acknowledge: bool, until: type) -> bool:
        done = False
        for ev in self.conn.receive_data(self.sock.recv(65536)):
            if isinstance(ev, h2.events.DataReceived):
                self.got += len(ev.data)
                if acknowledge:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            done |= isinstance(ev, until)
        self.sock.sendall(self.conn.data_to_send())
        return done

    def drain(self) -> int:
        self.conn.acknowledge_received_data(self.got, 1)  # what came while not reading
        while not self._read_once(acknowledge=True, until=h2.events.StreamEnded):
            pass
        return self.got


async def test_goaway_during_load_fails_no_request(make_proxy, h2backend, certs):
    h2backend.goaway_after = 15
    proxy = await make_proxy(None, backend=h2backend.url)
    async with tcp_client(certs, http2=True) as client:
        gets = [client.get(https_url(proxy, f"/slow/{i}")) for i in range(40)]
        posts = [
            client.post(https_url(proxy, f"/echo/{i}"), content=b"%d" % i * 1000) for i in range(20)
        ]
        results = await asyncio.gather(*gets, *posts)
    assert [r.status_code for r in results] == [200] * 60
    assert [r.content for r in results[40:]] == [b"%d" % i * 1000 for i in range(20)]
    assert h2backend.connections >= 2
    print(f"GOAWAY under load: {h2backend.ignored} refused streams sent again")
    assert h2backend.ignored > 0  # some were above the last stream id, and sent again


async def test_backend_dying_mid_body_resets_the_client_stream(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)
    async with tcp_client(certs, http2=True) as client:
        with pytest.raises(Exception) as failure:
            r = await client.get(https_url(proxy, "/die"))
            r.raise_for_status()
        assert "reset" in repr(failure.value).lower() or "Stream" in repr(failure.value)
        r = await client.get(https_url(proxy, "/hello"))  # a fresh connection serves
        assert r.status_code == 200


async def test_unreachable_h2c_backend_is_502(make_proxy, certs):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proxy = await make_proxy(None, backend=f"h2c://127.0.0.1:{port}")
    async with tcp_client(certs, http2=True) as client:
        r = await client.get(https_url(proxy, "/hello"))
    assert r.status_code == 502 and b"127.0.0.1" not in r.content


def _h2_request(proxy, certs, path, body, trailers):
    """One request over TLS with the h2 library (httpx cannot send trailers); returns
    (status, body, response trailers)."""
    ctx = ssl.create_default_context(cafile=certs[0])
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="latin-1"))
    conn.initiate_connection()
    head = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
            (":path", path), ("te", "trailers")]  # fmt: skip
    conn.send_headers(1, head)
    conn.send_data(1, body)
    conn.send_headers(1, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, data, got = 0, b"", []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, h2.events.TrailersReceived):
                    got = list(ev.headers)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, data, got
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, data, got


async def test_trailers_both_ways_over_h2(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)
    status, data, trailers = await asyncio.to_thread(
        _h2_request, proxy, certs, "/echo", b"ping", [("x-sum", "42")]
    )
    assert (status, data) == (200, b"ping")
    assert h2backend.request_trailers == [[("x-sum", "42")]]
    assert ("x-sum", "42") in trailers and ("x-echoed", "1") in trailers


async def test_trailers_to_h1_client_that_asks(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)

    def get(te: bool) -> bytes:
        ctx = ssl.create_default_context(cafile=certs[0])
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            extra = b"TE: trailers\r\n" if te else b""
            sock.sendall(b"GET /trailers HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n")
            out = b""
            while not out.endswith(b"\r\n\r\n") or b"0\r\n" not in out:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out

    asked = await asyncio.to_thread(get, True)
    assert b"transfer-encoding: chunked" in asked.lower()
    assert asked.endswith(b"4\r\nbody\r\n0\r\nx-checksum: abc\r\n\r\n")
    plain = await asyncio.to_thread(get, False)
    assert plain.endswith(b"4\r\nbody\r\n0\r\n\r\n")


async def test_trailers_to_h3_client(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)
    async with h3(proxy, certs) as client:
        r = await client.request("GET", "/trailers")
    assert (r.status, r.body) == (200, b"body")  # the trailing HEADERS ended it cleanly
    assert not r.reset and r.trailers == [("x-checksum", "abc")]


async def test_h1_client_request_trailers_reach_an_h2_backend(make_proxy, h2backend, certs):
    proxy = await make_proxy(None, backend=h2backend.url)

    def post() -> bytes:
        ctx = ssl.create_default_context(cafile=certs[0])
        raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTE: trailers\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Sum: 7\r\n\r\n"
            )
            out = b""
            while not out.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in out:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out

    out = await asyncio.to_thread(post)
    assert h2backend.request_trailers == [[("x-sum", "7")]]
    assert b"hello" in out and out.endswith(b"0\r\nx-echoed: 1\r\nx-sum: 7\r\n\r\n")
