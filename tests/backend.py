"""A real HTTP/1.1 backend for tests (asyncio + h11), separate from the proxy's code.

Paths: /bytes/N (N bytes of a repeating pattern), /sha256 (hash of the request
body), /echo (body back, streamed), /headers (JSON of request headers),
/slow?s=SECONDS, /status/N, /drop (read the request, then drop the connection without
an answer), /healthz (``health_status``), anything else: a small text body naming the
backend. ``delay`` holds every answer back; :meth:`Backend.kill` drops the listener and
every open connection, :meth:`Backend.start` again brings it back on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from urllib.parse import parse_qs, urlsplit

import h11

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size: int) -> bytes:
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


class Backend:
    def __init__(self, name: str = "backend") -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.port = 0
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.connections = 0
        self.open_now = 0
        self.open_max = 0
        "Connections open at once, now and at most (for connection-cap tests)."
        self.slow_now = 0
        self.slow_max = 0
        "Requests for /slow in progress at once, now and at most."
        self.delay = 0.0
        "Seconds every request waits before it is answered."
        self.health_status = 200
        "Status of /healthz."
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def count(self, path: str, method: str | None = None) -> int:
        """Requests received for ``path`` (and ``method``)."""
        return sum(
            1
            for m, target, _ in self.requests
            if urlsplit(target).path == path and method in (None, m)
        )

    async def kill(self) -> None:
        """Stop listening and drop every open connection (a process killed)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> h11.Event:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                    continue
                return event

        async def send(event: h11.Event) -> None:
            writer.write(conn.send(event) or b"")
            await writer.drain()

        try:
            while True:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    break
                await self._serve(event, next_event, send, writer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self.open_now -= 1
            writer.close()

    async def _serve(self, req: h11.Request, next_event, send, writer) -> None:  # type: ignore[no-untyped-def]
        target = req.target.decode()
        headers = [(k.decode().lower(), v.decode("utf-8", "replace")) for k, v in req.headers]
        self.requests.append((req.method.decode(), target, headers))
        parts = urlsplit(target)
        path = parts.path
        query = parse_qs(parts.query)
        if self.delay:
            await asyncio.sleep(self.delay)

        async def body_chunks():  # type: ignore[no-untyped-def]
            while True:
                event = await next_event()
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                else:
                    return

        async def respond(status: int, data: bytes, ctype: str = "text/plain") -> None:
            await send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("content-type", ctype),
                        ("content-length", str(len(data))),
                        ("connection", "keep-alive"),
                        ("keep-alive", "timeout=5"),
                        ("x-backend", self.name),
                    ],
                )
            )
            await send(h11.Data(data=data))
            await send(h11.EndOfMessage())

        if path == "/echo":
            await send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/octet-stream"),
                        ("x-backend", self.name),
                    ],
                )
            )
            async for chunk in body_chunks():
                await send(h11.Data(data=chunk))
            await send(h11.EndOfMessage())
            return
        if path.startswith("/abort/"):  # promise N bytes, send `after`, then drop the connection
            n, after = int(path[7:]), int(query.get("after", ["0"])[0])
            head = [("content-type", "application/octet-stream"), ("content-length", str(n))]
            await send(h11.Response(status_code=200, headers=head))
            await send(h11.Data(data=pattern_bytes(after)))
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return
        if path == "/stall":  # wait before reading the request body at all
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # little kernel slack
            await asyncio.sleep(float(query.get("s", ["1"])[0]))
        digest = hashlib.sha256()
        size = 0
        async for chunk in body_chunks():
            digest.update(chunk)
            size += len(chunk)
        if path == "/drop":
            writer.transport.abort()
            return
        if path == "/healthz":
            await respond(self.health_status, b"health")
        elif path in ("/sha256", "/stall"):
            await respond(
                200,
                json.dumps({"sha256": digest.hexdigest(), "size": size}).encode(),
                "application/json",
            )
        elif path.startswith("/bytes/"):
            n = int(path[7:])
            await send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/octet-stream"),
                        ("content-length", str(n)),
                        ("x-backend", self.name),
                    ],
                )
            )
            sent = 0
            while sent < n:
                part = PATTERN[: min(len(PATTERN), n - sent)]
                await send(h11.Data(data=part))
                sent += len(part)
            await send(h11.EndOfMessage())
        elif path == "/headers":
            await respond(200, json.dumps(headers).encode(), "application/json")
        elif path == "/slow":
            self.slow_now += 1
            self.slow_max = max(self.slow_max, self.slow_now)
            try:
                await asyncio.sleep(float(query.get("s", ["1"])[0]))
            finally:
                self.slow_now -= 1
            await respond(200, b"slow done")
        elif path.startswith("/status/"):
            await respond(int(path[8:]), b"status")
        else:
            await respond(200, f"hello from {self.name} {path}".encode())
