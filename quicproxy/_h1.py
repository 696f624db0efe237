"""HTTP/1.1 server adapter: h11 events to the request model, over asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus

import h11

from ._errors import BadRequest
from ._handler import Handler
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request, header_value
from ._sockets import plain_addr

__all__ = ["H1Connection"]

log = logging.getLogger("quicproxy")
_READ = 65536
_HIGH_WATER = 1 << 20
_KEEPALIVE_TIMEOUT = 75.0


class _Writer:
    def __init__(self, conn: H1Connection, body: Body) -> None:
        self.conn = conn
        self.body = body

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
        await self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason))

    async def send_data(self, data: bytes) -> None:
        await self.conn.send(h11.Data(data=data))

    async def send_end(self) -> None:
        await self.conn.send(h11.EndOfMessage())

    def abort(self) -> None:
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
            self.writer.write(data)
            await self.writer.drain()

    async def _next_event(self, timeout: float | None = None) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await asyncio.wait_for(self.reader.read(_READ), timeout)
            self.h11.receive_data(data)

    def shutdown(self) -> None:
        """Graceful close: now if idle, else after the response in progress."""
        self.closing = True
        if not self.busy:
            self.writer.close()

    async def run(self) -> None:
        try:
            while not self.closing:
                try:
                    event = await self._next_event(_KEEPALIVE_TIMEOUT)
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(exc)
                    break
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
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _discard_rest(self) -> None:
        """Read and drop what the client still sends (bounded in time and size):
        closing with unread data makes the kernel reset the connection, and the
        client would lose the response it has not read yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DISCARD_SECONDS
        left = DISCARD_BYTES
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            while left > 0:
                data = await asyncio.wait_for(self.reader.read(_READ), deadline - loop.time())
                if not data:
                    break
                left -= len(data)

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        text = {431: "Request Header Fields Too Large"}.get(status, "Bad Request")
        body = f"{status} {text}\n".encode()
        headers = [
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        with contextlib.suppress(Exception):
            await self.send(h11.Response(status_code=status, headers=headers))
            await self.send(h11.Data(data=body))
            await self.send(h11.EndOfMessage())

    async def _serve(self, event: h11.Request) -> None:
        headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers]
        authority = header_value(headers, "host") or self.server[0]
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
            target=event.target.decode("latin-1"),
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
                event = await self._next_event(self.handler.cfg.upstream.timeout)
                if isinstance(event, h11.Data):
                    body.feed(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    body.end()
                    return
                else:
                    body.abort(BadRequest("client closed the request body"))
                    return
        except h11.RemoteProtocolError as exc:
            body.abort(BadRequest(f"malformed request body: {exc}"))
        except (TimeoutError, ConnectionError, OSError) as exc:
            body.abort(BadRequest(f"request body not received: {exc!r}"))
