"""Upstream HTTP/1.1 client: keep-alive connection pool, bodies streamed both ways."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

import h11

from ._config import UpstreamConfig
from ._errors import (
    ProxyError,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from ._h11io import next_event
from ._model import Body, Headers, Response

__all__ = ["UpstreamPool"]

_READ = 65536


class _Conn:
    """One upstream connection and its h11 state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
        self.reused = False
        self.slot: Callable[[], None] | None = None
        "Releases this connection's place under the connection caps."

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def next_event(self, timeout: float) -> h11.Event:
        try:
            return await next_event(self.h11, self.reader, timeout=timeout)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None

    def release_slot(self) -> None:
        """Give the connection's place under the caps back (once)."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot()

    def close(self) -> None:
        self.writer.close()
        self.release_slot()

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()


class _Slots:
    """A cap on open connections; ``wait`` returns when a place may have been freed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def free(self) -> bool:
        return self.used < self.limit

    def release(self) -> None:
        self.used -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class UpstreamPool:
    """Idle keep-alive connections per (host, port), up to ``pool_size`` each.

    Open connections are capped per member and in total; a request that finds
    no free place waits up to ``queue_timeout`` (an idle connection closed to
    make room counts as freed), then gets a 503."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self.connections_opened = 0
        "Upstream TCP connections opened so far (for metrics and tests)."
        self.total = _Slots(cfg.max_connections)
        self.members: dict[tuple[str, int], _Slots] = {}

    async def _take_slot(self, member: tuple[str, int]) -> Callable[[], None]:
        slots = self.members.get(member)
        if slots is None:
            slots = self.members[member] = _Slots(self.cfg.max_connections_per_member)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.queue_timeout
        while not (slots.free() and self.total.free()):
            if self._close_an_idle(member if not slots.free() else None):
                continue
            waiting = slots if not slots.free() else self.total
            try:
                await waiting.wait(max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise UpstreamBusy("too many upstream connections") from None
        slots.used += 1
        self.total.used += 1

        def release() -> None:
            slots.release()
            self.total.release()

        return release

    def _close_an_idle(self, member: tuple[str, int] | None) -> bool:
        """Close one idle connection (of ``member``, or of any) to free a place."""
        for key, idle in self._idle.items():
            if idle and (member is None or key == member):
                idle.pop(0).close()
                return True
        return False

    async def _connect(self, member: tuple[str, int]) -> _Conn:
        release = await self._take_slot(member)
        try:
            conn = await self._open(member)
        except BaseException:
            release()
            raise
        conn.slot = release
        return conn

    async def _open(self, member: tuple[str, int]) -> _Conn:
        host, port = member
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=_READ * 4), self.cfg.connect_timeout
            )
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {host}:{port} failed: {exc.strerror}") from None
        self.connections_opened += 1
        return _Conn(reader, writer)

    async def _acquire(self, member: tuple[str, int]) -> _Conn:
        idle = self._idle.get(member)
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.reused = True
                return conn
            conn.close()
        return await self._connect(member)

    def _release(self, member: tuple[str, int], conn: _Conn) -> None:
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            idle = self._idle.setdefault(member, [])
            if len(idle) < self.cfg.pool_size and conn.usable:
                idle.append(conn)
                return
        conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def request(
        self,
        member: tuple[str, int],
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
    ) -> Response:
        """Send one request; return the response with its body still streaming."""
        for attempt in (1, 2):
            conn = await self._acquire(member)
            try:
                return await self._exchange(
                    member, conn, (method, target, headers), body, content_length
                )
            except _Stale:
                conn.close()
                if attempt == 2:
                    raise UpstreamConnectError("upstream closed the connection") from None
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _exchange(
        self,
        member: tuple[str, int],
        conn: _Conn,
        head: tuple[str, str, Headers],
        body: Body,
        content_length: int | None,
    ) -> Response:
        method, target, headers = head
        framing: Headers = []
        if content_length is not None:
            framing = [("content-length", str(content_length))]
        elif not body.ended or body.buffered:
            framing = [("transfer-encoding", "chunked")]
        empty_body = content_length == 0 or (body.ended and not body.buffered)
        try:
            await conn.send(h11.Request(method=method, target=target, headers=headers + framing))
        except (ConnectionError, OSError):
            if conn.reused and empty_body:
                raise _Stale() from None
            raise UpstreamConnectError("upstream connection failed") from None
        if empty_body:
            return await self._exchange_no_body(member, conn)
        sender = asyncio.ensure_future(self._send_body(conn, body))
        reading = asyncio.ensure_future(self._read_head(conn))
        try:
            await asyncio.wait([sender, reading], return_when=asyncio.FIRST_COMPLETED)
            failed = sender.exception() if sender.done() else None
            if isinstance(failed, ProxyError):
                raise failed  # the client's body went wrong (too large, aborted)
            response = await reading  # an upstream that stopped reading may still answer
        except BaseException as exc:
            reading.cancel()
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            if isinstance(exc, _Stale) and not (conn.reused and empty_body):
                raise UpstreamConnectError("upstream closed the connection") from None
            raise
        return self._response(member, conn, response, sender)

    async def _exchange_no_body(self, member: tuple[str, int], conn: _Conn) -> Response:
        """The common case, without the two tasks a streamed body needs."""
        try:
            await conn.send(h11.EndOfMessage())
        except (ConnectionError, OSError):
            raise _Stale() from None
        response = await self._read_head(conn)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return self._response(member, conn, response, done)

    def _response(
        self,
        member: tuple[str, int],
        conn: _Conn,
        response: h11.Response,
        sender: asyncio.Future[None],
    ) -> Response:
        out: Headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in response.headers]
        length = None
        for k, v in out:
            if k == "content-length" and v.isdigit():
                length = int(v)
        stream = Body.from_iter(self._read_body(member, conn, sender))
        if response.status_code in (204, 304):
            length = None
        return Response(response.status_code, out, stream, length)

    async def _send_body(self, conn: _Conn, body: Body) -> None:
        async for chunk in body:
            await conn.send(h11.Data(data=chunk))
        await conn.send(h11.EndOfMessage())

    async def _read_head(self, conn: _Conn) -> h11.Response:
        while True:
            try:
                event = await conn.next_event(self.cfg.timeout)
            except h11.RemoteProtocolError as exc:
                raise UpstreamConnectError(f"invalid upstream response: {exc}") from None
            except (ConnectionError, OSError):
                raise _Stale() from None
            if isinstance(event, h11.ConnectionClosed):
                raise _Stale()
            if isinstance(event, h11.Response):
                return event
            # h11.InformationalResponse (100 Continue and the like) is skipped

    async def _read_body(
        self, member: tuple[str, int], conn: _Conn, sender: asyncio.Future[None]
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            while True:
                try:
                    event = await conn.next_event(self.cfg.timeout)
                except h11.RemoteProtocolError:
                    raise UpstreamTruncated(
                        "upstream response ended early or was malformed"
                    ) from None
                except (ConnectionError, OSError):
                    raise UpstreamTruncated("upstream connection lost mid-body") from None
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                    break
                else:
                    raise UpstreamTruncated("upstream closed mid-body")
        finally:
            if done and sender.done() and not sender.cancelled() and sender.exception() is None:
                self._release(member, conn)
            else:
                sender.cancel()
                conn.close()


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer."""
