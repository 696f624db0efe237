"""The upstream pool against a real HTTP/1.1 backend over loopback."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from quicproxy._config import UpstreamConfig
from quicproxy._errors import BadRequest
from quicproxy._model import Body
from quicproxy.upstream._h1 import UpstreamPool
from quicproxy.upstream._member import Member

HEADERS = [("host", "localhost")]


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _all(body: Body) -> bytes:
    return b"".join([chunk async for chunk in body])


@pytest.fixture
async def pool():
    p = UpstreamPool(UpstreamConfig(timeout=5.0))
    yield p
    await p.aclose()


async def test_keep_alive_carries_the_next_request(pool, backend):
    member = Member("127.0.0.1", backend.port)
    for _ in range(3):
        resp = await pool.request(member, "GET", "/hello", HEADERS, Body.empty(), None)
        assert resp.status == 200 and await _all(resp.body)
    assert backend.connections == 1 and pool.connections_opened == 1


async def test_a_body_of_unknown_length_goes_chunked_and_whole(pool, backend):
    member = Member("127.0.0.1", backend.port)
    body = Body.from_iter(_stream(b"abc", b"defgh" * 1000))
    resp = await pool.request(member, "POST", "/echo", HEADERS, body, None)
    assert resp.status == 200
    assert await _all(resp.body) == b"abc" + b"defgh" * 1000


@pytest.mark.parametrize("declared", [5, 20])
async def test_a_body_against_its_content_length_is_the_clients_400(pool, backend, declared):
    """Defence in depth: every listener's parser already holds bodies to their declared
    length; the upstream writer checks again instead of forwarding a mismatch."""
    member = Member("127.0.0.1", backend.port)
    body = Body.from_iter(_stream(b"01234", b"56789"))
    with pytest.raises(BadRequest):
        await pool.request(member, "POST", "/echo", HEADERS, body, declared)
    assert not any(r[1] == "/echo" for r in backend.requests if len(r) > 3)


async def test_chunked_response_trailers_are_kept(pool):
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nbody\r\n0\r\nX-Sum: 42\r\nX-Other: b\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        member = Member("127.0.0.1", server.sockets[0].getsockname()[1])
        resp = await pool.request(member, "GET", "/", HEADERS, Body.empty(), None)
        assert resp.body.trailers is None  # not before the body was read
        assert await _all(resp.body) == b"body"
        assert resp.body.trailers == [("x-sum", "42"), ("x-other", "b")]
    finally:
        server.close()


async def test_requests_waiting_at_the_cap_take_a_connection_gone_idle(backend):
    """At ``max_connections_per_member``, a waiting request is woken when a connection
    goes back idle and takes it: no 503 while keep-alive connections sit free, no new
    connection either."""
    pool = UpstreamPool(UpstreamConfig(max_connections_per_member=2, queue_timeout=5.0))
    member = Member("127.0.0.1", backend.port)

    async def get(i: int) -> tuple[int, bytes]:
        resp = await pool.request(member, "GET", f"/slow?s=0.2&i={i}", HEADERS, Body.empty(), None)
        return resp.status, await _all(resp.body)

    try:
        started = asyncio.get_running_loop().time()
        answers = await asyncio.gather(*(get(i) for i in range(8)))
        took = asyncio.get_running_loop().time() - started
    finally:
        await pool.aclose()
    assert [status for status, _ in answers] == [200] * 8
    assert backend.connections == 2 and backend.open_max <= 2
    assert took < 4.0  # 4 rounds of 0.2 s; the queue timeout (5 s) never ran out


async def test_a_whole_small_body_arrives_intact(pool, backend):
    """A body whose every byte is here leaves with the head in one write."""
    member = Member("127.0.0.1", backend.port)
    data = bytes(range(256)) * 200
    resp = await pool.request(member, "POST", "/sha256", HEADERS, Body.of(data), len(data))
    assert resp.status == 200
    assert hashlib.sha256(data).hexdigest() in (await _all(resp.body)).decode()
