"""HTTP/1.1 on the wire, for both ends of a connection: small and strict.

Client side (the upstream pool, the WAF service client): the request's fields
were checked by ``_target.check_request`` before they get here (tokens, visible
ASCII), so the head is written as it is; the response is read with bounded
heads, lines and chunk sizes, and its framing (RFC 9112 6.3) is judged once,
from the head:

- no body: a response to HEAD, 204 and 304 (1xx are skipped by the caller);
- ``Transfer-Encoding: chunked`` (the only coding accepted; with a
  Content-Length too it is refused, as a response splitting attempt);
- ``Content-Length`` (one value, repeated identically at most);
- else up to the end of the connection, which is then not reused.

Server side (the h1 listener): a request head is read line by line under the
caller's deadline and a size limit (:class:`TooLong`, 431); its framing is
chunked, a Content-Length or none (a request never runs to the end of the
connection); both together, another coding, or a coding on HTTP/1.0 is refused.
Bodies of both sides are read by the same :func:`read_body`.

Head lines end in CRLF or, as RFC 9112 2.2 lets a recipient accept, a bare LF; empty
lines before the start line are skipped (2.2). Chunked framing is held to the letter
(CRLF after sizes, data and trailers; no whitespace before a size; OWS is space and
tab only): leniency there is what request smuggling feeds on. Errors are :class:`Invalid` (the
message cannot be trusted; ``status`` is the answer a server gives) or
:class:`asyncio.IncompleteReadError` (the connection ended early).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

from ._model import Headers, decimal
from ._streamio import READ_SIZE, buffered, read_within

__all__ = [
    "Invalid",
    "TooLong",
    "RequestHead",
    "ResponseHead",
    "request_head",
    "response_head",
    "reason",
    "read_head",
    "read_request",
    "read_body",
    "length_of",
]

HEAD_LIMIT = 65536
"Bytes of a head (start line and fields) where no other limit is configured."
LINE_LIMIT = 8192
"Bytes of a chunk-size line or a trailer field."
TRAILER_LIMIT = 100
"Trailer fields read after a chunked body."

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_REQUEST = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_OWS = " \t"
"Optional whitespace (RFC 9110 5.6.3); str.strip() alone would also take e.g. NBSP."


class Invalid(Exception):
    """The message breaks HTTP/1.1 (or a limit); ``status`` is a server's answer to it."""

    status = 400

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        if status is not None:
            self.status = status


class TooLong(Invalid):
    """A head or a line over its limit."""

    status = 431


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    "'1.0' or '1.1'."
    headers: Headers
    "Lower-case names, latin-1 values, in order."
    framing: str
    "'none', 'length' or 'chunked'."
    length: int | None
    "Content-Length when framing is 'length'."
    keep_alive: bool
    "The client may send another request on this connection (HTTP/1.1 without close)."
    expect_continue: bool
    "The client waits for 100 Continue before it sends the body."


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


def response_head(status: int, headers: Headers) -> bytes:
    """A response head as given; a header holding a line break or NUL (which would split
    the response) is a ValueError."""
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers) or "\0" in fields:
        raise ValueError("line break in a response header")
    return f"HTTP/1.1 {status} {reason(status)}\r\n{fields}\r\n".encode("latin-1")


def reason(status: int) -> str:
    """The reason phrase of a status ('' for one without)."""
    return _REASONS.get(status, "")


def request_head(method: str, target: str, headers: Headers) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"{method} {target} HTTP/1.1\r\n{fields}\r\n".encode("latin-1")


def parse_head(start: bytes, headers: Headers, method: str) -> ResponseHead:
    """A response head (its status line, its fields) to a request made with ``method``."""
    status_line = _STATUS.fullmatch(start)
    if status_line is None:
        raise Invalid("bad status line")
    minor, status = status_line.group(1), int(status_line.group(2))
    return _framed(status, headers, method, minor == b"1")


def parse_request(start: bytes, headers: Headers) -> RequestHead:
    """A request head (its request line, its fields)."""
    request_line = _REQUEST.fullmatch(start)
    if request_line is None:
        raise Invalid("bad request line")
    method, target, version = (part.decode("ascii") for part in request_line.groups())
    if version not in ("1.0", "1.1"):
        raise Invalid(f"HTTP/{version}", 505)
    codings = [v for k, v in headers if k == "transfer-encoding"]
    lengths = [v for k, v in headers if k == "content-length"]
    framing, length = "none", None
    if codings:
        if lengths:
            raise Invalid("Content-Length and Transfer-Encoding together")
        if version == "1.0":
            raise Invalid("Transfer-Encoding on HTTP/1.0")
        _chunked(codings, 501)
        framing = "chunked"
    elif lengths:
        framing, length = "length", _length(lengths)
    http11 = version == "1.1"
    keep_alive = http11 and "close" not in _tokens(headers, "connection")
    expect = http11 and "100-continue" in _tokens(headers, "expect")
    return RequestHead(method, target, version, headers, framing, length, keep_alive, expect)


def _field(line: bytes) -> tuple[str, str]:
    """One field line (a header or a trailer): a token name, a colon, a value without
    control bytes. A folded (obs-fold) line is refused."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise Invalid("bad header line")
    value = value.strip(b" \t")
    if not _VALUE.fullmatch(value):
        raise Invalid("control character in a header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _tokens(headers: Headers, name: str) -> set[str]:
    return {t.strip(_OWS).lower() for k, v in headers if k == name for t in v.split(",")}


def _chunked(codings: list[str], status: int) -> None:
    if ",".join(codings).strip(_OWS).lower() != "chunked":
        raise Invalid("unsupported transfer coding", status)


def _length(lengths: list[str]) -> int:
    values = {v.strip(_OWS) for value in lengths for v in value.split(",")}
    if len(values) != 1:
        raise Invalid("conflicting Content-Length values")
    (value,) = values
    length = decimal(value)
    if length is None:
        raise Invalid("bad Content-Length")
    return length


def length_of(value: str | None) -> int | None:
    """A Content-Length field value as a number (the first of a list); None if it is
    missing or not one."""
    return decimal((value or "").split(",")[0].strip(_OWS))


def _framed(status: int, headers: Headers, method: str, http11: bool) -> ResponseHead:
    codings = [v for k, v in headers if k == "transfer-encoding"]
    lengths = [v for k, v in headers if k == "content-length"]
    keep_alive = http11 and "close" not in _tokens(headers, "connection")
    framing, length = "close", None
    if codings:  # judged even where no body follows: a response that lies is not forwarded
        if lengths:
            raise Invalid("both Transfer-Encoding and Content-Length")
        _chunked(codings, 502)
        framing = "chunked"
    elif lengths:
        framing, length = "length", _length(lengths)
    if method == "HEAD" or status in (204, 304) or status < 200:
        return ResponseHead(status, headers, "none", None, keep_alive)
    return ResponseHead(status, headers, framing, length, keep_alive and framing != "close")


async def _line(
    reader: asyncio.StreamReader, limit: int, first: bytes = b"", crlf: bool = False
) -> bytes:
    """The next line without its line end: CRLF or a bare LF, CRLF only with ``crlf``;
    ``first``: its first byte, read already."""
    if first == b"\n" and not crlf:
        return b""
    try:
        data = first + await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise TooLong("line or head too long") from None
    if len(data) > limit:
        raise TooLong("line or head too long")
    if data.endswith(b"\r\n"):
        return data[:-2]
    if crlf:
        raise Invalid("bare LF in chunked framing")
    return data[:-1]


class _Head:
    """A head being read: each line is judged as it comes, by the same rules whether it
    was awaited or found already buffered."""

    __slots__ = ("start", "limit", "start_line", "headers", "size")

    def __init__(self, start: re.Pattern[bytes], limit: int) -> None:
        self.start = start
        self.limit = limit
        self.start_line = b""
        self.headers: Headers = []
        self.size = 0

    def take(self, line: bytes) -> bool:
        """One line without its line end; True when it ends the head."""
        self.size += len(line) + 2
        if self.size > self.limit:
            raise TooLong("line or head too long")
        if not line:
            return bool(self.start_line)  # empty lines before the start line are skipped
        if self.start_line:
            self.headers.append(_field(line))
        elif self.start.fullmatch(line):
            self.start_line = line
        else:
            raise Invalid("not an HTTP/1.1 start line")
        return False

    def take_buffered(self, reader: asyncio.StreamReader) -> tuple[int, bool]:
        """Judge the whole lines the reader holds already, up to the head's end: (bytes
        to consume, whether the head ended). A head usually comes in one segment, so
        it is judged here, without a wait per line."""
        buffer = buffered(reader)
        pos = 0
        while (end := buffer.find(b"\n", pos)) >= 0:
            line = bytes(buffer[pos : end - 1 if end > pos and buffer[end - 1] == 13 else end])
            pos = end + 1
            if self.take(line):
                return pos, True
        return pos, False


async def _head(
    reader: asyncio.StreamReader,
    start: re.Pattern[bytes],
    limit: int = HEAD_LIMIT,
    first: bytes = b"",
) -> tuple[bytes, Headers]:
    """A head's start line and fields, up to the empty line ending it, at most ``limit``
    bytes in all. Each line is judged as soon as it is read (the start line by
    ``start``): a peer sending garbage is refused at once, not when its head ends."""
    head = _Head(start, limit)
    while True:
        if not first:
            used, ended = head.take_buffered(reader)
            if used:
                await reader.readexactly(used)  # buffered: returns at once
            if ended:
                return head.start_line, head.headers
        line = await _line(reader, limit - head.size, first)
        first = b""
        if head.take(line):
            return head.start_line, head.headers


async def read_head(
    reader: asyncio.StreamReader, method: str, upgrade: bool = False
) -> ResponseHead:
    """The next response head, 1xx interim responses skipped; a 101 is returned when the
    request asked for an upgrade (``upgrade``), else refused."""
    while True:
        head = parse_head(*await _head(reader, _STATUS), method)
        if head.status >= 200 or (head.status == 101 and upgrade):
            return head
        if head.status == 101:
            raise Invalid("101 Switching Protocols: no upgrade was asked for")


async def read_request(reader: asyncio.StreamReader, limit: int, first: bytes) -> RequestHead:
    """The next request head (``first``: its first byte, read already to see that one
    comes), at most ``limit`` bytes; the caller bounds the time."""
    return parse_request(*await _head(reader, _REQUEST, limit, first))


async def read_body(
    reader: asyncio.StreamReader,
    head: RequestHead | ResponseHead,
    timeout: float,
    trailers: Headers | None = None,
) -> AsyncIterator[bytes]:
    """The body's bytes as they come; each wait for bytes is bounded by ``timeout``
    (TimeoutError). A chunked body's trailer fields are appended to ``trailers``."""
    if head.framing == "length":
        assert head.length is not None
        async for data in _exactly(reader, head.length, timeout):
            yield data
    elif head.framing == "chunked":
        while True:
            async with asyncio.timeout(timeout):
                line = await _line(reader, LINE_LIMIT, crlf=True)
            size = line.split(b";", 1)[0].rstrip(b" \t")  # whitespace only before ;ext
            if not _HEX.fullmatch(size):
                raise Invalid("bad chunk size")
            if size.strip(b"0") == b"":
                break
            async for data in _exactly(reader, int(size, 16), timeout):
                yield data
            async with asyncio.timeout(timeout):
                if await reader.readexactly(2) != b"\r\n":
                    raise Invalid("chunk not followed by CRLF")
        for _ in range(TRAILER_LIMIT + 1):
            async with asyncio.timeout(timeout):
                line = await _line(reader, LINE_LIMIT, crlf=True)
            if line == b"":
                return
            field = _field(line)
            if trailers is not None:
                trailers.append(field)
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
