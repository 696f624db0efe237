"""HTTP/1.1 on the client side of a connection: the request head out, the response in.

Small and strict, for the upstream pool: the request's fields were checked by
``_target.check_request`` before they get here (tokens, visible ASCII), so the
head is written as it is; the response is read with bounded heads, lines and
chunk sizes, and its framing (RFC 9112 6.3) is judged once, from the head:

- no body: a response to HEAD, 204 and 304 (1xx are skipped by the caller);
- ``Transfer-Encoding: chunked`` (the only coding accepted; with a
  Content-Length too it is refused, as a response splitting attempt);
- ``Content-Length`` (one value, repeated identically at most);
- else up to the end of the connection, which is then not reused.

Lines end in CRLF or, as RFC 9112 2.2 lets a recipient accept, a bare LF. Errors
are :class:`Invalid` (the response cannot be trusted) or
:class:`asyncio.IncompleteReadError` (the connection ended early).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ._h11io import READ_SIZE, read_within
from ._model import Headers

__all__ = ["Invalid", "ResponseHead", "request_head", "read_head", "read_body"]

HEAD_LIMIT = 65536
"Bytes of a response head (status line and fields)."
LINE_LIMIT = 8192
"Bytes of a chunk-size line or a trailer field."
TRAILER_LIMIT = 100
"Trailer fields read (and dropped) after a chunked body."

_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class Invalid(Exception):
    """The upstream's response breaks HTTP/1.1 (or a limit)."""


@dataclass
class ResponseHead:
    status: int
    headers: Headers
    "Lower-case names, latin-1 values, in order."
    framing: str
    "'none', 'length', 'chunked' or 'close'."
    length: int | None
    "Content-Length when framing is 'length'."
    keep_alive: bool
    "The connection may carry another request after this response."


def request_head(method: str, target: str, headers: Headers) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"{method} {target} HTTP/1.1\r\n{fields}\r\n".encode("latin-1")


def parse_head(lines: list[bytes], method: str) -> ResponseHead:
    """A response head (its lines, without line ends) to a request made with ``method``."""
    status_line = _STATUS.fullmatch(lines[0])
    if status_line is None:
        raise Invalid("bad status line")
    minor, status = status_line.group(1), int(status_line.group(2))
    headers: Headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise Invalid("bad header line")  # also a folded (obs-fold) line
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise Invalid("control character in a header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return _framed(status, headers, method, minor == b"1")


def _framed(status: int, headers: Headers, method: str, http11: bool) -> ResponseHead:
    codings = [v for k, v in headers if k == "transfer-encoding"]
    lengths = [v for k, v in headers if k == "content-length"]
    tokens = {t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")}
    keep_alive = http11 and "close" not in tokens
    if method == "HEAD" or status in (204, 304) or status < 200:
        return ResponseHead(status, headers, "none", None, keep_alive)
    if codings:
        if lengths:
            raise Invalid("both Transfer-Encoding and Content-Length")
        if ",".join(codings).strip().lower() != "chunked":
            raise Invalid("unsupported transfer coding")
        return ResponseHead(status, headers, "chunked", None, keep_alive)
    if lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1:
            raise Invalid("conflicting Content-Length values")
        (value,) = values
        if not value.isdigit() or len(value) > 18:
            raise Invalid("bad Content-Length")
        return ResponseHead(status, headers, "length", int(value), keep_alive)
    return ResponseHead(status, headers, "close", None, False)


async def _line(reader: asyncio.StreamReader, limit: int) -> bytes:
    """The next line without its line end (CRLF or LF)."""
    try:
        data = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise Invalid("line or head too long") from None
    if len(data) > limit:
        raise Invalid("line or head too long")
    return data[:-2] if data.endswith(b"\r\n") else data[:-1]


async def _head_lines(reader: asyncio.StreamReader) -> list[bytes]:
    lines: list[bytes] = []
    size = 0
    while True:
        line = await _line(reader, HEAD_LIMIT - size)
        size += len(line) + 2
        if not line:
            return lines
        if size > HEAD_LIMIT:
            raise Invalid("line or head too long")
        lines.append(line)


async def read_head(reader: asyncio.StreamReader, method: str) -> ResponseHead:
    """The next response head, 1xx interim responses skipped."""
    while True:
        head = parse_head(await _head_lines(reader), method)
        if head.status >= 200:
            return head
        if head.status == 101:
            raise Invalid("101 Switching Protocols: no upgrade was asked for")


async def read_body(
    reader: asyncio.StreamReader, head: ResponseHead, timeout: float
) -> AsyncIterator[bytes]:
    """The body's bytes as they come; each wait for bytes is bounded by ``timeout``
    (TimeoutError)."""
    if head.framing == "length":
        assert head.length is not None
        async for data in _exactly(reader, head.length, timeout):
            yield data
    elif head.framing == "chunked":
        while True:
            async with asyncio.timeout(timeout):
                line = await _line(reader, LINE_LIMIT)
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise Invalid("bad chunk size")
            if size.strip(b"0") == b"":
                break
            async for data in _exactly(reader, int(size, 16), timeout):
                yield data
            async with asyncio.timeout(timeout):
                if await _line(reader, 2) != b"":
                    raise Invalid("chunk not followed by a line end")
        for _ in range(TRAILER_LIMIT + 1):
            async with asyncio.timeout(timeout):
                if await _line(reader, LINE_LIMIT) == b"":
                    return
        raise Invalid("too many trailer fields")
    elif head.framing == "close":
        while data := await read_within(reader, READ_SIZE, timeout):
            yield data


async def _exactly(reader: asyncio.StreamReader, size: int, timeout: float) -> AsyncIterator[bytes]:
    left = size
    while left:
        data = await read_within(reader, min(left, READ_SIZE), timeout)
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        yield data
