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


async def test_bare_lf_line_ends_are_accepted():
    raw = (
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-A: b\r\n\n"
        b"5\nhello\n3\r\nabc\r\n0\nT: t\n\n"
    )
    head, body = await _response(raw)
    assert (head.status, head.framing, body) == (200, "chunked", b"helloabc")
    assert head.headers == [("transfer-encoding", "chunked"), ("x-a", "b")]


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
