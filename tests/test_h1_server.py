"""The HTTP/1.1 listener's framing through the running proxy, read back by h11 (an
independent parser) or as raw bytes: pipelining, HTTP/1.0, chunked and close-delimited
responses, HEAD, 100-continue."""

from __future__ import annotations

import asyncio

import h11
import pytest

from tests.hostile.raw import exchange


@pytest.fixture
async def edge(make_proxy, backend):
    return await make_proxy(backend, listen={"plain_http": "proxy"})


def responses(data: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse ``data`` as the answers to requests made with ``methods``, in order."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        head = conn.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while isinstance(event := conn.next_event(), h11.Data):
            body += event.data
        assert isinstance(event, h11.EndOfMessage), event
        fields = {k.decode(): v.decode() for k, v in head.headers}
        out.append((head.status_code, fields, body))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return out


async def test_pipelined_requests_are_answered_in_order(edge):
    data = await exchange(
        edge.http_port,
        b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"HEAD /bytes/100 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    (a, b, head, c) = responses(data, ["GET", "GET", "HEAD", "GET"])
    assert (a[0], a[2], b[0], b[2]) == (
        200,
        b"hello from backend /a",
        200,
        b"hello from backend /b",
    )
    assert (head[0], head[1]["content-length"], head[2]) == (200, "100", b"")
    assert (c[0], c[1]["connection"], c[2]) == (200, "close", b"hello from backend /c")


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_streamed_response_is_chunked_for_1_1_and_close_delimited_for_1_0(edge, version):
    host = "Host: localhost\r\n" if version == "1.1" else ""
    request = f"POST /echo HTTP/{version}\r\n{host}Content-Length: 5\r\n"
    if version == "1.1":
        request += "Connection: close\r\n"
    data = await exchange(edge.http_port, request.encode() + b"\r\nhello")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0] == "http/1.1 200 ok"
    assert "connection: close" in lines
    if version == "1.1":
        assert "transfer-encoding: chunked" in lines
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
    else:
        assert not [line for line in lines if line.startswith(("transfer-encoding", "content-len"))]
        assert body == b"hello"


async def test_expect_100_continue_gets_100_before_the_body_is_sent(edge):
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.http_port)
    try:
        writer.write(
            b"PUT /echo HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        final = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200 OK\r\n") and final.endswith(b"3\r\nabc\r\n0\r\n\r\n")
        # The connection is kept: a second request on it is answered.
        writer.write(b"GET /again HTTP/1.1\r\nHost: localhost\r\n\r\n")
        again = await asyncio.wait_for(reader.readuntil(b"hello from backend /again"), 5)
        assert again.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        writer.close()


async def test_http_1_1_without_host_is_400_and_http_1_0_without_host_is_served(edge, backend):
    refused = await exchange(edge.http_port, b"GET /nohost HTTP/1.1\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 400 ")
    served = await exchange(edge.http_port, b"GET /old HTTP/1.0\r\n\r\n")
    assert served.startswith(b"HTTP/1.1 200 ") and served.endswith(b"hello from backend /old")
    assert [r[1] for r in backend.requests] == ["/old"]


async def test_a_peer_speaking_something_else_is_refused_at_its_first_line(edge):
    # No blank line follows: the answer must not wait for the header deadline (10 s).
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.http_port)
    try:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        answer = await asyncio.wait_for(reader.read(), 2)  # to the close
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer
