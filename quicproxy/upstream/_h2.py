"""Upstream HTTP/2 client, on jh2: ``h2c://`` members (prior knowledge, no TLS) and
``https://`` members whose ALPN chose h2.

One connection carries many requests: a request takes a stream on a connection of
its member that has room under the server's MAX_CONCURRENT_STREAMS (and ours), else
a new connection is opened under the connection caps shared with HTTP/1.1
(:class:`~quicproxy.upstream._h1.UpstreamPool`). While one connection is being opened
for a member, other requests for it wait for that one instead of opening their own.

https members: the TLS connection is the HTTP/1.1 pool's (verification, SNI, mTLS, the
member's resumed session, the same failure reasons), offering h2 and http/1.1. Which
client a request goes to is :meth:`H2Pool.speaks_h2`: the member's ALPN choice, learned
from its first connection (concurrent first requests wait for that one) and again from
every new one. A connection the HTTP/1.1 pool opened that chose h2 is adopted here; one
opened here that chose http/1.1 goes idle into the HTTP/1.1 pool; either way the
request is handed back (:class:`AlpnChanged`) before anything of it was sent.

Flow control is end to end: a response body is a :class:`Body` whose ``on_consumed``
gives the backend WINDOW_UPDATE credit only for bytes the client has taken (at most
one stream window is ever held per response), and a request body is read from the
client only as the backend's window lets it go on. Trailers are carried both ways.

GOAWAY from the backend: jh2 closes its whole state machine on one, so GOAWAY frames
are taken out of the byte stream here. Streams at or below its last-stream-id go on
to their end; the connection takes no new ones and closes when they are done;
requests above it were not processed and are sent again on another connection when
none of their body was read yet. A connection lost mid-response ends the client's
stream with UpstreamTruncated (a reset), as on HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import jh2.config
import jh2.connection
import jh2.events
import jh2.exceptions
import jh2.settings
from jh2.errors import ErrorCodes

from .._config import UpstreamConfig
from .._errors import (
    BadRequest,
    BodyTooLarge,
    ProxyError,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTruncated,
)
from .._model import Body, Headers, Response, decimal
from ._h1 import UpstreamPool
from ._h1 import _Conn as H1Conn
from ._member import AlpnChanged, Member, ResumingContext, tls_failure

__all__ = ["H2Pool"]

log = logging.getLogger("quicproxy")

STREAM_WINDOW = 256 << 10
"Response bytes a backend may send on one stream ahead of the client's reading."
_CONN_WINDOW = 4 << 20
"Response bytes a backend may send on one connection ahead of the clients' reading."
_MAX_STREAMS = 256
"Streams per upstream connection at most, whatever the backend allows."
_REPLAY = 65536
"Request body bytes kept until the response head, to send again a request the backend refused."
_MAX_FRAME = 16384
_READ = 65536
_GOAWAY = 0x7
_LAST_STREAM_ID = (1 << 31) - 1


class _Refused(Exception):
    """The backend did not process the request (REFUSED_STREAM, above a GOAWAY): it may
    be sent again."""


class _Stream:
    def __init__(self, conn: _H2Conn, sid: int) -> None:
        self.sid = sid
        self.head: asyncio.Future[tuple[int, Headers]] = asyncio.get_running_loop().create_future()
        self.body = Body(on_consumed=lambda size: conn.credit(sid, size))
        self.body.on_close = lambda: conn.close_stream(sid)
        self.sender: asyncio.Task[None] | None = None
        self.sent = 0
        "Request body bytes taken from the client."
        self.replay: list[bytes] | None = []
        "What was taken, while at most _REPLAY bytes and no response head came; else None."
        self.request_ended = False
        self.response_ended = False
        self.deadline: asyncio.TimerHandle | None = None

    def fail(self, exc: BaseException) -> None:
        """Before the head: the request fails with ``exc``; after it: the body does."""
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here: the waiter may be gone already
        elif not self.response_ended:
            if isinstance(exc, _Refused):  # after a response head: it was processed
                exc = UpstreamTruncated("upstream refused the stream mid-response")
            self.body.abort(exc)
        if self.sender is not None:
            self.sender.cancel()
        if self.deadline is not None:
            self.deadline.cancel()


class _H2Conn:
    """One HTTP/2 connection to a backend."""

    def __init__(
        self,
        pool: H2Pool,
        member: Member,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ResumingContext | None = None,
    ) -> None:
        self.pool = pool
        self.member = member
        self.reader = reader
        self.writer = writer
        self.tls = tls
        "The member's TLS context (https), which keeps the session for the next connect."
        self.heard = False
        "Bytes came from the backend (a connection closed before any did may be a TLS"
        "refusal whose alert was lost)."
        self.failure: UpstreamConnectError | None = None
        "Why the connection failed before the backend's SETTINGS (a TLS alert), if known."
        config = jh2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = jh2.connection.H2Connection(config)
        self.h2.local_settings = jh2.settings.Settings(
            client=True,
            initial_values={
                jh2.settings.SettingCodes.ENABLE_PUSH: 0,
                jh2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                jh2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 256 << 10,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONN_WINDOW)
        self.streams: dict[int, _Stream] = {}
        self.goaway = False
        "The backend said GOAWAY: no new streams here."
        self.closed = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        "Resolved when the backend's SETTINGS came."
        self.release: object = None
        self._window = asyncio.Event()
        self._buffer = bytearray()
        loop = asyncio.get_running_loop()
        self._ready_timer = loop.call_later(pool.cfg.connect_timeout, self._not_ready)
        self._flush()
        self._reading = asyncio.ensure_future(self._run())

    def _not_ready(self) -> None:
        if not self.ready.done():
            self.failure = UpstreamConnectError(
                f"{self._name} did not answer as HTTP/2 in time", unsent=True
            )
            self.close()

    # ------------------------------------------------------------------ capacity

    def room(self) -> bool:
        """Can take one more stream now."""
        if self.goaway or self.closed or not self.ready.done():
            return False
        limit = min(self.h2.remote_settings.max_concurrent_streams, _MAX_STREAMS)
        return (
            len(self.streams) < limit and self.h2.highest_outbound_stream_id < _LAST_STREAM_ID - 2
        )

    # ------------------------------------------------------------------ one request

    async def exchange(
        self,
        head: tuple[str, str, str],
        headers: Headers,
        body: Body,
        limit: int,
        timeouts: tuple[float, float | None],
        te_trailers: bool,
    ) -> Response:
        """Send one request on a new stream; the response once its head came."""
        method, _scheme, target = head
        authority = ""
        fields: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == "host":
                authority = value
            else:
                fields.append((name.encode("latin-1"), value.encode("latin-1")))
        if te_trailers:
            fields.append((b"te", b"trailers"))
        pseudo = [
            (b":method", method.encode("latin-1")),
            (b":scheme", b"https" if self.member.scheme == "https" else b"http"),
            (b":authority", authority.encode("latin-1")),
            (b":path", target.encode("latin-1")),
        ]
        sid = self.h2.get_next_available_stream_id()
        bodiless = body.ended and body.trailers is None
        try:
            self.h2.send_headers(sid, pseudo + fields, end_stream=bodiless)
        except jh2.exceptions.TooManyStreamsError:
            raise _Refused() from None  # the backend lowered its limit meanwhile
        except jh2.exceptions.ProtocolError as exc:
            raise BadRequest(f"request not valid on HTTP/2: {exc}") from None
        stream = self.streams[sid] = _Stream(self, sid)
        stream.request_ended = bodiless
        self._flush()
        head_timeout, deadline = timeouts
        if deadline is not None:
            stream.deadline = asyncio.get_running_loop().call_later(deadline, self._expire, sid)
        if not bodiless:
            stream.sender = asyncio.ensure_future(self._send_body(stream, body, limit))
        try:
            async with asyncio.timeout(head_timeout):
                status, response_headers = await stream.head
        except TimeoutError:
            self.close_stream(sid)
            raise UpstreamTimeout("upstream did not answer in time") from None
        except _Refused:
            self.close_stream(sid)
            if stream.replay is None:
                raise UpstreamConnectError("upstream refused the request") from None
            body.unread(b"".join(stream.replay))  # sent again, from the start
            raise
        except BaseException:
            self.close_stream(sid)
            raise
        stream.replay = None
        length = next((decimal(v) for k, v in response_headers if k == "content-length"), None)
        return Response(status, response_headers, stream.body, length)

    async def _send_body(self, stream: _Stream, body: Body, limit: int) -> None:
        """The request body, as the backend's windows allow; then its trailers or END_STREAM.
        A read is only ever stopped while waiting (the Body keeps what it holds), so a
        refused request can be sent again with its body whole."""
        sid = stream.sid
        try:
            while chunk := await body.read():
                stream.sent += len(chunk)
                if stream.replay is not None:
                    if stream.sent <= _REPLAY and not stream.head.done():
                        stream.replay.append(chunk)
                    else:
                        stream.replay = None
                if limit and stream.sent > limit:
                    raise BodyTooLarge(f"request body over {limit} bytes")
                view = memoryview(chunk)
                while view:
                    if sid not in self.streams:
                        return
                    window = min(
                        self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
                    )
                    if window <= 0:
                        self._window.clear()
                        await self._window.wait()
                        continue
                    self.h2.send_data(sid, view[:window].tobytes())
                    view = view[window:]
                    self._flush()
                    await self.writer.drain()
            if sid not in self.streams:
                return
            trailers = body.trailers
            if trailers:
                self.h2.send_headers(sid, _encode(trailers), end_stream=True)
            else:
                self.h2.end_stream(sid)
            stream.request_ended = True
            self._flush()
        except (jh2.exceptions.H2Error, ConnectionError, OSError):
            return  # the backend closed its side, or the connection went
        except ProxyError as exc:  # the client's body: too large, stalled, malformed
            stream.fail(exc)
            self.close_stream(sid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client reset its stream
            stream.fail(UpstreamTruncated(f"request body failed: {exc}"))
            self.close_stream(sid)

    def _expire(self, sid: int) -> None:
        """The request's own deadline (grpc-timeout) passed."""
        stream = self.streams.get(sid)
        if stream is not None:
            stream.fail(UpstreamTimeout("request deadline (grpc-timeout) passed"))
            self.close_stream(sid)

    def credit(self, sid: int, size: int) -> None:
        """The client took ``size`` bytes of a response: the backend may send as many more."""
        if self.closed:
            return
        with contextlib.suppress(jh2.exceptions.H2Error):
            self.h2.acknowledge_received_data(size, sid)
            self._flush()

    def close_stream(self, sid: int) -> None:
        """Done with a stream: reset it if either half is still open."""
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        if stream.sender is not None:
            stream.sender.cancel()
        if stream.deadline is not None:
            stream.deadline.cancel()
        if not (stream.request_ended and stream.response_ended) and not self.closed:
            with contextlib.suppress(jh2.exceptions.H2Error):
                self.h2.reset_stream(sid, ErrorCodes.CANCEL)
            self._flush()
        self.pool.stream_done(self)

    # ------------------------------------------------------------------ input

    async def _run(self) -> None:
        try:
            while data := await self.reader.read(_READ):
                if not self._receive(data):
                    break
                self._flush()
        except ssl.SSLError as exc:  # an alert: TLS 1.3 refuses a client certificate here
            self.failure = UpstreamTlsError(f"TLS to {self._name} failed: {tls_failure(exc)}")
        except (ConnectionError, OSError):
            pass
        finally:
            self.close(UpstreamTruncated("upstream connection lost mid-response"))

    def _receive(self, data: bytes) -> bool:
        """Whole frames to jh2, except GOAWAY, handled here; False: close."""
        self.heard = True
        buf = self._buffer
        buf += data
        start = pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if length > _MAX_FRAME:
                log.warning("upstream %s sent an oversized HTTP/2 frame", self._name)
                return False
            end = pos + 9 + length
            if end > len(buf):
                break
            if buf[pos + 3] == _GOAWAY:
                if not self._feed(bytes(buf[start:pos])):
                    return False
                self._goaway(bytes(buf[pos + 9 : end]))
                start = end
            pos = end
        ok = self._feed(bytes(buf[start:pos]))
        del buf[:pos]
        return ok and not (self.goaway and not self.streams)

    def _feed(self, data: bytes) -> bool:
        if not data:
            return True
        try:
            events = self.h2.receive_data(data)
        except jh2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from upstream %s: %s", self._name, exc)
            return False
        for event in events:
            self._event(event)
        return True

    def _event(self, event: jh2.events.Event) -> None:
        if isinstance(event, jh2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
                self._ready_timer.cancel()
                self.remember_session()
            self._window.set()
            return
        if isinstance(event, jh2.events.WindowUpdated):
            self._window.set()
            return
        sid = getattr(event, "stream_id", None)
        stream = self.streams.get(sid) if sid else None
        if isinstance(event, jh2.events.DataReceived):
            if stream is None or stream.response_ended:
                self.credit(event.stream_id, event.flow_controlled_length)
                return
            stream.body.feed(event.data)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.credit(event.stream_id, padding)
            return
        if stream is None:
            return
        if isinstance(event, jh2.events.ResponseReceived):
            if not stream.head.done():
                status = int(_text(dict(event.headers).get(b":status", b"502")))
                stream.head.set_result((status, _decode(event.headers)))
        elif isinstance(event, jh2.events.TrailersReceived):
            stream.body.trailers = _decode(event.headers)
        elif isinstance(event, jh2.events.StreamEnded):
            stream.response_ended = True
            if stream.deadline is not None:
                stream.deadline.cancel()
            if not stream.head.done():
                stream.fail(
                    UpstreamConnectError(
                        "upstream ended the stream without a response", answered=True
                    )
                )
            stream.body.end()
            if stream.request_ended:
                self.streams.pop(stream.sid, None)
                self.pool.stream_done(self)
        elif isinstance(event, jh2.events.StreamReset):
            self.streams.pop(stream.sid, None)
            if event.error_code == ErrorCodes.REFUSED_STREAM:
                stream.fail(_Refused())
            elif not stream.head.done():
                stream.fail(UpstreamConnectError(f"upstream reset the stream ({event.error_code})"))
            else:
                stream.fail(UpstreamTruncated(f"upstream reset the stream ({event.error_code})"))
            self.pool.stream_done(self)

    def _goaway(self, payload: bytes) -> None:
        """The backend will take no new streams; those above ``last`` were not processed."""
        self.goaway = True
        last = int.from_bytes(payload[:4], "big") & _LAST_STREAM_ID if len(payload) >= 8 else 0
        code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else 0
        log.info("upstream %s sent GOAWAY (last stream %d, code %d)", self._name, last, code)
        for sid in [s for s in self.streams if s > last]:
            self.streams.pop(sid).fail(_Refused())
        self.pool.stream_done(self)

    # ------------------------------------------------------------------ output, life

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    @property
    def _name(self) -> str:
        return self.member.label

    def remember_session(self) -> None:
        if self.tls is not None and not self.writer.is_closing():
            self.tls.remember(self.writer.get_extra_info("ssl_object"))

    def _unready(self) -> UpstreamConnectError:
        """Why no SETTINGS came: a TLS alert, a fresh TLS connection closed after its
        handshake (a refused client certificate whose alert was lost), or not HTTP/2."""
        if self.failure is not None:
            return self.failure
        if self.tls is not None and not self.heard:
            return UpstreamTlsError(
                f"TLS to {self._name} failed: closed after the handshake without answering"
                " (client certificate required or refused?)"
            )
        return UpstreamConnectError(f"{self._name} did not answer as HTTP/2", unsent=True)

    def close(self, why: ProxyError | None = None) -> None:
        """Close the connection; streams still open fail with ``why``."""
        if self.closed:
            return
        self.closed = True
        self._ready_timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(self._unready())
            self.ready.exception()
        else:
            self.remember_session()
        for stream in list(self.streams.values()):
            if not stream.head.done():
                stream.fail(UpstreamConnectError("upstream connection lost"))
            else:
                stream.fail(why or UpstreamTruncated("upstream connection closed"))
        self.streams.clear()
        self._window.set()
        self._reading.cancel()
        self.writer.close()
        release, self.release = self.release, None
        if callable(release):
            release()
        self.pool.forget(self)


class H2Pool:
    """HTTP/2 connections per ``h2c://`` member, each shared by many requests."""

    def __init__(self, slots: UpstreamPool) -> None:
        self.slots = slots
        "The HTTP/1.1 pool, whose connection caps (per member, in total) these count under,"
        "whose TLS connections these use and which hands over those that chose h2."
        slots.on_h2 = self._adopt
        self.cfg: UpstreamConfig = slots.cfg
        self._conns: dict[Member, list[_H2Conn]] = {}
        self._opening: dict[Member, asyncio.Future[Exception | None]] = {}
        self._learning: dict[Member, asyncio.Future[Exception | None]] = {}
        "A member's first connection (https), and a new connection, being opened: those"
        "waiting for it share its failure (the connect is not tried once per waiter)."
        self._freed = asyncio.Event()
        "Set when a stream ends (room on a connection at the caps)."
        self.connections_opened = 0
        "Upstream HTTP/2 connections opened so far (for tests)."

    async def speaks_h2(self, member: Member) -> bool:
        """Whether ``member``'s requests go over HTTP/2: always for h2c, never for http;
        for https as its ALPN chose. Unknown yet: one request opens the first connection
        (kept by the client it chose) while the others for the member wait for it."""
        if member.scheme != "https":
            return member.scheme == "h2c"
        while (known := self.slots.alpn.get(member)) is None:
            learning = self._learning.get(member)
            if learning is not None:
                failed = await asyncio.shield(learning)
                if isinstance(failed, ProxyError):
                    raise _again(failed)  # the same failure, not one connect after another
                continue  # learned; or the one learning was cancelled and this one tries
            done = self._learning[member] = asyncio.get_running_loop().create_future()
            failure: Exception | None = None
            try:
                await self._conn(member)
            except AlpnChanged:
                pass  # http/1.1: the connection waits idle in the HTTP/1.1 pool
            except ProxyError as exc:
                failure = exc
                raise
            finally:
                del self._learning[member]
                done.set_result(failure)
        return known == "h2"

    async def request(
        self,
        member: Member,
        head: tuple[str, str, str],
        headers: Headers,
        body: Body,
        limit: int = 0,
        deadline: float | None = None,
        te_trailers: bool = False,
    ) -> Response:
        """Send one request (method, scheme, target); the response with its body streaming.

        ``body`` is the client's, read as the backend's window allows (a body over
        ``limit`` bytes, when set, fails with 413 before more goes), then its trailers.
        ``deadline``: the request's own time limit (its grpc-timeout), over the whole
        exchange; the wait for the response head is also bounded by ``upstream.timeout``.
        A request the backend refused unprocessed (REFUSED_STREAM, above a GOAWAY's
        last stream) is sent again on another connection, if at most 64 KiB of its
        body had been taken (kept until the response head for this)."""
        head_timeout = self.cfg.timeout if deadline is None else min(deadline, self.cfg.timeout)
        for attempt in range(3):
            conn = await self._conn(member)
            try:
                return await conn.exchange(
                    head, headers, body, limit, (head_timeout, deadline), te_trailers
                )
            except _Refused:
                if attempt == 2:
                    raise UpstreamConnectError("upstream refused the request") from None
        raise AssertionError("unreachable")

    async def _conn(self, member: Member) -> _H2Conn:
        """A connection with room for one more stream: one of the member's, else a new
        one; at the connection caps, the first stream to end (up to queue_timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.queue_timeout
        while True:
            conns = self._conns.get(member, ())
            for conn in conns:
                if conn.room():
                    return conn
            pending = next((c for c in conns if not (c.ready.done() or c.closed)), None)
            if pending is not None:  # handed over by the HTTP/1.1 pool, SETTINGS to come
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending.ready)
                continue
            opening = self._opening.get(member)
            if opening is not None:
                failed = await asyncio.shield(opening)
                if failed is not None:
                    raise _again(failed)  # the same failure, not one connect after another
                continue
            if self._conns.get(member) and not self._may_open(member):
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise UpstreamBusy("too many upstream connections") from None
                continue
            done = self._opening[member] = asyncio.get_running_loop().create_future()
            failure: Exception | None = None
            try:
                return await self._open(member)
            except (ProxyError, AlpnChanged) as exc:
                failure = exc
                raise
            finally:
                del self._opening[member]
                done.set_result(failure)

    def _may_open(self, member: Member) -> bool:
        slots = self.slots.members.get(member)
        return (slots is None or slots.free()) and self.slots.total.free()

    async def _open(self, member: Member) -> _H2Conn:
        """A new connection, ready (the backend's SETTINGS came). https: the HTTP/1.1
        pool's TLS connection; one that chose http/1.1 is left to that pool."""
        if member.scheme == "https":
            tls = await self.slots.connect(member)
            if tls.alpn != "h2":
                self.slots.keep(member, tls)
                raise AlpnChanged()
            conn = self._adopt(member, tls)
        else:
            conn = await self._open_h2c(member)
        try:
            await asyncio.shield(conn.ready)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open_h2c(self, member: Member) -> _H2Conn:
        release = await self.slots._take_slot(member)
        assert release is not None
        host, port = member.host, member.port
        try:
            try:
                async with asyncio.timeout(self.cfg.connect_timeout):
                    reader, writer = await asyncio.open_connection(host, port)
            except TimeoutError:
                raise UpstreamConnectError(
                    f"connect to {host}:{port} timed out", unsent=True
                ) from None
            except OSError as exc:
                raise UpstreamConnectError(
                    f"connect to {host}:{port} failed: {exc.strerror}", unsent=True
                ) from None
        except BaseException:
            release()
            raise
        return self._start(member, reader, writer, None, release)

    def _adopt(self, member: Member, tls: H1Conn) -> _H2Conn:
        """A TLS connection of the HTTP/1.1 pool that chose h2, and its place under the caps."""
        release, tls.slot = tls.slot, None
        return self._start(member, tls.reader, tls.writer, tls.tls, release)

    def _start(
        self,
        member: Member,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ResumingContext | None,
        release: object,
    ) -> _H2Conn:
        self.connections_opened += 1
        conn = _H2Conn(self, member, reader, writer, tls)
        conn.release = release
        self._conns.setdefault(member, []).append(conn)
        return conn

    def stream_done(self, conn: _H2Conn) -> None:
        """A stream of ``conn`` ended: close a connection no longer needed."""
        self._freed.set()
        if conn.streams or conn.closed:
            return
        if conn.goaway:
            conn.close()
            return
        conns = self._conns.get(conn.member, [])
        if sum(1 for c in conns if not c.streams and c.room()) > 1:
            conn.close()  # one idle connection per member is kept

    def forget(self, conn: _H2Conn) -> None:
        conns = self._conns.get(conn.member)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.member]

    async def aclose(self) -> None:
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()


def _again(exc: Exception) -> Exception:
    """A fresh copy of a connect failure, for each request that waited for that connect."""
    if isinstance(exc, ProxyError):
        copy = type(exc)(exc.detail, retry_safe=exc.retry_safe, unsent=exc.unsent)
        copy.echo = True
        return copy
    return type(exc)()


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _decode(fields: list[tuple[bytes, bytes]] | None) -> Headers:
    """Regular fields (pseudo-headers dropped) as text."""
    out: Headers = []
    for name, value in fields or []:
        key = _text(name)
        if not key.startswith(":"):
            out.append((key, _text(value)))
    return out


def _encode(fields: Headers) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("latin-1"), v.strip(" \t").encode("latin-1"))
        for k, v in fields
        if not k.startswith(":")
    ]
