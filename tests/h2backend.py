"""A real HTTP/2 server (h2c, prior knowledge) on the ``h2`` library, for the proxy's
``h2c://`` upstream tests; given an SSLContext, the same server behind TLS (an
``https://`` backend speaking only what its context's ALPN offers, h2 alone by the
tests' choice). It counts connections and concurrent streams, counts the response
bytes the proxy's windows let it send, and can send GOAWAY or die mid-body.

Paths: ``/hello``; ``/big?N`` (N bytes, sent as fast as flow control lets);
``/slow`` (answers after 0.3 s); ``/trailers`` (body then trailers ``x-checksum``);
``/echo`` (echoes the body as it comes, then the request trailers as response
trailers); ``/die`` (headers, 1 KiB, then the connection is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame


class H2Backend:
    def __init__(self, max_streams: int = 100, tls: ssl.SSLContext | None = None) -> None:
        self.max_streams = max_streams
        self.tls = tls
        self.alpn: list[str | None] = []
        "The protocol each TLS connection chose."
        self.resumed = 0
        "TLS connections that resumed a session."
        self.connections = 0
        self.streams_seen = 0
        self.max_concurrent = 0
        "Most streams open at once on one connection."
        self.sent = 0
        "Response body bytes sent (as flow control allowed)."
        self.ignored = 0
        "Streams left unprocessed after a GOAWAY (the client must send them again)."
        self.goaway_after: int | None = None
        "Send GOAWAY once this many streams were received on a connection."
        self.request_trailers: list[list[tuple[str, str]]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}"
        return f"h2c://127.0.0.1:{self.port}"

    async def start(self) -> H2Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    def drop(self) -> None:
        """Close every open connection (the proxy must open new ones)."""
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.alpn.append(tls.selected_alpn_protocol())
            self.resumed += bool(tls.session_reused)
        self.connections += 1
        self._writers.add(writer)
        conn = _Conn(self, reader, writer)
        try:
            await conn.run()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class _Conn:
    def __init__(
        self, backend: H2Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.b = backend
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        self.h2 = h2.connection.H2Connection(config)
        self.window = asyncio.Event()
        self.open: set[int] = set()
        self.bodies: dict[int, asyncio.Queue[bytes | None]] = {}
        self.trailers: dict[int, list[tuple[str, str]]] = {}
        self.goaway_last: int | None = None
        self.received = 0

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def run(self) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.b.max_streams},
        )
        self.h2.initiate_connection()
        self.flush()
        while data := await self.reader.read(65536):
            for event in self.h2.receive_data(data):
                self.event(event)
            self.flush()
            if self.goaway_last is not None and not self.open:
                break

    def event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            if self.goaway_last is not None and sid > self.goaway_last:
                self.b.ignored += 1
                return  # not processed: the client must send it again elsewhere
            self.received += 1
            self.b.streams_seen += 1
            self.open.add(sid)
            self.b.max_concurrent = max(self.b.max_concurrent, len(self.open))
            self.bodies[sid] = asyncio.Queue()
            if event.stream_ended:
                self.bodies[sid].put_nowait(None)
            headers = dict(event.headers)
            task = asyncio.ensure_future(self.answer(sid, headers))
            self.b._tasks.add(task)
            task.add_done_callback(self.b._tasks.discard)
            if self.b.goaway_after is not None and self.received >= self.b.goaway_after:
                if self.goaway_last is None:
                    self.goaway(sid)
        elif isinstance(event, h2.events.DataReceived):
            queue = self.bodies.get(event.stream_id)
            if queue is not None:
                queue.put_nowait(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers[event.stream_id] = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            queue = self.bodies.get(event.stream_id)
            if queue is not None:
                queue.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            self.open.discard(event.stream_id)
            queue = self.bodies.get(event.stream_id)
            if queue is not None:
                queue.put_nowait(None)
            self.window.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()

    def goaway(self, last: int) -> None:
        """GOAWAY written by hand: the h2 library would stop serving open streams."""
        self.goaway_last = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        self.flush()
        self.writer.write(frame.serialize())

    async def send(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if sid not in self.open:
                raise ConnectionError("stream reset")
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            self.h2.send_data(sid, view[:window].tobytes())
            self.b.sent += window if window < len(view) else len(view)
            view = view[window:]
            self.flush()
            await self.writer.drain()

    async def answer(self, sid: int, headers: dict[str, str]) -> None:
        path = headers.get(":path", "/")
        try:
            if path.startswith("/slow"):
                await asyncio.sleep(0.3)
            if path.startswith("/echo"):
                self.h2.send_headers(sid, [(":status", "200")])
                self.flush()
                while (chunk := await self.bodies[sid].get()) is not None:
                    await self.send(sid, chunk)
                trailers = self.trailers.get(sid, [])
                self.b.request_trailers.append(trailers)
                self.h2.send_headers(sid, [("x-echoed", "1"), *trailers], end_stream=True)
            elif path.startswith("/big"):
                size = int(path.split("?", 1)[1])
                self.h2.send_headers(sid, [(":status", "200"), ("content-length", str(size))])
                block = b"x" * 65536
                while size > 0:
                    await self.send(sid, block[: min(size, len(block))])
                    size -= len(block)
                self.h2.end_stream(sid)
            elif path.startswith("/trailers"):
                self.h2.send_headers(sid, [(":status", "200")])
                await self.send(sid, b"body")
                self.h2.send_headers(sid, [("x-checksum", "abc")], end_stream=True)
            elif path.startswith("/die"):
                self.h2.send_headers(sid, [(":status", "200")])
                await self.send(sid, b"d" * 1024)
                await asyncio.sleep(0.1)
                self.writer.transport.abort()
                return
            else:
                body = f"hello {path}".encode()
                self.h2.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                await self.send(sid, body)
                self.h2.end_stream(sid)
            self.flush()
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # h2 refusing a late frame: the stream was reset meanwhile
            if sid in self.open:
                raise exc
        finally:
            self.open.discard(sid)
            if self.goaway_last is not None and not self.open:
                self.writer.close()
