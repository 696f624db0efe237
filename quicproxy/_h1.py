"""HTTP/1.1 server adapter: h11 events to the request model, over asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus

import h11

from ._errors import BadRequest, RequestError, RequestTimeout, VersionNotSupported
from ._h11io import READ_SIZE, next_event, read_within, write_within
from ._handler import Handler, error_response
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request, header_value
from ._sockets import plain_addr
from ._target import origin_form

__all__ = ["H1Connection"]

log = logging.getLogger("quicproxy")
_HIGH_WATER = 1 << 20
_VERSIONS = (b"1.0", b"1.1")


class _Writer:
    """A response's bytes to the connection. The head is held until the first body bytes
    (or the end) so a small response leaves in one write, one TLS record and one system
    call; it is written at the end of the event-loop turn if nothing follows at once."""

    def __init__(self, conn: H1Connection, body: Body) -> None:
        self.conn = conn
        self.body = body
        self._held = b""
        self._flush: asyncio.Handle | None = None

    async def send_head(self, status: int, headers: Headers) -> None:
        if not self.body.ended:
            # Answering before the whole body came: no keep-alive, and a lingering close.
            self.conn.closing = self.conn.linger = True
        if self.conn.closing:
            headers = [(k, v) for k, v in headers if k != "connection"] + [("connection", "close")]
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        event = h11.Response(status_code=status, headers=headers, reason=reason)
        self._held = self.conn.h11.send(event) or b""
        self._flush = asyncio.get_running_loop().call_soon(self._write_held)

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
            await self.conn.write(data)

    async def send_data(self, data: bytes) -> None:
        await self._send(self.conn.h11.send(h11.Data(data=data)) or b"")

    async def send_end(self) -> None:
        await self._send(self.conn.h11.send(h11.EndOfMessage()) or b"")

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
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=handler.cfg.limits.max_header_bytes
        )
        self.timeouts = handler.cfg.timeouts
        self.accepted = asyncio.get_running_loop().time()
        self.client = plain_addr(writer.get_extra_info("peername"))
        self.server = plain_addr(writer.get_extra_info("sockname"))
        self.closing = False
        self.linger = False
        "Discard unread request data before closing, so the client can read our answer."
        self.busy = False
        self._room = asyncio.Event()
        self._room.set()

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.write(data)

    async def write(self, data: bytes) -> None:
        await write_within(self.writer, data, self.timeouts.send)

    async def _next_request(self, first: bool) -> h11.Event:
        """The next request head: the keep-alive wait for its first byte is bounded
        by the idle timeout, the whole head by the header deadline (from the first
        byte, or from the accept for the first request), however slowly it trickles."""
        loop = asyncio.get_running_loop()
        if first:
            deadline = self.accepted + self.timeouts.header
        else:
            if not self.h11.trailing_data[0]:
                data = await read_within(self.reader, READ_SIZE, self.timeouts.idle)
                self.h11.receive_data(data)
            deadline = loop.time() + self.timeouts.header
        try:
            return await next_event(self.h11, self.reader, deadline=deadline)
        except TimeoutError:
            if self.h11.trailing_data[0]:
                raise RequestTimeout("request head not received in time") from None
            raise

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
                    event = await self._next_request(first)
                except h11.RemoteProtocolError as exc:
                    log.info("bad HTTP/1.1 request from %s: %s", self.client[0], exc)
                    await self._refuse(exc.error_status_hint, "")
                    break
                except RequestTimeout as exc:
                    await self._refuse(exc.status, exc.reason)
                    break
                first = False
                if not isinstance(event, h11.Request):
                    break  # ConnectionClosed, or nothing more to read
                self.busy = True
                await self._serve(event)
                self.busy = False
                if self.closing or self.h11.our_state is not h11.DONE:
                    break
                if self.h11.their_state is not h11.DONE:
                    break  # request body not read to its end: no keep-alive
                self.h11.start_next_cycle()
        except (TimeoutError, ConnectionError, OSError, h11.LocalProtocolError):
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
        """Answer an unusable request and close (the connection cannot be trusted after)."""
        self.closing = True
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if not reason:
            reason = {431: "Request Header Fields Too Large"}.get(status, "Bad Request")
        resp = error_response(status, reason)
        with contextlib.suppress(Exception):
            headers = resp.headers + [("connection", "close")]
            await self.send(h11.Response(status_code=status, headers=headers))
            await self.send(h11.Data(data=await resp.body.read()))
            await self.send(h11.EndOfMessage())

    def _request(self, event: h11.Request, headers: Headers) -> tuple[str, str]:
        """(target, authority) of an h1 request: framing and version checked,
        absolute-form made origin-form (RFC 9112 3.2, 6.1)."""
        if event.http_version not in _VERSIONS:
            raise VersionNotSupported(f"HTTP/{event.http_version.decode()}")
        names = [k for k, _ in headers]
        if "transfer-encoding" in names and "content-length" in names:
            raise BadRequest("Content-Length and Transfer-Encoding together")
        if names.count("host") > 1:
            raise BadRequest("more than one Host header")
        target, authority = origin_form(
            event.method.decode("latin-1"),
            event.target.decode("latin-1"),
            header_value(headers, "host"),
        )
        if authority is None:  # HTTP/1.0 without Host: the address it came to
            host = self.server[0]
            authority = f"[{host}]" if ":" in host else host
        return target, authority

    async def _serve(self, event: h11.Request) -> None:
        headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers]
        try:
            target, authority = self._request(event, headers)
        except RequestError as exc:
            log.info("refused HTTP/1.1 request from %s: %s", self.client[0], exc.detail)
            await self._refuse(exc.status, exc.reason)
            return
        length = header_value(headers, "content-length")
        chunked = header_value(headers, "transfer-encoding") is not None
        pump: asyncio.Task[None] | None = None
        if length is None and not chunked:
            body = Body.empty()
            self.h11.next_event()  # the EndOfMessage h11 has ready for a body-less request
        else:
            body = Body(on_consumed=self._consumed)
            pump = asyncio.ensure_future(self._pump(body))
        req = Request(
            method=event.method.decode(),
            scheme=self.scheme,
            authority=authority,
            target=target,
            headers=[(k, v) for k, v in headers if k != "host"],
            protocol="HTTP/1.1",
            client=self.client,
            server=self.server,
            body=body,
            content_length=int(length) if length is not None and length.isdigit() else None,
        )
        try:
            await self.handler.exchange(req, _Writer(self, body))
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                self.closing = True  # body left unread: the connection cannot be reused
                await asyncio.wait([pump])  # its read ends before anyone else reads

    def _consumed(self, size: int) -> None:
        self._room.set()

    async def _pump(self, body: Body) -> None:
        """Read the request body into ``body``, pausing while the consumer lags."""
        try:
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            while True:
                while body.buffered > _HIGH_WATER:
                    self._room.clear()
                    await self._room.wait()
                event = await next_event(self.h11, self.reader, timeout=self.timeouts.body)
                if isinstance(event, h11.Data):
                    body.feed(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    body.end()
                    return
                else:
                    body.abort(BadRequest("client closed the request body"))
                    return
        except h11.ProtocolError as exc:
            body.abort(BadRequest(f"malformed request body: {exc}"))
        except TimeoutError:
            body.abort(RequestTimeout(f"request body stalled for {self.timeouts.body} s"))
        except (ConnectionError, OSError) as exc:
            body.abort(BadRequest(f"request body not received: {exc!r}"))
