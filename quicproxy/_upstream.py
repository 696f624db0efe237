"""Upstream HTTP/1.1 client: keep-alive connection pool, bodies streamed both ways.

Connections are pooled per :class:`Member` (scheme, host, port, TLS profile);
https members are reached over verified TLS with one client context per member,
which offers the member's last session ticket to each new connection."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable

from . import _h1wire as wire
from ._config import UpstreamConfig
from ._errors import (
    BadRequest,
    ConfigError,
    ProxyError,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTruncated,
)
from ._member import Member, ResumingContext, client_context, tls_failure
from ._model import Body, Headers, Response
from ._streamio import READ_SIZE, write_within

__all__ = ["UpstreamPool"]


class _Conn:
    """One upstream connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ResumingContext | None = None,
        label: str = "",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls
        "The member's TLS context (https), which keeps the session for the next connect."
        self.label = label
        "The member, as logs show it."
        self.reused = False
        self.wrote = False
        self.slot: Callable[[], None] | None = None
        "Releases this connection's place under the connection caps."

    async def write(self, data: bytes) -> None:
        first, self.wrote = not self.wrote, True
        try:
            await write_within(self.writer, data)
        except ssl.SSLError as exc:
            raise self.tls_error(exc) from None
        except (ConnectionError, OSError):
            if first and self.tls is not None and not self.reused:
                raise self.unanswered() from None  # reset right after the handshake
            raise

    def tls_error(self, exc: ssl.SSLError) -> UpstreamTlsError:
        """A TLS alert after the handshake (TLS 1.3 refuses a client certificate here)."""
        return UpstreamTlsError(f"TLS to {self.label} failed: {tls_failure(exc)}")

    def unanswered(self) -> Exception:
        """Closed before any answer: a stale keep-alive, or, on a fresh TLS connection,
        a TLS 1.3 refusal whose alert was lost to the close (the usual mTLS failure)."""
        if self.tls is None or self.reused:
            return _Stale()
        return UpstreamTlsError(
            f"TLS to {self.label} failed: closed after the handshake without answering"
            " (client certificate required or refused?)"
        )

    def release_slot(self) -> None:
        """Give the connection's place under the caps back (once)."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot()

    def remember_session(self) -> None:
        if self.tls is not None:
            self.tls.remember(self.writer.get_extra_info("ssl_object"))

    def close(self) -> None:
        self.remember_session()
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
    """Idle keep-alive connections per member, up to ``pool_size`` each.

    Open connections are capped per member and in total; a request that finds
    no free place waits up to ``queue_timeout`` (an idle connection closed to
    make room counts as freed), then gets a 503."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self._idle: dict[Member, list[_Conn]] = {}
        self.connections_opened = 0
        "Upstream TCP connections opened so far (for metrics and tests)."
        self.tls_resumed = 0
        "TLS connections that resumed the member's previous session (for tests)."
        self.total = _Slots(cfg.max_connections)
        self.members: dict[Member, _Slots] = {}
        self._tls: dict[Member, ResumingContext] = {}

    async def _take_slot(self, member: Member) -> Callable[[], None]:
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

    def _close_an_idle(self, member: Member | None) -> bool:
        """Close one idle connection (of ``member``, or of any) to free a place."""
        for key, idle in self._idle.items():
            if idle and (member is None or key == member):
                idle.pop(0).close()
                return True
        return False

    async def _connect(self, member: Member) -> _Conn:
        release = await self._take_slot(member)
        try:
            conn = await self._open(member)
        except BaseException:
            release()
            raise
        conn.slot = release
        return conn

    def _tls_context(self, member: Member) -> ResumingContext | None:
        """The member's client context (one per member: it holds its session)."""
        if member.tls is None:
            return None
        ctx = self._tls.get(member)
        if ctx is None:
            try:
                ctx = self._tls[member] = client_context(member.tls)
            except ConfigError as exc:  # loaded at start; a file gone since
                raise UpstreamTlsError(f"TLS to {member.label}: {exc}") from None
        return ctx

    async def _open(self, member: Member) -> _Conn:
        host, port = member.host, member.port
        tls = self._tls_context(member)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    limit=READ_SIZE * 4,
                    ssl=tls,
                    server_hostname=member.server_name if tls else None,
                    ssl_handshake_timeout=self.cfg.connect_timeout if tls else None,
                ),
                self.cfg.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {member.label} timed out") from None
        except ssl.SSLError as exc:
            raise UpstreamTlsError(f"TLS to {member.label} failed: {tls_failure(exc)}") from None
        except OSError as exc:
            why = exc.strerror or ("closed in the TLS handshake" if tls else "closed")
            raise UpstreamConnectError(f"connect to {member.label} failed: {why}") from None
        self.connections_opened += 1
        if tls is not None:
            tls_object = writer.get_extra_info("ssl_object")
            if tls_object is not None and tls_object.session_reused:
                self.tls_resumed += 1
        return _Conn(reader, writer, tls, member.label)

    async def _acquire(self, member: Member) -> _Conn:
        idle = self._idle.get(member)
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.reused = True
                return conn
            conn.close()
        return await self._connect(member)

    def _keep(self, member: Member, conn: _Conn) -> None:
        """A connection whose exchange ended cleanly: idle in the pool, or closed if full."""
        conn.remember_session()
        idle = self._idle.setdefault(member, [])
        if len(idle) < self.cfg.pool_size and conn.usable:
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def dial(self, member: Member) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection of its own to ``member``, never pooled and outside the connection
        caps (a WebSocket tunnel's: ``_tunnel.py`` caps those)."""
        conn = await self._open(member)
        return conn.reader, conn.writer

    async def request(
        self,
        member: Member,
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
        member: Member,
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
            await conn.write(wire.request_head(method, target, headers + framing))
        except (ConnectionError, OSError):
            if conn.reused and empty_body:
                raise _Stale() from None
            raise UpstreamConnectError("upstream connection failed") from None
        if empty_body:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return self._response(member, conn, await self._read_head(conn, method), done)
        sender = asyncio.ensure_future(self._send_body(conn, body, content_length))
        reading = asyncio.ensure_future(self._read_head(conn, method))
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

    def _response(
        self,
        member: Member,
        conn: _Conn,
        head: wire.ResponseHead,
        sender: asyncio.Future[None],
    ) -> Response:
        stream = Body.from_iter(self._read_body(member, conn, head, sender))
        return Response(head.status, head.headers, stream, head.length)

    async def _send_body(self, conn: _Conn, body: Body, content_length: int | None) -> None:
        """The request body, chunked when its length is unknown; a body that does not
        match its Content-Length is the client's error (400) and is cut there."""
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if content_length is None:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            elif sent > content_length:
                raise BadRequest("request body longer than its Content-Length")
            else:
                await conn.write(chunk)
        if content_length is None:
            await conn.write(b"0\r\n\r\n")
        elif sent != content_length:
            raise BadRequest("request body shorter than its Content-Length")

    async def _read_head(self, conn: _Conn, method: str) -> wire.ResponseHead:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                return await wire.read_head(conn.reader, method)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except wire.Invalid as exc:
            raise UpstreamConnectError(f"invalid upstream response: {exc}") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise conn.unanswered() from None  # closed before answering: a stale keep-alive
            raise UpstreamConnectError("invalid upstream response: closed mid-head") from None
        except ssl.SSLError as exc:
            raise conn.tls_error(exc) from None
        except (ConnectionError, OSError):
            raise conn.unanswered() from None

    async def _read_body(
        self,
        member: Member,
        conn: _Conn,
        head: wire.ResponseHead,
        sender: asyncio.Future[None],
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            try:
                async for data in wire.read_body(conn.reader, head, self.cfg.timeout):
                    yield data
            except TimeoutError:
                raise UpstreamTimeout("upstream did not answer in time") from None
            except (wire.Invalid, asyncio.IncompleteReadError):
                raise UpstreamTruncated("upstream response ended early or was malformed") from None
            except (ConnectionError, OSError):
                raise UpstreamTruncated("upstream connection lost mid-body") from None
            done = True
        finally:
            if done and head.keep_alive and _sent(sender):
                self._keep(member, conn)
            else:
                sender.cancel()
                conn.close()


def _sent(sender: asyncio.Future[None]) -> bool:
    return sender.done() and not sender.cancelled() and sender.exception() is None


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer."""
