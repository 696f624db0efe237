"""HTTP/1.1 server: requests read with the shared codec (``_h1wire``) into the request
model, responses framed and written here, over asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import _h1wire as wire
from ._errors import BadRequest, ClientGone, ProxyError, RequestError, RequestTimeout
from ._handler import Handler, error_response
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request, header_value
from ._sockets import plain_addr
from ._streamio import READ_SIZE, read_within, write_within
from ._target import origin_form
from .upstream._tunnel import WEBSOCKET, wants_websocket

__all__ = ["H1Connection"]

log = logging.getLogger("quicproxy")
_HIGH_WATER = 1 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
_TUNNEL_HIGH_WATER = READ_SIZE
"A WebSocket's client bytes held while the backend lags (per tunnel)."


class _Writer:
    """A response's bytes to the connection, framed by Content-Length, chunked (an
    HTTP/1.1 client) or by closing (HTTP/1.0); after a 101 to a WebSocket handshake, raw
    (the connection is a tunnel until one side closes). The head is held until the first body
    bytes (or the end) so a small response leaves in one write, one TLS record and one
    system call; it is written at the end of the event-loop turn if nothing follows."""

    def __init__(
        self, conn: H1Connection, head: wire.RequestHead, body: Body, upgrade: bool = False
    ) -> None:
        self.conn = conn
        self.head = head
        self.body = body
        self.upgrade = upgrade
        "The request is a WebSocket handshake (its body: the client's bytes after a 101)."
        self.framing = "none"
        self.left = 0
        "Body bytes still owed under Content-Length."
        self.done = False
        "The response was written to its end."
        self._held = b""
        self._flush: asyncio.Handle | None = None

    async def send_head(self, status: int, headers: Headers, end: bool = False) -> None:
        await self._head(status, headers)
        if end:
            await self.send_end()

    async def _head(self, status: int, headers: Headers) -> None:
        conn = self.conn
        if self.upgrade:
            if status == 101:
                self._switch(headers)
                return
            self.body.end()  # refused: no tunnel, and nothing more comes from the client
        if not self.body.ended:
            # Answering before the whole body came: no keep-alive, and a lingering close.
            conn.closing = conn.linger = True
        if not self.head.keep_alive:
            conn.closing = True
        length = wire.length_of(header_value(headers, "content-length"))
        fields = [(k, v) for k, v in headers if k not in _FRAMING]
        if length is not None:
            fields.append(("content-length", str(length)))
        if self.head.method == "HEAD" or status in (204, 304):
            pass  # no body, whatever the fields say
        elif length is not None:
            self.framing, self.left = "length", length
        elif self.head.version == "1.1":
            self.framing = "chunked"
            fields.append(("transfer-encoding", "chunked"))
        else:
            self.framing = "close"
            conn.closing = True
        if conn.closing:
            fields.append(("connection", "close"))
        try:
            self._held = wire.response_head(status, fields)
        except ValueError as exc:
            raise ProxyError(str(exc)) from None
        self._flush = asyncio.get_running_loop().call_soon(self._write_held)

    def _switch(self, headers: Headers) -> None:
        """101: the head, then the connection carries the tunnel's bytes both ways."""
        conn = self.conn
        conn.closing = True
        self.framing = "raw"
        fields = [(k, v) for k, v in headers if k not in _FRAMING]
        fields += [("connection", "upgrade"), ("upgrade", WEBSOCKET)]
        self._held = wire.response_head(101, fields)
        self._flush = asyncio.get_running_loop().call_soon(self._write_held)
        conn.tunnel = asyncio.ensure_future(conn.pump_raw(self.body))

    def _write_held(self) -> None:
        self._flush = None
        held, self._held = self._held, b""
        if held and not self.conn.writer.transport.is_closing():
            self.conn.writer.write(held)

    async def _send(self, data: bytes) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
            data, self._held = self._held + data, b""
        if data:
            try:
                await self.conn.write(data)
            except TimeoutError:
                raise  # the client stopped reading: a stalled client, not a cancel
            except (ConnectionError, OSError) as exc:
                raise ClientGone(f"client connection lost: {exc!r}") from None

    async def send_data(self, data: bytes) -> None:
        if not data or self.framing == "none":
            return
        if self.framing == "raw":
            pass
        elif self.framing == "chunked":
            data = b"%x\r\n%b\r\n" % (len(data), data)
        elif self.framing == "length":
            if len(data) > self.left:
                raise ProxyError("response body longer than its Content-Length")
            self.left -= len(data)
        await self._send(data)

    async def send_end(self, trailers: Headers | None = None) -> None:
        if self.framing == "length" and self.left:
            raise ProxyError("response body shorter than its Content-Length")
        end = b""
        if self.framing == "chunked":
            end = b"0\r\n" + self._trailers(trailers) + b"\r\n"
        await self._send(end)
        self.done = True

    def _trailers(self, trailers: Headers | None) -> bytes:
        """Trailer fields in the last chunk, for a client that said ``TE: trailers``
        (others would not expect them); a field with a line break is left out."""
        te = header_value(self.head.headers, "te") or ""
        if not trailers or "trailers" not in te.lower():
            return b""
        lines = [
            f"{k}: {v}\r\n".encode("latin-1")
            for k, v in trailers
            if not k.startswith(":") and not any(c in k + v for c in "\r\n\0")
        ]
        return b"".join(lines)

    def abort(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.conn.writer.transport.abort()


class H1Connection:
    """One HTTP/1.1 client connection (plain or inside TLS)."""

    def __init__(
        self,
        handler: Handler,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        scheme: str,
    ) -> None:
        self.handler = handler
        self.reader = reader
        self.writer = writer
        self.scheme = scheme
        self.head_limit = handler.cfg.limits.max_header_bytes
        self.timeouts = handler.cfg.timeouts
        self.accepted = asyncio.get_running_loop().time()
        self.client = plain_addr(writer.get_extra_info("peername"))
        self.server = plain_addr(writer.get_extra_info("sockname"))
        self.closing = False
        self.linger = False
        "Discard unread request data before closing, so the client can read our answer."
        self.busy = False
        self.tunnel: asyncio.Task[None] | None = None
        "Reads a WebSocket's client bytes once a 101 was sent."
        self._room = asyncio.Event()
        self._room.set()

    async def write(self, data: bytes) -> None:
        await write_within(self.writer, data, self.timeouts.send)

    async def _next_request(self, first: bool) -> wire.RequestHead | None:
        """The next request head (None: the client closed or sent nothing in time). The
        keep-alive wait for its first byte is bounded by the idle timeout, the whole
        head by the header deadline (from the first byte, or from the accept for the
        first request), however slowly it trickles."""
        loop = asyncio.get_running_loop()
        if first:
            deadline = self.accepted + self.timeouts.header
            try:
                async with asyncio.timeout_at(deadline):
                    byte = await self.reader.read(1)
            except TimeoutError:
                return None
        else:
            async with asyncio.timeout(self.timeouts.idle):
                byte = await self.reader.read(1)
            deadline = loop.time() + self.timeouts.header
        if not byte:
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await wire.read_request(self.reader, self.head_limit, byte)
        except TimeoutError:
            raise RequestTimeout("request head not received in time") from None

    def shutdown(self) -> None:
        """Graceful close: now if idle, else after the response in progress."""
        self.closing = True
        if not self.busy:
            self.writer.close()

    async def run(self) -> None:
        first = True
        try:
            while not self.closing:
                try:
                    head = await self._next_request(first)
                except wire.Invalid as exc:
                    log.info("bad HTTP/1.1 request from %s: %s", self.client[0], exc)
                    await self._refuse(exc.status, "")
                    break
                except asyncio.IncompleteReadError:
                    await self._refuse(400, "")  # the client stopped inside the head
                    break
                except RequestTimeout as exc:
                    await self._refuse(exc.status, exc.reason)
                    break
                first = False
                if head is None:
                    break
                self.busy = True
                reusable = await self._serve(head)
                self.busy = False
                if not reusable:
                    break
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            if self.linger:
                await self._discard_rest()
            await self._close()

    async def _close(self) -> None:
        """Close, and drop the connection if the client does not take our last bytes."""
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), self.timeouts.send)
        except Exception:  # timeout, reset, TLS close_notify failing: no more to say
            self.writer.transport.abort()

    async def _discard_rest(self) -> None:
        """Read and drop what the client still sends (bounded in time and size):
        closing with unread data makes the kernel reset the connection, and the
        client would lose the response it has not read yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DISCARD_SECONDS
        left = DISCARD_BYTES
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            while left > 0:
                data = await read_within(self.reader, READ_SIZE, deadline - loop.time())
                if not data:
                    break
                left -= len(data)

    async def _refuse(self, status: int, reason: str) -> None:
        """Answer an unusable request (no response to it has begun) and close: the
        connection cannot be trusted after."""
        self.closing = True
        resp = error_response(status, reason or wire.reason(status))
        with contextlib.suppress(Exception):
            body = await resp.body.read()
            head = wire.response_head(status, resp.headers + [("connection", "close")])
            await self.write(head + body)

    def _request(self, head: wire.RequestHead) -> tuple[str, str]:
        """(target, authority) of an h1 request: Host checked, absolute-form made
        origin-form (RFC 9112 3.2)."""
        hosts = [v for k, v in head.headers if k == "host"]
        if len(hosts) > 1:
            raise BadRequest("more than one Host header")
        if not hosts and head.version == "1.1":
            raise BadRequest("no Host header")
        target, authority = origin_form(head.method, head.target, hosts[0] if hosts else None)
        if authority is None:  # HTTP/1.0 without Host: the address it came to
            host = self.server[0]
            authority = f"[{host}]" if ":" in host else host
        return target, authority

    async def _serve(self, head: wire.RequestHead) -> bool:
        """Answer one request; True when the connection may carry the next one."""
        try:
            target, authority = self._request(head)
        except RequestError as exc:
            log.info("refused HTTP/1.1 request from %s: %s", self.client[0], exc.detail)
            await self._refuse(exc.status, exc.reason)
            return False
        pump: asyncio.Task[None] | None = None
        upgrade = head.version == "1.1" and wants_websocket(
            head.method, head.headers, head.framing == "none"
        )
        if upgrade:
            body = Body(on_consumed=self._consumed)  # fed once a 101 was sent
        elif head.framing == "none":
            body = Body.empty()
        else:
            body = Body(on_consumed=self._consumed)
            pump = asyncio.ensure_future(self._pump(head, body))
        req = Request(
            method=head.method,
            scheme=self.scheme,
            authority=authority,
            target=target,
            headers=[(k, v) for k, v in head.headers if k != "host"],
            protocol="HTTP/1.1",
            client=self.client,
            server=self.server,
            body=body,
            content_length=head.length,
            upgrade=WEBSOCKET if upgrade else None,
        )
        writer = _Writer(self, head, body, upgrade)
        try:
            await self.handler.exchange(req, writer)
        finally:
            if self.tunnel is not None:
                self.tunnel.cancel()
                await asyncio.wait([self.tunnel])
            if pump is not None and not pump.done():
                pump.cancel()
                self.closing = True  # body left unread: the connection cannot be reused
                await asyncio.wait([pump])  # its read ends before anyone else reads
        return writer.done and not self.closing

    def _consumed(self, size: int) -> None:
        self._room.set()

    async def pump_raw(self, body: Body) -> None:
        """A WebSocket's client bytes after the 101, as they come (the tunnel's idle timeout
        bounds the wait), held to ``_TUNNEL_HIGH_WATER`` while the backend lags."""
        try:
            while data := await self.reader.read(READ_SIZE):
                body.feed(data)
                while body.buffered > _TUNNEL_HIGH_WATER:
                    self._room.clear()
                    await self._room.wait()
            body.end()
        except (ConnectionError, OSError):
            body.abort(ConnectionError("client connection lost"))

    async def _pump(self, head: wire.RequestHead, body: Body) -> None:
        """Read the request body into ``body``, pausing while the consumer lags."""
        try:
            if head.expect_continue:
                await self.write(_CONTINUE)
            trailers: Headers = []
            async for data in wire.read_body(self.reader, head, self.timeouts.body, trailers):
                body.feed(data)
                while body.buffered > _HIGH_WATER:
                    self._room.clear()
                    await self._room.wait()
            body.trailers = trailers or None
            body.end()
            return
        except wire.Invalid as exc:
            body.abort(BadRequest(f"malformed request body: {exc}"))
        except asyncio.IncompleteReadError:
            body.abort(BadRequest("client closed the request body"))
        except TimeoutError:
            body.abort(RequestTimeout(f"request body stalled for {self.timeouts.body} s"))
        except (ConnectionError, OSError) as exc:
            body.abort(BadRequest(f"request body not received: {exc!r}"))
        self.closing = True
