"""Request streams of one multiplexed connection, for HTTP/2 and HTTP/3 alike.

The life of a stream is written once here: admit a request (or refuse it while
draining), give body credit back as the proxy consumes it, cancel the upstream
request at once when the client cancels the stream (a reset, or an h3
STOP_SENDING: normal traffic, see ``Handler.exchange``), count resets of streams
whose response body has not begun and answer abuse (CVE-2023-44487, "rapid reset") by closing the
connection, signal a truncated response with a stream reset, and drain an unread
body after an early answer. The h2 and h3 adapters only translate their
protocol's events into calls on :class:`Streams` and implement :class:`StreamOps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ._errors import ClientGone, ProxyError
from ._handler import Handler
from ._metrics import metrics
from ._model import DISCARD_BYTES, DISCARD_SECONDS, Body, Headers, Request, Response
from ._pseudo import request_from_pseudo

__all__ = ["Streams", "StreamOps", "RateWindow"]

log = logging.getLogger("quicproxy")


class StreamOps(Protocol):
    """What a multiplexed protocol does for :class:`Streams`."""

    def send_head(self, sid: int, status: int, headers: Headers, end: bool = False) -> None: ...
    async def send_data(self, sid: int, data: bytes) -> None: ...
    def send_end(self, sid: int, trailers: Headers | None = None) -> None: ...
    async def flush(self) -> None: ...
    def reset(self, sid: int, why: str) -> None:
        """Reset a stream: 'refused', 'internal', 'protocol', 'done' or 'cancelled'."""

    def stop_reading(self, sid: int) -> None: ...
    def grant(self, sid: int, size: int) -> None: ...
    def excessive_load(self, why: str) -> None:
        """Close the connection for abuse (GOAWAY with ENHANCE_YOUR_CALM / H3_EXCESSIVE_LOAD)."""

    def idle(self) -> None:
        """Called when the connection is draining and its last stream finished."""


class RateWindow:
    """Counts events in a fixed window; ``hit`` is True once over ``limit`` in ``seconds``."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._start = time.monotonic()
        self.count = 0

    def hit(self, n: int = 1) -> bool:
        now = time.monotonic()
        if now - self._start > self.seconds:
            self._start = now
            self.count = 0
        self.count += n
        return self.limit > 0 and self.count > self.limit


class _Writer:
    def __init__(self, streams: Streams, sid: int) -> None:
        self.streams = streams
        self.ops = streams.ops
        self.sid = sid

    def _check(self) -> None:
        """The stream must still be ours: a cancellation can be lost (Python 3.11's
        ``asyncio.wait_for`` returns a result that came at the same moment instead)."""
        if self.sid not in self.streams.tasks:
            raise ClientGone("stream reset by client")

    async def send_head(self, status: int, headers: Headers, end: bool = False) -> None:
        self._check()
        self.ops.send_head(self.sid, status, headers, end)
        await self.ops.flush()

    async def send_data(self, data: bytes) -> None:
        self._check()
        self.streams.streaming.add(self.sid)
        await self.ops.send_data(self.sid, data)

    async def send_end(self, trailers: Headers | None = None) -> None:
        self._check()
        self.ops.send_end(self.sid, trailers)
        await self.ops.flush()

    def abort(self) -> None:
        self.ops.reset(self.sid, "internal")


class Streams:
    """The open request streams of one connection."""

    def __init__(
        self,
        handler: Handler,
        ops: StreamOps,
        protocol: str,
        client: tuple[str, int],
        server: tuple[str, int],
    ) -> None:
        self.handler = handler
        self.ops = ops
        self.protocol = protocol
        self.label = "h3" if protocol == "HTTP/3" else "h2"
        self.client = client
        self.server = server
        self.bodies: dict[int, Body] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.streaming: set[int] = set()
        "Streams whose response body has begun: a reset of one is a cancel, not abuse."
        self.closing = False
        self.last_stream = -1
        "Highest stream id admitted so far (-1: none)."
        limits = handler.cfg.limits
        self.resets = RateWindow(limits.max_resets, limits.abuse_window)
        self.abusive = False

    @property
    def busy(self) -> bool:
        return bool(self.tasks)

    def open(
        self,
        sid: int,
        raw: Headers,
        ended: bool,
        grant: Callable[[int], None],
        early_data: bool = False,
        refusal: ProxyError | None = None,
    ) -> bool:
        """Admit a request whose headers arrived; False when it was refused. A ``refusal``
        (its head judged before it was read, e.g. too large) is answered at once."""
        if self.closing or self.abusive:
            self.ops.reset(sid, "refused")
            return False
        self.last_stream = max(self.last_stream, sid)
        body = Body(on_consumed=grant)
        body.idle_timeout = self.handler.cfg.timeouts.body
        if ended:
            body.end()
        try:
            if refusal is not None:
                raise refusal
            req = request_from_pseudo(raw, self.protocol, self.client, self.server, body)
        except ProxyError as exc:
            log.info("refused %s request from %s: %s", self.protocol, self.client[0], exc)
            self.bodies[sid] = body
            self.tasks[sid] = asyncio.ensure_future(self._answer(sid, body, exc))
            return True
        except ValueError as exc:
            log.info("malformed %s request from %s: %s", self.protocol, self.client[0], exc)
            self.ops.reset(sid, "protocol")
            return False
        req.early_data = early_data
        self.bodies[sid] = body
        self.tasks[sid] = asyncio.ensure_future(self._exchange(sid, req))
        return True

    def data(self, sid: int, data: bytes, ended: bool) -> bool:
        """Body bytes for a stream; False when nobody takes them (stream gone)."""
        body = self.bodies.get(sid)
        if body is None:
            return False
        body.feed(data)
        if ended:
            body.end()
        return True

    def end(self, sid: int, trailers: Headers | None = None) -> None:
        """The request body ended, with its trailer fields if it had some."""
        body = self.bodies.get(sid)
        if body is not None:
            if trailers:
                body.trailers = [(k, v) for k, v in trailers if not k.startswith(":")]
            body.end()

    def peer_reset(self, sid: int) -> bool:
        """The client reset a stream (h2 RST_STREAM, h3 RESET_STREAM or STOP_SENDING):
        stop its upstream request now.

        Only resets of streams whose response body has not begun count towards
        ``max_resets``: those are the rapid reset attack (work started upstream,
        cancelled before the client received anything; a WebSocket tunnel reset
        after its 200 is one too). A reset once body bytes flow is a cancel (a page
        left, a video seeked): the client waited for them and is receiving them.

        True when the stream was still in progress here."""
        task = self._stop(sid, ClientGone("stream reset by client"))
        streaming = sid in self.streaming
        self.streaming.discard(sid)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(Exception):
                metrics.stream_resets.labels(protocol=self.label).inc()
            if not streaming and self.resets.hit() and not self.abusive:
                self.abusive = True
                log.warning(
                    "%s connection from %s reset %d streams in %.0fs: closing it",
                    self.protocol,
                    self.client[0],
                    self.resets.count,
                    self.resets.seconds,
                )
                self.ops.excessive_load("too many stream resets")
        return task is not None

    def cancel(self, sid: int, why: str) -> None:
        """The proxy refused a stream mid-request: stop its upstream request now."""
        task = self._stop(sid, ConnectionError(why))
        if task is not None:
            task.cancel()

    def close_all(self, why: str) -> None:
        """The connection is gone: every stream ends now."""
        for sid in list(self.tasks):
            task = self._stop(sid, ClientGone(why))
            if task is not None:
                task.cancel()
        self.streaming.clear()

    def _stop(self, sid: int, error: BaseException) -> asyncio.Task[None] | None:
        """Forget a stream: a body still coming fails with ``error``; its task is
        returned (not cancelled: the caller decides what the cancel means)."""
        body = self.bodies.pop(sid, None)
        if body is not None and not body.ended:
            body.abort(error)
        return self.tasks.pop(sid, None)

    def drain(self) -> None:
        self.closing = True

    # ------------------------------------------------------------------ one stream

    async def _exchange(self, sid: int, req: Request) -> None:
        try:
            await self.handler.exchange(req, _Writer(self, sid))
            await self._after_answer(sid, req.body)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass  # reset by the client or connection gone: nothing left to tell anyone
        finally:
            self._done(sid)

    async def _answer(self, sid: int, body: Body, exc: ProxyError) -> None:
        """A request refused before it was built (e.g. CONNECT): status + short reason."""
        try:
            resp = Response.text(exc.status, f"{exc.status} {exc.reason}\n")
            writer = _Writer(self, sid)
            await writer.send_head(resp.status, resp.headers)
            async for chunk in resp.body:
                await writer.send_data(chunk)
            await writer.send_end()
            await self._after_answer(sid, body)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        finally:
            self._done(sid)

    async def _after_answer(self, sid: int, body: Body) -> None:
        if not body.ended and sid in self.tasks:
            # Answered before the whole request body came: take the rest (bounded),
            # then stop the upload if it is still going.
            if not await body.discard(DISCARD_SECONDS, DISCARD_BYTES):
                self.ops.stop_reading(sid)

    def _done(self, sid: int) -> None:
        self.tasks.pop(sid, None)
        self.bodies.pop(sid, None)
        self.streaming.discard(sid)
        if self.closing and not self.tasks:
            self.ops.idle()
