"""One QUIC connection's owner: its transport state, its timer and its output.

A :class:`QuicConn` holds the qh3 connection (``_core.CreditedConnection``) and is the
only place that feeds it datagrams and timer expiries, reads its events, asks it for
datagrams to send and re-arms its timer. It reads the transport's own events itself
(connection IDs issued and retired, the handshake done, the connection terminated) and
hands every other event to the application above it (``quic_event``: HTTP/3, ``_h3.py``).

The listener (``_listen.py``) routes datagrams to connections and batches their output;
a connection reaches it only through :class:`Host`, so the listener knows connections
and not the other way round (the layering of aioquic's asyncio glue, where a protocol
owns its connection's timer and transmit and the server only routes, and of hypercorn's
``protocol/quic.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from .._sockets import plain_addr
from ._core import CreditedConnection, events
from ._udp import Source

__all__ = ["Host", "QuicConn"]

log = logging.getLogger("quicproxy")


class Host(Protocol):
    """What a connection needs from whoever routes its datagrams (the listener)."""

    loop: asyncio.AbstractEventLoop
    address: tuple[str, int]
    "The local address clients reached (for the access log)."

    def cid_issued(self, conn: QuicConn, cid: bytes) -> None:
        """Datagrams for ``cid`` go to ``conn`` from now on."""

    def cid_retired(self, conn: QuicConn, cid: bytes) -> None:
        """Datagrams for ``cid`` no longer go to ``conn``."""

    def handshake_done(self, conn: QuicConn) -> None:
        """``conn`` no longer counts as a handshake in progress."""

    def dirty(self, conn: QuicConn) -> None:
        """``conn`` has something to send: call its ``output`` once this loop turn."""

    def send_now(self, conn: QuicConn) -> None:
        """Call ``conn.output`` now (and not again this turn)."""

    def send(self, datagrams: list[tuple[bytes, Any]], source: Source = None) -> None:
        """Put datagrams on the wire, leaving from ``source`` when given."""

    def remove(self, conn: QuicConn) -> None:
        """``conn`` ended: forget it (its connection IDs, its slots)."""


class QuicConn:
    """A QUIC connection and the one place that drives it."""

    def __init__(self, quic: CreditedConnection, host: Host, addr: Any) -> None:
        self.quic = quic
        self.host = host
        self.cids: set[bytes] = set()
        "Connection IDs that route datagrams to this connection."
        self.source: Source = None
        "Where the client's latest datagram was addressed: answers leave from there."
        self.client = plain_addr(addr)
        self.handshaking = True
        self.received_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None
        "The handshake's deadline (set and cancelled by the listener)."
        self.timer_at: float | None = None
        self.closed = False

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        self.received_bytes += len(data)
        self.quic.receive_datagram(data, addr, now=now)
        self._process()

    def _expired(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = max(self.timer_at or 0.0, self.host.loop.time())
        self.timer_at = None
        try:
            self.quic.handle_timer(now=now)
            self._process()
        except Exception:
            log.exception("QUIC timer for %s failed", self.client[0])
            self.terminated()
            return
        self.host.dirty(self)

    def _process(self) -> None:
        quic = self.quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self.host.cid_issued(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self.host.cid_retired(self, event.connection_id)
            elif isinstance(event, events.HandshakeCompleted):
                quic.shed_handshake_buffers()
                self.host.handshake_done(self)
            elif isinstance(event, events.ConnectionTerminated):
                self.terminated()
                return
            self.quic_event(event)
        self.transmit()

    def quic_event(self, event: events.QuicEvent) -> None:
        """An event for the application above (all but ConnectionTerminated)."""

    # ------------------------------------------------------------------ output

    def transmit(self) -> None:
        """Ask the host to send what this connection has, once this loop turn."""
        if not self.closed:
            self.host.dirty(self)

    def output(self, now: float) -> None:
        """Send what qh3 has for the wire and re-arm the timer (the host calls this)."""
        if self.closed:
            return
        try:
            out = self.quic.datagrams_to_send(now=now)
        except Exception:  # one broken connection never stops the others' output
            log.exception("QUIC output for %s failed", self.client[0])
            self.terminated()
            return
        if out:
            self.host.send(out, self.source)
        at = self.quic.get_timer()
        if self.timer is not None and self.timer_at != at:
            self.timer.cancel()
            self.timer = None
        if self.timer is None and at is not None:
            self.timer = self.host.loop.call_at(at, self._expired)
        self.timer_at = at

    # ------------------------------------------------------------------ life cycle

    def close_quic(self, code: int, reason: str = "") -> None:
        """CONNECTION_CLOSE, after whatever stream data is still queued has gone out."""
        if not self.closed:
            self.host.send_now(self)
            self.quic.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def close(self) -> None:
        """Close now (the application's close: HTTP/3 sends H3_NO_ERROR)."""
        self.close_quic(0)

    def shutdown(self) -> None:
        """Graceful close (the application's: HTTP/3 sends GOAWAY, closes once idle)."""
        self.close()

    def ended(self) -> None:
        """The connection ended: the application's clean-up (streams, deadlines)."""

    def terminated(self) -> None:
        """The QUIC connection ended: forget it everywhere, stop what runs on it."""
        if self.closed:
            return
        self.closed = True
        self.ended()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.host.remove(self)
