"""HTTP/2 server adapter: jh2 events (the h2 state machine, HPACK in Rust) to the request model.

The stream life cycle (admit, credit, cancel on reset, abuse, truncation)
lives in ``_streams.py``, shared with HTTP/3; this module translates h2's
events and frames; field blocks pass ``_hpack``'s strictness check before jh2
decodes them. Connection-level defences: a deadline for the client's
preface and SETTINGS, an idle timeout while no request is in flight, and a
budget of control frames (SETTINGS, PING, PRIORITY, empty DATA) per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

import jh2.config
import jh2.connection
import jh2.events
import jh2.exceptions
import jh2.settings
import jh2.utilities
from jh2.errors import ErrorCodes
from jh2.hyperframe.frame import GoAwayFrame

from ._errors import ClientGone
from ._handler import Handler
from ._hpack import StrictDecoder
from ._model import Headers
from ._pseudo import response_headers, trailer_fields
from ._sockets import plain_addr
from ._streamio import read_within
from ._streams import RateWindow, Streams

__all__ = ["H2Connection"]

log = logging.getLogger("quicproxy")
_READ = 65536
_SLICE = 4096
"Bytes handed to h2 at once: a flood is judged every few hundred frames."
_STREAM_WINDOW = 1 << 20
_CONN_WINDOW = 16 << 20
_MAX_STREAMS = 128
_HEADER_TABLE = 4096
"SETTINGS_HEADER_TABLE_SIZE: the RFC's default (jh2 offers 64 KiB of HPACK table per connection)."
_RESET_CODES = {
    "refused": ErrorCodes.REFUSED_STREAM,
    "internal": ErrorCodes.INTERNAL_ERROR,
    "protocol": ErrorCodes.PROTOCOL_ERROR,
    "done": ErrorCodes.NO_ERROR,
    "cancelled": ErrorCodes.CANCEL,
}
_CONTROL_EVENTS = (
    jh2.events.RemoteSettingsChanged,
    jh2.events.PingReceived,
    jh2.events.PriorityUpdated,
)


def _connect_without_path(check: Any) -> Any:
    """jh2 5.0 (forked from h2 4.1) still wants :path and :scheme on CONNECT, which
    RFC 9113 8.5 says to omit (h2 4.2 fixed it): such a CONNECT would close the whole
    connection. Let it through; the request model answers CONNECT with 501."""

    def checked(pseudo: set[Any], method: Any, flags: Any) -> None:
        if method in (b"CONNECT", "CONNECT") and not (flags.is_response_header or flags.is_trailer):
            pseudo = pseudo | {b":path", b":scheme"}
        check(pseudo, method, flags)

    return checked


jh2.utilities._check_pseudo_header_field_acceptability = _connect_without_path(
    jh2.utilities._check_pseudo_header_field_acceptability
)


class _Values(list[Any]):
    """A setting's current value and those in flight: what jh2 keeps in a deque (a
    64-slot block, ~600 bytes, for one or two values; ~20 of them per connection)."""

    def popleft(self) -> Any:
        return self.pop(0)


class _Settings(jh2.settings.Settings):
    """jh2's settings with lists for their value queues."""

    def __init__(self, client: bool = True, initial_values: Any = None) -> None:
        super().__init__(client, initial_values)
        values: dict[Any, Any] = self._settings  # type: ignore[has-type]
        self._settings = {k: _Values(v) for k, v in values.items()}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self._settings:
            self._settings[key] = _Values([None])  # jh2: a setting first heard of
        super().__setitem__(key, value)


class _JH2(jh2.connection.H2Connection):
    """jh2's connection remembering how its last ``MAX_CLOSED_STREAMS`` streams closed
    (jh2: 65,536, ~110 bytes each, so a long-lived connection grew with every request up
    to ~7 MiB). Twice the streams a client may have open covers frames still in flight for
    the ones just closed (frames on a stream the proxy reset are ignored); DATA or HEADERS on
    an older one is a connection error (STREAM_CLOSED), as on a stream closed normally."""

    MAX_CLOSED_STREAMS = 2 * _MAX_STREAMS


class H2Connection:
    """One HTTP/2 client connection inside TLS."""

    def __init__(
        self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.handler = handler
        self.reader = reader
        self.writer = writer
        # response headers leave normalised by response_headers (as on h3): jh2's second
        # pass over them (lower-casing, trimming, checking) is skipped
        config = jh2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _JH2(config)
        self.h2.remote_settings = _Settings(client=True)  # the defaults, as jh2's own
        self.h2.decoder = StrictDecoder(self.h2.decoder, _HEADER_TABLE)
        self._window = asyncio.Event()
        self.client = plain_addr(writer.get_extra_info("peername"))
        self.server = plain_addr(writer.get_extra_info("sockname"))
        # Streams holds this connection weakly: no reference cycle, so the connection
        # (its transport, TLS and h2 state) is freed as its task ends, not at the next
        # full garbage collection. A stream task keeps it alive through its body's grant.
        self.streams = Streams(handler, weakref.proxy(self), "HTTP/2", self.client, self.server)
        limits = handler.cfg.limits
        self.control = RateWindow(limits.max_control_frames, limits.abuse_window)
        self._settings_seen = False
        self._goaway_sent = False
        self._abusive = False
        self._flush_soon: asyncio.Handle | None = None
        self._trailers: dict[int, Headers] = {}
        "Request trailers, until their stream's end (the same event batch)."

    # ------------------------------------------------------------------ StreamOps

    def send_head(self, sid: int, status: int, headers: Headers, end: bool = False) -> None:
        self.h2.send_headers(sid, response_headers(status, headers), end_stream=end)

    async def send_data(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if sid not in self.streams.tasks:
                raise ClientGone("stream reset by client")
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            self.h2.send_data(sid, view[:window].tobytes())
            view = view[window:]
            await self.flush()

    def send_end(self, sid: int, trailers: Headers | None = None) -> None:
        if trailers:
            self.h2.send_headers(sid, trailer_fields(trailers), end_stream=True)
        else:
            self.h2.end_stream(sid)

    async def flush(self) -> None:
        """Write what h2 has at the end of this event-loop turn, once: a response's
        HEADERS, DATA and END_STREAM (and other streams' frames) leave in one TLS
        write instead of one each. Waits while the socket's buffer is full."""
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush_nowait)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(f"client connection lost: {exc!r}") from None

    def reset(self, sid: int, why: str) -> None:
        with contextlib.suppress(jh2.exceptions.H2Error):
            self.h2.reset_stream(sid, _RESET_CODES[why])
        self._flush_nowait()

    def stop_reading(self, sid: int) -> None:
        self.reset(sid, "done")

    def grant(self, sid: int, size: int) -> None:
        if sid in self.streams.tasks:
            with contextlib.suppress(jh2.exceptions.H2Error):
                self.h2.acknowledge_received_data(size, sid)
                self._flush_nowait()

    def excessive_load(self, why: str) -> None:
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def idle(self) -> None:
        self._goaway(ErrorCodes.NO_ERROR)

    # ------------------------------------------------------------------ output

    def _flush_nowait(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    @property
    def busy(self) -> bool:
        return self.streams.busy

    def shutdown(self) -> None:
        """Graceful close: refuse new streams, GOAWAY once in-flight streams are done.

        GOAWAY waits for the connection to be idle because h2-based clients (httpx,
        httpcore) fail every open stream when a GOAWAY arrives, even streams the
        GOAWAY lets finish; refused streams are safe for any client to retry.
        """
        if self.streams.closing:
            return
        self.streams.drain()
        if not self.streams.busy:
            self.idle()

    def _goaway(self, code: int) -> None:
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self.streams.drain()
        frame = GoAwayFrame(0)
        frame.last_stream_id = max(0, self.streams.last_stream)
        frame.error_code = code
        self._flush_nowait()
        if not self.writer.is_closing():
            self.writer.write(frame.serialize())
        if code != ErrorCodes.NO_ERROR:
            self.streams.close_all("connection closed for abuse")
            self._abusive = True  # run() closes after a lingering read, so GOAWAY is read
            return
        self.writer.close()

    # ------------------------------------------------------------------ input

    def _read_timeout(self) -> float | None:
        timeouts = self.handler.cfg.timeouts
        if not self._settings_seen:
            return timeouts.h2_preface
        if not self.streams.busy:
            return timeouts.idle
        return None

    async def run(self) -> None:
        limits = self.handler.cfg.limits
        self.h2.local_settings = _Settings(
            client=False,
            initial_values={
                jh2.settings.SettingCodes.HEADER_TABLE_SIZE: _HEADER_TABLE,
                jh2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS,
                jh2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                jh2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes * 4,
                jh2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # WebSocket (RFC 8441)
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONN_WINDOW)
        try:
            await self.flush()
            while not self._goaway_sent:
                data = await read_within(self.reader, _READ, self._read_timeout())
                if not data:
                    break
                if not self._feed(data):
                    break
                await self.flush()
                if self.streams.closing and not self.streams.busy:
                    break
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self.streams.close_all("client connection closed")
            self._flush_nowait()
            if self._abusive:
                await self._linger()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            # jh2's frame handlers are bound methods in a dict of its own (a cycle);
            # nothing is received after this
            self.h2._frame_dispatch_table.clear()

    def _feed(self, data: bytes) -> bool:
        """Hand received bytes to h2 a slice at a time, so a flood of small frames is
        noticed (and stopped) after one slice, not after a whole read; False: close."""
        view = memoryview(data)
        for start in range(0, len(view), _SLICE):
            try:
                events = self.h2.receive_data(view[start : start + _SLICE].tobytes())
            except jh2.exceptions.ProtocolError as exc:
                log.info("HTTP/2 protocol error from %s: %s", self.client[0], exc)
                self._flush_nowait()
                return False
            for event in events:
                if self._goaway_sent:
                    return False  # closed for abuse: the rest is not worth reading
                self._dispatch(event)
            if self.control.hit(sum(isinstance(e, _CONTROL_EVENTS) for e in events)):
                log.warning("HTTP/2 control-frame flood from %s: closing", self.client[0])
                self.excessive_load("control frames")
                return False
        return not self._goaway_sent

    async def _linger(self, seconds: float = 1.0, limit: int = 1 << 20) -> None:
        """Drop what the client still sends for a moment: closing with unread input
        resets the connection and the client would lose our GOAWAY."""
        with contextlib.suppress(Exception):
            await self.writer.drain()
            async with asyncio.timeout(seconds):
                while limit > 0 and (data := await self.reader.read(_READ)):
                    limit -= len(data)

    def _dispatch(self, event: jh2.events.Event) -> None:
        if isinstance(event, jh2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, jh2.events.DataReceived):
            sid = event.stream_id
            padding = event.flow_controlled_length - len(event.data)
            if not self.streams.data(sid, event.data, False):
                padding = event.flow_controlled_length
            if padding:
                with contextlib.suppress(jh2.exceptions.H2Error):
                    self.h2.acknowledge_received_data(padding, sid)
            if not event.data:
                self.control.hit()
        elif isinstance(event, jh2.events.TrailersReceived):
            self._trailers[event.stream_id] = [(_text(k), _text(v)) for k, v in event.headers]
        elif isinstance(event, jh2.events.StreamEnded):
            self.streams.end(event.stream_id, self._trailers.pop(event.stream_id, None))
        elif isinstance(event, jh2.events.StreamReset):
            self.streams.peer_reset(event.stream_id)
            self._window.set()
        elif isinstance(event, jh2.events.RemoteSettingsChanged):
            self._settings_seen = True
            self._window.set()
        elif isinstance(event, jh2.events.WindowUpdated):
            self._window.set()
        elif isinstance(event, jh2.events.ConnectionTerminated):
            # The client's GOAWAY: jh2 sends nothing more on this connection (its state
            # is CLOSED), so the streams in progress cannot be answered: they end as
            # cancels (499), quietly, and the connection closes.
            self.streams.close_all("client sent GOAWAY")
            self.streams.drain()

    def _request(self, event: jh2.events.RequestReceived) -> None:
        sid = event.stream_id
        raw = [(_text(k), _text(v)) for k, v in (event.headers or [])]
        self.streams.open(
            sid, raw, event.stream_ended is not None, lambda size: self.grant(sid, size)
        )


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
