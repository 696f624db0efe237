"""The one internal request/response model that every protocol adapter feeds.

HTTP/1.1 (``_h1wire``), HTTP/2 (jh2) and HTTP/3 (qh3) adapters all turn their
protocol events into a :class:`Request` whose body is a :class:`Body` stream
(with its trailer fields, if any), hand it to the handler, and write back the
:class:`Response` it returns.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ._errors import RequestTimeout

__all__ = ["Body", "Request", "Response", "Headers", "header_value", "decimal"]

DISCARD_SECONDS = 5.0
"How long an unread request body is still taken in after an early answer."
DISCARD_BYTES = 64 << 20
"How much of it at most."

READ_JOIN = 64 << 10
"A read takes every chunk already queued, up to this many bytes, as one."

Headers = list[tuple[str, str]]
"""Header list: lower-case names, in order, repeated names allowed."""


def header_value(headers: Headers, name: str) -> str | None:
    """First value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


_DECIMAL = re.compile(r"[0-9]{1,18}")


def decimal(value: str) -> int | None:
    """A decimal of at most 18 ASCII digits (a Content-Length), else None. Not
    ``str.isdigit()``: that also takes "²", which ``int()`` then refuses."""
    return int(value) if _DECIMAL.fullmatch(value) else None


class Body:
    """A request or response body, streamed in chunks with back-pressure.

    The producer (a protocol adapter) calls :meth:`feed` and :meth:`end` (or
    :meth:`abort`); the consumer iterates with ``async for``. ``on_consumed`` is
    called with the size of each chunk the consumer took, so the adapter can
    give flow-control credit back to the peer only for data actually used.
    """

    on_close: Callable[[], None] | None = None
    """Called once by :meth:`aclose`: the consumer is done (e.g. an upstream connection
    is let go if its body had not ended)."""

    def __init__(self, on_consumed: Callable[[int], None] | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter = asyncio.Event()
        self._on_consumed = on_consumed
        self.buffered = 0
        """Bytes received but not yet consumed."""
        self.received = 0
        """Bytes received in total."""
        self._source: AsyncIterator[bytes] | None = None
        self._source_trailers: Headers | None = None
        self.idle_timeout: float | None = None
        """Longest wait for the producer's next chunk; then RequestTimeout (408)."""
        self.trailers: Headers | None = None
        """Trailer fields (lower-case names) that came after the body, set by the producer
        before :meth:`end`; read by the consumer once the body has ended."""
        self.on_close: Callable[[], None] | None = None
        """Called once by :meth:`aclose`: the consumer is done (e.g. an upstream stream is
        reset if it had not ended)."""

    @classmethod
    def from_iter(cls, source: AsyncIterator[bytes], trailers: Headers | None = None) -> Body:
        """A body pulled from an async iterator (back-pressure comes for free); the
        source may fill ``trailers``, which become the body's once it is exhausted."""
        body = cls()
        body._source = source
        body._source_trailers = trailers
        return body

    @classmethod
    def empty(cls) -> Body:
        body = cls()
        body.end()
        return body

    @classmethod
    def of(cls, data: bytes) -> Body:
        body = cls()
        if data:
            body.feed(data)
        body.end()
        return body

    def feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.buffered += len(data)
            self.received += len(data)
            self._waiter.set()

    def end(self) -> None:
        self._ended = True
        self._waiter.set()

    def abort(self, error: BaseException) -> None:
        self._error = error
        self._waiter.set()

    @property
    def ended(self) -> bool:
        return self._ended and not self._chunks

    @property
    def complete(self) -> bool:
        """Every byte is here (``buffered``): ended, nothing to pull or wait for."""
        return self._ended and self._source is None and self._error is None

    def take_all(self) -> bytes:
        """Everything buffered, at once, counted as consumed."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        if data and self._on_consumed is not None:
            self._on_consumed(len(data))
        return data

    async def aclose(self) -> None:
        """Stop a pulled body early (closes its source, e.g. an upstream connection)."""
        source, self._source = self._source, None
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()

    async def read(self) -> bytes:
        """What has arrived (queued chunks joined up to ``READ_JOIN`` bytes), or b"" at
        the end of the body. An upload over HTTP/3 arrives a datagram (~1.3 KB) at a time:
        taking the whole queue at once makes one upstream write of a read batch instead
        of one per datagram."""
        while True:
            if self._source is not None and not self._chunks:
                try:
                    return await self._source.__anext__()
                except StopAsyncIteration:
                    self._source = None
                    self._ended = True
                    if self._source_trailers:
                        self.trailers = self._source_trailers
                    return b""
            if self._chunks:
                chunk = self._take()
                self.buffered -= len(chunk)
                if self._on_consumed is not None:
                    self._on_consumed(len(chunk))
                return chunk
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._waiter.clear()
            if self.idle_timeout is None:
                await self._waiter.wait()
                continue
            try:
                async with asyncio.timeout(self.idle_timeout):  # no task per wait
                    await self._waiter.wait()
            except TimeoutError:
                self._error = RequestTimeout("request body stalled")
                raise self._error from None

    def _take(self) -> bytes:
        chunks = self._chunks
        parts = [chunks.popleft()]
        size = len(parts[0])
        while chunks and size + len(chunks[0]) <= READ_JOIN:
            parts.append(chunks.popleft())
            size += len(parts[-1])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put a chunk back at the front (it was already counted as consumed)."""
        if data:
            self._chunks.appendleft(data)
            self.buffered += len(data)
            self._waiter.set()

    async def peek(self, size: int) -> tuple[list[bytes], bool]:
        """Read until more than ``size`` bytes or the end came, then put it all back.

        Returns the chunks read and whether they are the whole body."""
        chunks: list[bytes] = []
        total = 0
        while total <= size:
            chunk = await self.read()
            if not chunk:
                self.unread(b"".join(chunks))
                return chunks, True
            chunks.append(chunk)
            total += len(chunk)
        self.unread(b"".join(chunks))
        return chunks, False

    async def discard(self, seconds: float, limit: int) -> bool:
        """Read and drop the rest (bounded); True if the body reached its end.

        Used after answering early (413, 403): clients that keep sending until the
        body is out only read the answer then, so the rest is taken and dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            while limit > 0:
                chunk = await asyncio.wait_for(self.read(), max(0.0, deadline - loop.time()))
                if not chunk:
                    return True
                limit -= len(chunk)
        except Exception:  # timeout, reset, or the body was aborted
            return False
        return False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


@dataclass
class Request:
    """One request, whatever protocol carried it."""

    method: str
    "Request method, upper-case as sent."
    scheme: str
    "'https' or 'http': how the client reached us."
    authority: str
    "Host (and port) the client asked for: :authority or Host."
    target: str
    "Path and query, as sent."
    headers: Headers
    "Regular headers, lower-case names (no pseudo-headers, no Host)."
    protocol: str
    "'HTTP/1.1', 'HTTP/2' or 'HTTP/3'."
    client: tuple[str, int]
    "Peer address and port."
    server: tuple[str, int]
    "Local address and port the request arrived on."
    body: Body = field(default_factory=Body.empty)
    "Request body stream."
    content_length: int | None = None
    "Declared body length, when known."
    early_data: bool = False
    "True when received as QUIC 0-RTT data (replayable)."
    upgrade: str | None = None
    """'websocket' for a WebSocket handshake (h1 Upgrade, h2/h3 extended CONNECT, which
    arrives here as a GET); the body is then the client's tunnel bytes."""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def host(self) -> str:
        """Authority without port, lower-case."""
        auth = self.authority.lower()
        if auth.startswith("["):
            return auth.split("]", 1)[0] + "]"
        return auth.rsplit(":", 1)[0] if auth.count(":") == 1 else auth


@dataclass
class Response:
    """One response, written back by the adapter that carried the request."""

    status: int
    "Status code."
    headers: Headers = field(default_factory=list)
    "Regular headers, lower-case names, hop-by-hop headers already removed."
    body: Body = field(default_factory=Body.empty)
    "Response body stream."
    content_length: int | None = None
    "Body length when known, for HTTP/1.1 framing."
    generated: bool = False
    "Made by the proxy itself (an error, a redirect), not by an upstream."

    @classmethod
    def text(cls, status: int, text: str, headers: Headers | None = None) -> Response:
        data = text.encode()
        hdrs = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(data)))]
        return cls(status, hdrs + list(headers or []), Body.of(data), len(data), generated=True)
