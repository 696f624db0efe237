"""Upstream HTTP/1.1 client: keep-alive connection pool, bodies streamed both ways (a
chunked response's trailers kept). Its connection caps also count the HTTP/2 upstream
connections of ``_h2.py``. The one keep-alive pool of the package: the WAF service
client (``waf/_client.py``) keeps its connections to the service in one too.

Connections are pooled per :class:`Member` (scheme, host, port, TLS profile);
https members are reached over verified TLS with one client context per member,
which offers the member's last session ticket to each new connection. The pool
remembers each https member's ALPN choice (``alpn``, learned from every new
connection): a new connection that chose h2 is handed to the HTTP/2 client
(``on_h2``) and the request with it (:class:`AlpnChanged`, nothing sent yet).
WebSocket tunnels dial with a second context per member offering http/1.1 alone.

The request head carries exactly one framing field, computed here (Content-Length when
the length is known, else chunked); the client's own are dropped (``_forward.FRAMING``).

A request is delivered at most once unless it is safe to repeat. An idle connection
is checked before it carries a request (closed, or readable: a FIN or stray bytes the
event loop has not taken yet) and dropped if the check fails: nothing was written, so
the next one is taken. Once a byte of the request was written, a connection that then
fails (a write error, or closed or reset before any byte of a response) may have
delivered it: a write to a socket the peer already closed can "succeed". The request is
then sent again, once, on a new connection, only when it is replayable: a safe method
(GET, HEAD, OPTIONS, TRACE; RFC 9110 9.2.1) without a body, on a reused keep-alive
connection (the race of a keep-alive the upstream closed as the request left). POST,
PATCH, PUT, DELETE, any other method, and every request with a body are never sent
twice: the client gets 502. PUT and DELETE are idempotent in RFC 9110 but are left out
on purpose, as nginx leaves POST/PATCH/LOCK: a second DELETE answers 404 for a delete
that happened, and backends commonly attach side effects to both. Errors carry the
decision as ``retry_safe`` (``_errors``). Whether a failed request goes to another
member is ``_retry``'s decision, on the same errors: a connect that failed is
``unsent`` (nothing written), a malformed response head is ``answered``. A caller that
vouches its request may be delivered twice gives its whole body as ``resend`` (the WAF
service client: a verdict is a pure function of the request); it then goes again on the
same terms as a safe bodiless request.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable

from .. import _h1wire as wire
from .._config import UpstreamConfig
from .._errors import (
    BadRequest,
    ConfigError,
    ProxyError,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTruncated,
)
from .._forward import without_framing
from .._model import Body, Headers, Response
from .._streamio import READ_SIZE, write_within
from ._member import (
    ALPN,
    TUNNEL_ALPN,
    AlpnChanged,
    Member,
    ResumingContext,
    client_context,
    tls_failure,
)

__all__ = ["UpstreamPool", "REPLAYABLE_METHODS"]

_SMALL = 65536
"A body whose every byte is here, up to this size, leaves in one write with the head."

REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"Methods whose bodiless request may be sent again after a keep-alive failed under it."


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
        tls_object = writer.get_extra_info("ssl_object") if tls is not None else None
        self.alpn: str | None = tls_object.selected_alpn_protocol() if tls_object else None
        "The protocol the TLS handshake chose (https), None when none was."
        self.reused = False
        "It carried an exchange before (a keep-alive): it may have gone stale."
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
                raise self.unanswered(UpstreamConnectError("upstream closed")) from None
            raise

    def tls_error(self, exc: ssl.SSLError) -> UpstreamTlsError:
        """A TLS alert after the handshake (TLS 1.3 refuses a client certificate here)."""
        return UpstreamTlsError(f"TLS to {self.label} failed: {tls_failure(exc)}")

    def unanswered(self, closed: UpstreamConnectError) -> UpstreamConnectError:
        """Closed before any answer: ``closed`` (maybe a stale keep-alive), or, on a fresh
        TLS connection, a TLS 1.3 refusal whose alert was lost to the close (the usual
        mTLS failure)."""
        if self.tls is None or self.reused:
            return closed
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

    def idle_intact(self) -> bool:
        """An idle connection still open, with nothing to read: a FIN, a reset or stray
        bytes already in the kernel (not yet seen by the event loop) make it unusable."""
        if not self.usable or self.reader.exception() is not None:
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        poll = select.poll()  # not select.select: descriptors above 1023 are common here
        try:
            poll.register(sock.fileno(), select.POLLIN)
            return not poll.poll(0)
        except (OSError, ValueError):
            return False


class _Slots:
    """A cap on open connections; ``wait`` returns when a place may have been freed or a
    connection went back idle (one waiter per event)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def free(self) -> bool:
        return self.used < self.limit

    def release(self) -> None:
        self.used -= 1
        self.wake()

    def wake(self) -> bool:
        """Wake the longest waiter, if any (True)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

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
        self._tls: dict[tuple[Member, bool], ResumingContext] = {}
        self.alpn: dict[Member, str] = {}
        "Each https member's protocol, as its last new connection chose: h2 or http/1.1."
        self.on_h2: Callable[[Member, _Conn], object] | None = None
        "Takes a new connection that chose h2 (the HTTP/2 client sets it)."
        self.closed = False
        "Closed (``aclose``): no connection goes idle any more."

    async def _take_slot(
        self, member: Member, deadline: float | None = None, idle_ok: bool = False
    ) -> Callable[[], None] | None:
        """A place under the caps for a new connection to ``member``, waiting until
        ``deadline`` (else ``queue_timeout`` from now), then UpstreamBusy. ``idle_ok``:
        None as soon as an idle connection of the member is there to take instead."""
        slots = self.members.get(member)
        if slots is None:
            slots = self.members[member] = _Slots(self.cfg.max_connections_per_member)
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.cfg.queue_timeout
        while not (slots.free() and self.total.free()):
            if idle_ok and self._idle.get(member):
                return None
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

    async def connect(self, member: Member) -> _Conn:
        """A new connection to ``member`` under the connection caps."""
        release = await self._take_slot(member)
        assert release is not None
        return await self._open_in(member, release)

    async def _open_in(self, member: Member, release: Callable[[], None]) -> _Conn:
        """A new connection in the place ``release`` gives back."""
        try:
            conn = await self._open(member)
        except BaseException:
            release()
            raise
        conn.slot = release
        return conn

    def _tls_context(self, member: Member, tunnel: bool) -> ResumingContext | None:
        """The member's client context (one per member and use: it holds its session)."""
        if member.tls is None:
            return None
        ctx = self._tls.get((member, tunnel))
        if ctx is None:
            try:
                alpn = TUNNEL_ALPN if tunnel else ALPN
                ctx = self._tls[member, tunnel] = client_context(member.tls, alpn=alpn)
            except ConfigError as exc:  # loaded at start; a file gone since
                raise UpstreamTlsError(f"TLS to {member.label}: {exc}") from None
        return ctx

    async def _open(self, member: Member, tunnel: bool = False) -> _Conn:
        host, port = member.host, member.port
        tls = self._tls_context(member, tunnel)
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
            raise UpstreamConnectError(
                f"connect to {member.label} timed out", unsent=True
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamTlsError(f"TLS to {member.label} failed: {tls_failure(exc)}") from None
        except OSError as exc:
            why = exc.strerror or ("closed in the TLS handshake" if tls else "closed")
            raise UpstreamConnectError(
                f"connect to {member.label} failed: {why}", unsent=True
            ) from None
        self.connections_opened += 1
        if tls is not None:
            tls_object = writer.get_extra_info("ssl_object")
            if tls_object is not None and tls_object.session_reused:
                self.tls_resumed += 1
        conn = _Conn(reader, writer, tls, member.label)
        if tls is not None and not tunnel:
            self.alpn[member] = conn.alpn or "http/1.1"
        return conn

    async def _acquire(self, member: Member) -> _Conn:
        """An idle connection of ``member``, else a new one; at the caps, whichever comes
        first within ``queue_timeout``: a place, or a connection going back idle."""
        deadline = asyncio.get_running_loop().time() + self.cfg.queue_timeout
        while True:
            idle = self._idle.get(member)
            while idle:
                conn = idle.pop()
                if conn.idle_intact():
                    return conn
                conn.close()
            release = await self._take_slot(member, deadline, idle_ok=True)
            if release is not None:
                return await self._open_in(member, release)

    def _idled(self, member: Member) -> None:
        """A connection of ``member`` went idle: a request waiting at the caps may take it
        (at the member's cap), or close it for room (at the total cap)."""
        slots = self.members.get(member)
        if not (slots is not None and slots.wake()):
            self.total.wake()

    def _http1(self, member: Member, conn: _Conn) -> _Conn:
        """``conn`` if it speaks HTTP/1.1; one that chose h2 goes to the HTTP/2 client."""
        if conn.alpn != "h2":
            return conn
        if self.on_h2 is None:
            conn.close()
            raise UpstreamConnectError(f"{member.label} chose h2, which this pool does not speak")
        self.on_h2(member, conn)
        raise AlpnChanged()

    def keep(self, member: Member, conn: _Conn) -> None:
        """A new connection not used yet, idle for the request that opened it (which
        takes it next, even at ``pool_size`` 0)."""
        conn.remember_session()
        if self.closed:
            conn.close()
        else:
            self._idle.setdefault(member, []).append(conn)
            self._idled(member)

    def _keep(self, member: Member, conn: _Conn, reused: bool = False) -> None:
        """A connection whose exchange ended cleanly: idle in the pool, or closed if full."""
        conn.reused = conn.reused or reused
        conn.remember_session()
        idle = self._idle.setdefault(member, [])
        if len(idle) < self.cfg.pool_size and conn.usable and not self.closed:
            idle.append(conn)
            self._idled(member)
        else:
            conn.close()

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their exchange ends."""
        self.closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def dial(self, member: Member) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection of its own to ``member``, never pooled and outside the connection
        caps (a WebSocket tunnel's: ``_tunnel.py`` caps those); TLS offers http/1.1 alone."""
        conn = await self._open(member, tunnel=True)
        return conn.reader, conn.writer

    async def request(
        self,
        member: Member,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
        resend: bytes | None = None,
    ) -> Response:
        """Send one request; return the response with its body still streaming.

        A request whose reused connection failed under it is sent once more on another
        connection when the error says that is safe (see the module's docstring).
        ``resend``: the whole body, given by a caller that vouches its request may be
        delivered twice whatever its method (the WAF client's ``POST /evaluate``, a pure
        function of its body); such a request is sent again from it."""
        if content_length and body.ended and not body.buffered:
            # h3 (qh3) lets a stream end short of its Content-Length: never send a head
            # that promises bytes which will not come.
            raise BadRequest("request body shorter than its Content-Length")
        for attempt in (1, 2):
            # a retry takes a new connection: another idle one may be as stale
            conn = await (self._acquire(member) if attempt == 1 else self.connect(member))
            conn = self._http1(member, conn)
            if attempt == 2 and resend is not None:
                body = Body.of(resend)
            try:
                return await self._exchange(
                    member,
                    conn,
                    (method, target, headers),
                    body,
                    content_length,
                    resend is not None,
                )
            except UpstreamConnectError as exc:
                conn.close()
                if attempt == 2 or not (exc.retry_safe and conn.reused):
                    raise
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
        idempotent: bool = False,
    ) -> Response:
        method, target, fields = head
        headers = without_framing(fields)  # the framing is ours alone, never the client's
        framing: Headers = []
        if content_length is not None:
            framing = [("content-length", str(content_length))]
        elif not body.ended or body.buffered:
            framing = [("transfer-encoding", "chunked")]
        empty_body = content_length == 0 or (body.ended and not body.buffered)
        replay = idempotent or (empty_body and method in REPLAYABLE_METHODS)
        request = wire.request_head(method, target, headers + framing)
        small = content_length is not None and 0 < content_length <= _SMALL
        small = small and body.complete and body.buffered == content_length
        if small:
            request += body.take_all()  # head and body in one write, no sender task
        try:
            await conn.write(request)
        except (ConnectionError, OSError):
            # Some of the head may have left: only a replayable request goes again.
            closed = UpstreamConnectError("upstream closed the connection", retry_safe=replay)
            raise closed from None
        if empty_body or small:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            answer = await self._read_head(conn, method, replay)
            return self._response(member, conn, answer, done)
        sender = asyncio.ensure_future(self._send_body(conn, body, content_length))
        reading = asyncio.ensure_future(self._read_head(conn, method, idempotent))
        try:
            await asyncio.wait([sender, reading], return_when=asyncio.FIRST_COMPLETED)
            failed = sender.exception() if sender.done() else None
            if isinstance(failed, ProxyError):
                raise failed  # the client's body went wrong (too large, aborted)
            response = await reading  # an upstream that stopped reading may still answer
        except BaseException:
            reading.cancel()
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            raise
        return self._response(member, conn, response, sender)

    def _response(
        self,
        member: Member,
        conn: _Conn,
        head: wire.ResponseHead,
        sender: asyncio.Future[None],
    ) -> Response:
        trailers: Headers = []
        body = self._read_body(member, conn, head, sender, trailers)
        stream = Body.from_iter(body, trailers)
        stream.on_close = lambda: _drop(body, conn, sender)
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

    async def _read_head(self, conn: _Conn, method: str, replay: bool) -> wire.ResponseHead:
        """The response head; a connection closed or reset before any byte of it is an
        error that is ``retry_safe`` when ``replay`` (the request may go again)."""
        closed = UpstreamConnectError("upstream closed the connection", retry_safe=replay)
        try:
            async with asyncio.timeout(self.cfg.timeout):
                return await wire.read_head(conn.reader, method)
        except TimeoutError:
            raise UpstreamTimeout("upstream did not answer in time") from None
        except wire.Invalid as exc:
            raise UpstreamConnectError(f"invalid upstream response: {exc}", answered=True) from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise conn.unanswered(closed) from None  # maybe a stale keep-alive
            raise UpstreamConnectError(
                "invalid upstream response: closed mid-head", answered=True
            ) from None
        except ssl.SSLError as exc:
            raise conn.tls_error(exc) from None
        except (ConnectionError, OSError):
            raise conn.unanswered(closed) from None

    async def _read_body(
        self,
        member: Member,
        conn: _Conn,
        head: wire.ResponseHead,
        sender: asyncio.Future[None],
        trailers: Headers,
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            try:
                async for data in wire.read_body(conn.reader, head, self.cfg.timeout, trailers):
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
                self._keep(member, conn, reused=True)
            else:
                sender.cancel()
                conn.close()


def _drop(body: AsyncIterator[bytes], conn: _Conn, sender: asyncio.Future[None]) -> None:
    """A response body closed by its consumer. Unless its generator ran to its end (its
    ``finally`` then kept or closed the connection), the connection is closed: never
    pooled mid-body. A generator closed before its first step (the client went away
    before the first read) never runs its ``finally``: without this the connection and
    its place under the caps were held for good."""
    if getattr(body, "ag_frame", None) is None:
        return  # ran to its end (or was closed): its own finally decided
    sender.cancel()
    conn.close()


def _sent(sender: asyncio.Future[None]) -> bool:
    return sender.done() and not sender.cancelled() and sender.exception() is None
