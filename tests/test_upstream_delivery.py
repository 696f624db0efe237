"""A request is delivered at most once unless it is safe to repeat (issue 25, item 5).

The backend is a real socket server that reads each request whole, then answers it or
resets the connection (SO_LINGER 0) without a byte of response: the proxy cannot tell
whether the request was acted on, so only a bodiless GET/HEAD/OPTIONS/TRACE on a reused
keep-alive connection may go again.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from typing import Any

import h11
import httpx
import pytest

from quicproxy._config import UpstreamConfig
from quicproxy._errors import UpstreamConnectError
from quicproxy._model import Body
from quicproxy.upstream._h1 import UpstreamPool
from quicproxy.upstream._member import Member


class ResettingBackend:
    """Answers 200 (keep-alive) except the ``reset_nth`` request of each connection, which
    it reads to its end and answers with a TCP reset. ``deliveries`` counts requests read
    whole, by (method, target)."""

    def __init__(self, reset_nth: int) -> None:
        self.reset_nth = reset_nth
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ResettingBackend:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            while True:
                request, _body = await self._read(conn, reader)
                if request is None:
                    break
                served += 1
                key = (request.method.decode(), request.target.decode())
                self.deliveries[key] += 1
                if served == self.reset_nth:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST, not FIN
                    return
                data = b"ok"
                out = conn.send(
                    h11.Response(status_code=200, headers=[("content-length", str(len(data)))])
                )
                if request.method != b"HEAD":
                    out += conn.send(h11.Data(data=data))
                out += conn.send(h11.EndOfMessage())
                writer.write(out)
                await writer.drain()
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            pass
        writer.close()

    @staticmethod
    async def _read(
        conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None, b""
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body


@pytest.fixture
async def backend_reset_2nd() -> Any:
    b = await ResettingBackend(reset_nth=2).start()
    yield b
    await b.stop()


@pytest.fixture
async def backend_reset_1st() -> Any:
    b = await ResettingBackend(reset_nth=1).start()
    yield b
    await b.stop()


def _client(proxy: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.http_port}", timeout=10.0)


BODIES = [pytest.param(b"", id="no-body"), pytest.param(b"hello", id="body")]
UNSAFE = ["POST", "PATCH", "PUT", "DELETE"]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("method", UNSAFE)
async def test_a_request_reset_on_a_reused_connection_is_delivered_once(
    make_proxy: Any, backend_reset_2nd: ResettingBackend, method: str, body: bytes
) -> None:
    """The stale keep-alive case: the pooled connection is reset after the backend read
    the request. It was delivered: the client gets 502, the backend saw it once."""
    backend = backend_reset_2nd
    proxy = await make_proxy(backend, listen={"plain_http": "proxy"})
    async with _client(proxy) as client:
        warm = await client.get("/warm")
        assert warm.status_code == 200 and warm.text == "ok"
        resp = await client.request(method, "/act", content=body)
    assert resp.status_code == 502
    assert "127.0.0.1" not in resp.text
    assert backend.deliveries[(method, "/act")] == 1
    assert backend.connections == 1  # no second connection was opened to send it again


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("method", ["GET", *UNSAFE])
async def test_a_request_reset_on_a_fresh_connection_is_delivered_once(
    make_proxy: Any, backend_reset_1st: ResettingBackend, method: str, body: bytes
) -> None:
    """A new connection that fails under a request is no stale keep-alive: whatever the
    method, nothing is sent again."""
    backend = backend_reset_1st
    proxy = await make_proxy(backend, listen={"plain_http": "proxy"})
    async with _client(proxy) as client:
        resp = await client.request(method, "/act", content=body)
    assert resp.status_code == 502
    assert backend.deliveries[(method, "/act")] == 1
    assert backend.connections == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_a_safe_request_on_a_stale_pooled_connection_is_retried_once(
    make_proxy: Any, backend_reset_2nd: ResettingBackend, method: str
) -> None:
    backend = backend_reset_2nd
    proxy = await make_proxy(backend, listen={"plain_http": "proxy"})
    async with _client(proxy) as client:
        assert (await client.get("/warm")).status_code == 200
        resp = await client.request(method, "/page")
    assert resp.status_code == 200
    assert backend.deliveries[(method, "/page")] == 2  # the reset one, then the retry
    assert backend.connections == 2


async def test_a_get_with_a_body_is_not_retried(
    make_proxy: Any, backend_reset_2nd: ResettingBackend
) -> None:
    """Nothing of a streamed body is sent twice, whatever the method."""
    backend = backend_reset_2nd
    proxy = await make_proxy(backend, listen={"plain_http": "proxy"})
    async with _client(proxy) as client:
        assert (await client.get("/warm")).status_code == 200
        resp = await client.request("GET", "/page", content=b"a body")
    assert resp.status_code == 502
    assert backend.deliveries[("GET", "/page")] == 1


async def test_an_idle_connection_the_upstream_closed_is_never_written_to() -> None:
    """The pool's own check: a pooled connection whose peer closed (the FIN waiting in the
    kernel, not yet seen by the event loop) is dropped before a byte is written, and the
    request goes on a new connection, whatever its method: it is sent once."""
    delivered: list[bytes] = []
    closers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = [
            v
            for k, _, v in (f.partition(b":") for f in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        ]
        body = await reader.readexactly(int(lengths[0]) if lengths else 0)
        delivered.append(head.split(b" ")[0] + b" " + body)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        closers.append(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    member = Member("127.0.0.1", server.sockets[0].getsockname()[1])
    pool = UpstreamPool(UpstreamConfig(timeout=5.0))
    try:
        resp = await pool.request(member, "GET", "/", [("host", "x")], Body.empty(), None)
        assert b"".join([c async for c in resp.body]) == b"ok"
        for writer in closers:  # the upstream closes its idle keep-alive connection
            writer.close()
        # One loop turn: the socket is closed (its FIN is in our kernel), but the event
        # loop has not polled our end since, so the transport does not know yet.
        await asyncio.sleep(0)
        (idle,) = pool._idle[member]
        assert idle.usable  # what the event loop knows
        assert not idle.idle_intact()  # what the kernel knows
        resp = await pool.request(member, "POST", "/", [("host", "x")], Body.of(b"x"), 1)
        assert resp.status == 200 and b"".join([c async for c in resp.body]) == b"ok"
        assert delivered == [b"GET ", b"POST x"]
        assert pool.connections_opened == 2
    finally:
        await pool.aclose()
        server.close()


async def test_the_error_says_whether_a_retry_is_safe() -> None:
    """The decision is on the error's type (retry_safe), not its message."""
    backend = await ResettingBackend(reset_nth=1).start()
    pool = UpstreamPool(UpstreamConfig(timeout=5.0))
    member = Member("127.0.0.1", backend.port)
    try:
        for method, body, safe in [("GET", b"", True), ("POST", b"", False), ("GET", b"x", False)]:
            with pytest.raises(UpstreamConnectError) as err:
                await pool.request(member, method, "/", [("host", "x")], Body.of(body), len(body))
            assert err.value.retry_safe is safe and err.value.status == 502
    finally:
        await pool.aclose()
        await backend.stop()


async def test_the_retry_takes_a_new_connection_not_another_idle_one(
    backend_reset_2nd: ResettingBackend,
) -> None:
    """Two idle connections, both about to fail their next request: the retry of a GET
    goes on a new connection, so it is not lost to the second stale one."""
    backend = backend_reset_2nd
    pool = UpstreamPool(UpstreamConfig(timeout=5.0))
    member = Member("127.0.0.1", backend.port)
    try:
        first = await pool.request(member, "GET", "/w1", [("host", "x")], Body.empty(), None)
        second = await pool.request(member, "GET", "/w2", [("host", "x")], Body.empty(), None)
        for resp in (first, second):  # read to the end: both connections go idle
            assert b"".join([c async for c in resp.body]) == b"ok"
        assert len(pool._idle[member]) == 2
        resp = await pool.request(member, "GET", "/page", [("host", "x")], Body.empty(), None)
        assert resp.status == 200 and b"".join([c async for c in resp.body]) == b"ok"
        assert backend.deliveries[("GET", "/page")] == 2
        assert backend.connections == 3
    finally:
        await pool.aclose()
