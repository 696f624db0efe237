"""HTTP/2 server adapter: h2 events to the request model, flow control honoured."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ._handler import Handler
from ._metrics import metrics
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request
from ._pseudo import request_from_pseudo, response_headers
from ._sockets import plain_addr

__all__ = ["H2Connection"]

log = logging.getLogger("quicproxy")
_READ = 65536
_STREAM_WINDOW = 1 << 20
_CONN_WINDOW = 16 << 20


class _Stream:
    def __init__(self, body: Body) -> None:
        self.body = body
        self.task: asyncio.Task[object] | None = None


class _Writer:
    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self.conn = conn
        self.sid = stream_id

    async def send_head(self, status: int, headers: Headers) -> None:
        self.conn.h2.send_headers(self.sid, response_headers(status, headers))
        await self.conn.flush()

    async def send_data(self, data: bytes) -> None:
        await self.conn.send_data(self.sid, data)

    async def send_end(self) -> None:
        self.conn.h2.end_stream(self.sid)
        await self.conn.flush()

    def abort(self) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.h2.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
        self.conn.flush_nowait()


class H2Connection:
    """One HTTP/2 client connection inside TLS."""

    def __init__(
        self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.handler = handler
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, _Stream] = {}
        self._window = asyncio.Event()
        self.client = plain_addr(writer.get_extra_info("peername"))
        self.server = plain_addr(writer.get_extra_info("sockname"))
        self.closing = False
        self._last_stream = 0

    # ------------------------------------------------------------------ output

    def flush_nowait(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def flush(self) -> None:
        self.flush_nowait()
        await self.writer.drain()

    async def send_data(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if sid not in self.streams:
                raise ConnectionError("stream reset by peer")
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            self.h2.send_data(sid, view[:window].tobytes())
            view = view[window:]
            await self.flush()

    @property
    def busy(self) -> bool:
        return bool(self.streams)

    def shutdown(self) -> None:
        """Graceful close: refuse new streams, GOAWAY once in-flight streams are done.

        GOAWAY waits for the connection to be idle because h2-based clients (httpx,
        httpcore) fail every open stream when a GOAWAY arrives, even streams the
        GOAWAY lets finish; refused streams are safe for any client to retry.
        """
        if self.closing:
            return
        self.closing = True
        if not self.streams:
            self._goaway()

    def _goaway(self) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_stream
        frame.error_code = 0
        self.flush_nowait()
        if not self.writer.is_closing():
            self.writer.write(frame.serialize())
        self.writer.close()

    # ------------------------------------------------------------------ input

    async def run(self) -> None:
        limits = self.handler.cfg.limits
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 128,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes * 4,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONN_WINDOW)
        try:
            await self.flush()
            while True:
                data = await self.reader.read(_READ)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.info("HTTP/2 protocol error from %s: %s", self.client[0], exc)
                    self.flush_nowait()
                    break
                for event in events:
                    self._dispatch(event)
                await self.flush()
                if self.closing and not self.streams:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            for stream in list(self.streams.values()):
                stream.body.abort(ConnectionError("client connection closed"))
                if stream.task is not None:
                    stream.task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if padding:
                self.h2.acknowledge_received_data(padding, event.stream_id)
            stream.body.feed(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body.end()
        elif isinstance(event, h2.events.StreamReset):
            metrics.stream_resets.labels("h2").inc()
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.body.abort(ConnectionError("stream reset by client"))
            self._window.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.closing:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        self._last_stream = max(self._last_stream, sid)
        raw = [(str(k), str(v)) for k, v in (event.headers or [])]
        body = Body(on_consumed=lambda n: self._consumed(sid, n))
        stream = _Stream(body)
        self.streams[sid] = stream
        try:
            req = request_from_pseudo(raw, "HTTP/2", self.client, self.server, body)
        except ValueError as exc:
            req = None
            log.info("bad HTTP/2 request from %s: %s", self.client[0], exc)
        if event.stream_ended is not None:
            body.end()
        if req is None:
            self.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            del self.streams[sid]
            return
        stream.task = asyncio.ensure_future(self._exchange(sid, req))

    def _consumed(self, sid: int, size: int) -> None:
        if sid in self.streams:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.acknowledge_received_data(size, sid)
                self.flush_nowait()

    async def _exchange(self, sid: int, req: Request) -> None:
        try:
            await self.handler.exchange(req, _Writer(self, sid))
            if not req.body.ended and sid in self.streams:
                # Answered before the whole request body came: take the rest (bounded),
                # then stop the upload if it is still going.
                if not await req.body.discard(DISCARD_SECONDS, DISCARD_BYTES):
                    with contextlib.suppress(h2.exceptions.H2Error):
                        self.h2.reset_stream(sid, ErrorCodes.NO_ERROR)
                    self.flush_nowait()
        except (ConnectionError, OSError, h2.exceptions.H2Error):
            pass
        finally:
            self.streams.pop(sid, None)
            if self.closing and not self.streams:
                self._goaway()
