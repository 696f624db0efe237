"""The upstream's HTTP/1.1 codec on real bytes through a real asyncio.StreamReader."""

from __future__ import annotations

import asyncio

import pytest

from quicproxy import _h1wire as wire


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 18)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def _response(data: bytes, method: str = "GET") -> tuple[wire.ResponseHead, bytes]:
    reader = _reader(data)
    head = await wire.read_head(reader, method)
    body = b"".join([chunk async for chunk in wire.read_body(reader, head, 5.0)])
    return head, body


def test_request_head_is_written_as_given():
    head = wire.request_head("POST", "/a?b=1", [("host", "x"), ("content-length", "3")])
    assert head == b"POST /a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n"


async def test_content_length_body_and_keep_alive():
    head, body = await _response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  spaced \t\r\n\r\nhelloEXTRA"
    )
    assert (head.status, head.framing, head.length, head.keep_alive) == (200, "length", 5, True)
    assert head.headers == [("content-length", "5"), ("x-a", "spaced")]
    assert body == b"hello"


async def test_chunked_body_with_extensions_and_trailers():
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n000A\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    head, body = await _response(raw)
    assert (head.framing, head.keep_alive) == ("chunked", True)
    assert body == b"hello0123456789"


async def test_bare_lf_line_ends_are_accepted_in_the_head_only():
    head, body = await _response(
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-A: b\r\n\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert (head.status, head.framing, body) == (200, "chunked", b"hello")
    assert head.headers == [("transfer-encoding", "chunked"), ("x-a", "b")]
    with pytest.raises(wire.Invalid):
        await _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n")


async def test_close_delimited_body_is_read_to_the_end_and_not_reused():
    head, body = await _response(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert (head.framing, head.keep_alive, body) == ("close", False, b"all of it")


@pytest.mark.parametrize(
    ("raw", "method"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", "GET"),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
    ],
)
async def test_responses_without_a_body(raw, method):
    head, body = await _response(raw, method)
    assert (head.framing, body, head.keep_alive) == ("none", b"", True)


async def test_interim_responses_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    head, body = await _response(raw + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert (head.status, body) == (201, b"ok")


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0, 0\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", True),
    ],
)
async def test_keep_alive_follows_version_and_connection(raw, keep_alive):
    head, _ = await _response(raw)
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * wire.HEAD_LIMIT + b"\r\n\r\n",
        # framing fields are judged even where no body follows
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: :chunked\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nContent-Length: \xb2\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    ],
)
async def test_untrustworthy_heads_are_invalid(raw):
    with pytest.raises(wire.Invalid):
        await wire.read_head(_reader(raw), "GET")


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"1234567890abcdef0\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5;" + b"e" * wire.LINE_LIMIT + b"\r\nhello\r\n0\r\n\r\n",
        b"0\r\n" + b"T: t\r\n" * (wire.TRAILER_LIMIT + 1) + b"\r\n",
        # Shapes a differential run against h11 found us too lenient on (smuggling food):
        b" 5\r\nhello\r\n0\r\n\r\n",  # whitespace before a chunk size
        b"\t5\r\nhello\r\n0\r\n\r\n",
        b"6\r\nhello\r\n0\r\n\r\n",  # data eats the CR, a bare LF would end it
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after a size
        b"5\r\nhello\r\n0\r\n/1.1\r\n\r\n",  # a trailer that is not a field
        b"5\r\nhello\r\n0\r\nT: t\n\r\n",  # bare LF after a trailer
    ],
)
async def test_bad_chunked_bodies_are_invalid(chunks):
    with pytest.raises(wire.Invalid):
        await _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
async def test_bodies_cut_short_raise_incomplete_read(raw):
    with pytest.raises(asyncio.IncompleteReadError):
        await _response(raw)


async def test_a_stalled_body_times_out():
    reader = _reader(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=False)
    head = await wire.read_head(reader, "GET")
    got = []
    with pytest.raises(TimeoutError):
        async for chunk in wire.read_body(reader, head, 0.05):
            got.append(chunk)
    assert got == [b"abc"]


# The server side: request heads and bodies.


async def _request(data: bytes, limit: int = 65536) -> tuple[wire.RequestHead, bytes]:
    reader = _reader(data[1:])
    head = await wire.read_request(reader, limit, data[:1])
    body = b"".join([chunk async for chunk in wire.read_body(reader, head, 5.0)])
    return head, body


async def test_request_with_a_length_body_leaves_the_next_request_unread():
    reader = _reader(b"OST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /next")
    head = await wire.read_request(reader, 65536, b"P")
    assert (head.method, head.target, head.version) == ("POST", "/a?b=1", "1.1")
    assert head.headers == [("host", "x"), ("content-length", "3")]
    assert (head.framing, head.length, head.keep_alive, head.expect_continue) == (
        "length",
        3,
        True,
        False,
    )
    assert b"".join([c async for c in wire.read_body(reader, head, 5.0)]) == b"abc"
    assert await reader.read() == b"GET /next"


async def test_chunked_request_body_and_expect_continue():
    head, body = await _request(
        b"PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n3;name=v\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n"
    )
    assert (head.framing, head.length, head.expect_continue, body) == (
        "chunked",
        None,
        True,
        b"abcde",
    )


async def test_empty_lines_before_a_request_and_bare_lf_are_accepted():
    head, body = await _request(b"\r\n\nGET / HTTP/1.1\nHost: x\n\n")
    assert (head.method, head.headers, head.framing, body) == ("GET", [("host", "x")], "none", b"")


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    ],
)
async def test_request_keep_alive_follows_version_and_connection(raw, keep_alive):
    assert (await _request(raw))[0].keep_alive is keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xa0chunked\r\n\r\n", 501),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 400),  # refused at its first line, no blank line needed
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", 431),
    ],
)
async def test_untrustworthy_request_heads_are_invalid_with_their_status(raw, status):
    with pytest.raises(wire.Invalid) as caught:
        await _request(raw, limit=1024)
    assert caught.value.status == status


async def test_a_head_cut_short_raises_incomplete_read():
    with pytest.raises(asyncio.IncompleteReadError):
        await _request(b"GET / HTTP/1.1\r\nHost: x\r\n")


@pytest.mark.parametrize(
    ("value", "length"),
    [("12", 12), ("5, 5", 5), (" 7 ", 7), (None, None), ("", None), ("²", None), ("0x10", None)],
)
def test_length_of(value, length):
    assert wire.length_of(value) == length
