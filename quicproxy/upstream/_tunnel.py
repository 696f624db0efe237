"""WebSocket tunnels: the handshake to the backend and the bytes both ways after it.

Whatever the client spoke — HTTP/1.1 ``Upgrade: websocket`` (RFC 6455), HTTP/2 extended
CONNECT (RFC 8441) or HTTP/3 extended CONNECT (RFC 9220) — the backend sees an HTTP/1.1
Upgrade on a connection of its own (never a pooled one), so it never needs to know the
client's protocol. The adapters turn their protocol's form into a :class:`Request` whose
``upgrade`` is ``"websocket"``; the handshake goes through routing, rate limits and the
WAF like any GET; then :func:`open_websocket` returns the response to send (101 on h1,
200 on h2/h3) whose body is the backend's bytes, while a task copies the client's bytes
(the request body: raw bytes after the 101 on h1, DATA on h2/h3) to the backend.

Bounds: each direction moves at most ``READ_SIZE`` bytes at a time and waits for the
other side to take them (a reader that stops reading stops the other side; nothing
grows), a tunnel with no byte either way for ``timeouts.tunnel_idle`` is closed, and
``limits.max_tunnels`` / ``limits.max_tunnels_per_client`` cap how many are open.
A backend that closes ends the client's stream cleanly; a backend reset resets it; a
client reset or close closes the backend connection.

Going away: tunnels still open when the drain's ``shutdown_grace`` ends are closed the
way RFC 6455 §7.4.1 says a server that goes down should, with a Close frame of code
1001 to the client and a masked one to the backend. Each direction's frame edges are
tracked (headers read, payloads skipped, nothing unmasked) so the Close goes in
between two frames, never inside one; a direction that is mid-frame gets
``GOING_AWAY_WAIT`` seconds to reach an edge, then it is cut.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from .. import _h1wire as wire
from .._config import Config
from .._errors import ProxyError, UpstreamConnectError, UpstreamTimeout, UpstreamTruncated
from .._metrics import metrics
from .._model import Body, Headers, Request, Response, header_value
from .._streamio import READ_SIZE, ready, write_within
from ._member import Member

__all__ = ["WEBSOCKET", "TunnelCaps", "open_websocket", "wants_websocket"]

log = logging.getLogger("quicproxy")

WEBSOCKET = "websocket"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_REPLACED = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-accept"})
GOING_AWAY_WAIT = 1.0
_BYE = (1001).to_bytes(2, "big") + b"going away"
_BYE_TO_CLIENT = bytes((0x88, len(_BYE))) + _BYE  # servers do not mask (RFC 6455 §5.1)

Dial = Callable[[Member], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def _tokens(headers: Headers, name: str) -> set[str]:
    return {t.strip().lower() for k, v in headers if k == name for t in v.split(",")}


def wants_websocket(method: str, headers: Headers, bodiless: bool) -> bool:
    """An HTTP/1.1 request asking to become a WebSocket (RFC 6455 §4.1): GET without a body,
    ``Upgrade: websocket`` and ``Connection: upgrade``. Other upgrades (h2c) are not
    honoured: their headers are dropped as hop-by-hop, as before."""
    return (
        method == "GET"
        and bodiless
        and WEBSOCKET in _tokens(headers, "upgrade")
        and "upgrade" in _tokens(headers, "connection")
    )


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest()).decode()


class TunnelCaps:
    """Open tunnels, in total and per client address, and the tunnels themselves (to
    close them with 1001 when the drain's grace ends)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: dict[str, int] = {}
        self.live: set[_Tunnel] = set()

    def go_away(self) -> int:
        """Close every open tunnel with a 1001 Close both ways; how many there were."""
        for tunnel in list(self.live):
            tunnel.go_away()
        return len(self.live)

    def take(self, client: str) -> str | None:
        """None when a tunnel may open (and it is counted), else why not."""
        if self.open >= self.total:
            return "total"
        if self._by_client.get(client, 0) >= self.per_client:
            return "client"
        self.open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return None

    def give(self, client: str) -> None:
        self.open -= 1
        left = self._by_client.get(client, 1) - 1
        if left:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class TooManyTunnels(ProxyError):
    status = 429
    reason = "Too Many Requests"


class TunnelsFull(ProxyError):
    status = 503
    reason = "Service Unavailable"


async def open_websocket(
    cfg: Config,
    dial: Dial,
    member: Member,
    req: Request,
    headers: Headers,
    caps: TunnelCaps,
    client: str,
) -> Response:
    """The backend's answer to the WebSocket handshake of ``req``. On a 101 the response
    is the one to send the client (101 on HTTP/1.1, 200 on h2/h3) and its body carries
    the backend's bytes; any other answer is passed on as a plain response."""
    refused = caps.take(client)
    if refused == "client":
        raise TooManyTunnels(f"over {caps.per_client} open tunnels from this client")
    if refused == "total":
        raise TunnelsFull(f"over {caps.total} open tunnels")
    try:
        reader, writer = await dial(member)
    except BaseException:
        caps.give(client)
        raise
    try:
        head, key_sent = await _handshake(cfg, reader, writer, req, headers)
    except BaseException:
        writer.transport.abort()
        caps.give(client)
        raise
    if head.status != 101:
        caps.give(client)
        body = Body.from_iter(_plain_body(reader, writer, head, cfg.upstream.timeout))
        return Response(head.status, head.headers, body, head.length)
    accept = header_value(head.headers, "sec-websocket-accept")
    if WEBSOCKET not in _tokens(head.headers, "upgrade") or accept != accept_key(key_sent):
        writer.transport.abort()
        caps.give(client)
        raise UpstreamConnectError("backend's 101 is not a WebSocket handshake")
    tunnel = Body.from_iter(_Tunnel(cfg, reader, writer, req, caps, client))
    if req.protocol == "HTTP/1.1":
        # The client's own key went to the backend: its Accept answers the client.
        return Response(101, head.headers, tunnel)
    return Response(200, [(k, v) for k, v in head.headers if k not in _REPLACED], tunnel)


async def _handshake(
    cfg: Config,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    req: Request,
    headers: Headers,
) -> tuple[wire.ResponseHead, str]:
    """Send the HTTP/1.1 Upgrade; the backend's answer and the key it must accept."""
    key = header_value(req.headers, "sec-websocket-key") if req.protocol == "HTTP/1.1" else None
    if key is None:  # h2/h3 clients send no key (RFC 8441 §5): the proxy makes one
        key = base64.b64encode(os.urandom(16)).decode()
    fields = [(k, v) for k, v in headers if k not in _REPLACED and k != "content-length"]
    fields += [
        ("connection", "upgrade"),
        ("upgrade", WEBSOCKET),
        ("sec-websocket-key", key),
        ("sec-websocket-version", header_value(req.headers, "sec-websocket-version") or "13"),
    ]
    try:
        await write_within(writer, wire.request_head("GET", req.target, fields), cfg.timeouts.send)
        async with asyncio.timeout(cfg.upstream.timeout):
            head = await wire.read_head(reader, "GET", upgrade=True)
    except TimeoutError:
        raise UpstreamTimeout("upstream did not answer the WebSocket handshake in time") from None
    except wire.Invalid as exc:
        raise UpstreamConnectError(f"invalid upstream response: {exc}") from None
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        raise UpstreamConnectError("upstream closed the WebSocket handshake") from None
    return head, key


async def _plain_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: wire.ResponseHead,
    timeout: float,
) -> AsyncIterator[bytes]:
    """A refused handshake's answer (the connection is not reused)."""
    try:
        async for data in wire.read_body(reader, head, timeout):
            yield data
    except (wire.Invalid, asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
        raise UpstreamTruncated("upstream response ended early or was malformed") from None
    finally:
        writer.transport.abort()


class _Tunnel:
    """One open WebSocket: the backend's bytes out as the response body (it iterates
    them), the client's in. ``aclose`` releases it, iterated or not."""

    def __init__(
        self,
        cfg: Config,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: Request,
        caps: TunnelCaps,
        client: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.req = req
        self.caps = caps
        self.client = client
        self.idle = cfg.timeouts.tunnel_idle
        self.send_timeout = cfg.timeouts.send
        self.label = _LABELS.get(req.protocol, "h1")
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._bytes = self._run()
        self._released = False
        self._down = FrameEdges()  # backend -> client
        self._up = FrameEdges()  # client -> backend
        self._timer: asyncio.Timeout | None = None
        self._upload: asyncio.Future[bool] | None = None
        self.leaving_by: float | None = None  # going away: the deadline to reach an edge
        caps.live.add(self)
        # the byte counters, labelled once (a lookup per chunk cost more than the count)
        self._bytes_out = metrics.tunnel_bytes.labels(protocol=self.label, direction="out")
        self._bytes_in = metrics.tunnel_bytes.labels(protocol=self.label, direction="in")
        metrics.tunnels_open.labels(protocol=self.label).inc()

    def __aiter__(self) -> _Tunnel:
        return self

    async def __anext__(self) -> bytes:
        return await self._bytes.__anext__()

    async def aclose(self) -> None:
        try:
            await self._bytes.aclose()
        finally:
            self._release(clean=False)

    def _release(self, clean: bool) -> None:
        if self._released:
            return
        self._released = True
        self.caps.live.discard(self)
        if clean:
            self.writer.close()
        else:
            self.writer.transport.abort()
        metrics.tunnels_open.labels(protocol=self.label).dec()
        self.caps.give(self.client)

    def go_away(self) -> None:
        """Start closing with 1001 both ways (the drain's grace is over)."""
        if self.leaving_by is not None:
            return
        self.leaving_by = self.loop.time() + GOING_AWAY_WAIT
        if self._timer is not None:
            self._timer.reschedule(self.loop.time())  # wake the backend read now
        if self._upload is not None and self._up.at_edge():
            self._upload.cancel()  # waiting for the client between two frames

    async def _read(self, seconds: float) -> bytes:
        """The backend's next bytes; TimeoutError after ``seconds`` or at ``go_away``."""
        if ready(self.reader):
            return await self.reader.read(READ_SIZE)
        async with asyncio.timeout(seconds) as self._timer:
            try:
                return await self.reader.read(READ_SIZE)
            finally:
                self._timer = None

    async def _run(self) -> AsyncGenerator[bytes, None]:
        upload = self._upload = asyncio.ensure_future(self._client_to_backend())
        bye = False
        try:
            while True:
                now = self.loop.time()
                if self.leaving_by is not None:
                    if self._down.at_edge():
                        yield _BYE_TO_CLIENT
                        bye = await self._bye_to_backend(upload)
                        return
                    if now >= self.leaving_by:
                        return  # mid-frame too long: cut
                left = self.last + self.idle - now
                if left <= 0:
                    log.info("WebSocket from %s idle for %.0f s: closed", self.client, self.idle)
                    return
                if self.leaving_by is not None:
                    left = min(left, self.leaving_by - now)
                try:
                    data = await self._read(left)
                except TimeoutError:
                    continue  # the client may have sent meanwhile, or going away: look again
                except (ConnectionError, OSError):
                    raise UpstreamTruncated("upstream reset the WebSocket") from None
                if not data:
                    return  # the backend closed: the client's stream ends cleanly
                self.last = self.loop.time()
                self._bytes_out.inc(len(data))
                edge = self._down.feed(data)
                if self.leaving_by is not None and edge >= 0:
                    if edge:
                        yield data[:edge]  # up to the frame edge; then the Close
                    yield _BYE_TO_CLIENT
                    bye = await self._bye_to_backend(upload)
                    return
                yield data
        finally:
            upload.cancel()
            try:
                await asyncio.wait([upload])
            finally:
                self._release(clean=bye or upload_ended(upload))

    async def _bye_to_backend(self, upload: asyncio.Future[bool]) -> bool:
        """After the client's Close: the client's side stops at a frame edge (within the
        deadline) and the backend gets a masked 1001 Close; True when it did."""
        if not upload.done() and self._up.at_edge():
            upload.cancel()
        left = (self.leaving_by or 0) - self.loop.time()
        if not upload.done():
            await asyncio.wait([upload], timeout=max(left, 0))
        if not upload.done() or not self._up.at_edge():
            return False
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(_BYE))
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.write(bytes((0x88, 0x80 | len(_BYE))) + mask + masked)
        return True

    async def _client_to_backend(self) -> bool:
        """Copy the client's bytes to the backend; True when the client ended cleanly.
        Going away, it stops at the first frame edge (False)."""
        body = self.req.body
        try:
            async for chunk in body:
                self.last = self.loop.time()
                self._bytes_in.inc(len(chunk))
                edge = self._up.feed(chunk)
                if self.leaving_by is not None and edge >= 0:
                    await write_within(self.writer, chunk[:edge], self.send_timeout)
                    self._up = FrameEdges()  # what the backend has ends at an edge
                    return False
                await write_within(self.writer, chunk, self.send_timeout)
        except (ConnectionError, OSError, TimeoutError, ProxyError):
            # the client reset (or the backend stopped reading): the backend goes too
            self.writer.transport.abort()
            return False
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        return True


class FrameEdges:
    """Where WebSocket frames end in one direction's bytes: each frame's header is read
    (RFC 6455 §5.2) and its payload skipped, never copied or unmasked."""

    __slots__ = ("left", "head")

    def __init__(self) -> None:
        self.left = 0  # payload bytes of the current frame still to come
        self.head = b""  # a frame header split across reads

    def at_edge(self) -> bool:
        return self.left == 0 and not self.head

    def feed(self, data: bytes) -> int:
        """Follow ``data``; the offset of its first frame edge (0: it starts at one,
        ``len(data)``: it ends at one), or -1 when it has none."""
        first = 0 if self.at_edge() else -1
        pos, end = 0, len(data)
        while pos < end:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
            else:
                head = self.head + data[pos : pos + 14]
                size = _header_size(head)
                if size is None or len(head) < size:
                    self.head = head
                    return first
                pos += size - len(self.head)
                self.head = b""
                self.left = _payload_size(head)
            if not self.left and first < 0:
                first = pos
        return first


def _header_size(head: bytes) -> int | None:
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    return 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if head[1] & 0x80 else 0)


def _payload_size(head: bytes) -> int:
    n = head[1] & 0x7F
    if n == 126:
        return int.from_bytes(head[2:4], "big")
    if n == 127:
        return int.from_bytes(head[2:10], "big")
    return n


def upload_ended(upload: asyncio.Future[bool]) -> bool:
    """The client's side ended cleanly (not reset, not cut short)."""
    if not upload.done() or upload.cancelled() or upload.exception() is not None:
        return False
    return upload.result()


_LABELS = {"HTTP/1.1": "h1", "HTTP/2": "h2", "HTTP/3": "h3"}
