"""Bodiless requests to the Coraza library and their verdicts back, as messages.

The event loop writes a request as one message to a SOCK_SEQPACKET socket whose
other end the library reads on a goroutine (Go's own poller); the verdict comes
back as one message on the same socket, which the loop watches. Neither way
involves a foreign call, a Python thread or a GIL hand-over, and Go evaluates on
every core. The message layout is in ``quicproxy/waf/coraza/channel.go``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from ._types import WafUnavailable

__all__ = ["Verdict", "VerdictChannel", "REQUEST_LIMIT"]

REQUEST_LIMIT = 192 << 10
"The largest request message (``RequestLimit`` in channel.go); larger ones go to the pool."

_VERDICT_LIMIT = 60 << 10
_ID = struct.Struct("<Q")
_HEAD = struct.Struct("<Qiq")  # id, status (0, a status to block with, -1), engine ns

Verdict = tuple[int, int, str]
"(status, engine nanoseconds, match lines)."


class VerdictChannel:
    """One socket per event loop; each request gets a future for its verdict."""

    def __init__(self, loop: asyncio.AbstractEventLoop, open_peer: Callable[[int], int]) -> None:
        """``open_peer(fd)`` hands the other end to the library (which owns it then)."""
        self.loop = loop
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        if open_peer(theirs.detach()) != 0:
            ours.close()
            raise WafUnavailable("the coraza library refused the verdict channel")
        self._sock = ours
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Verdict]] = {}
        loop.add_reader(ours.fileno(), self._readable)

    def ask(self, request: bytes) -> asyncio.Future[Verdict] | None:
        """Send one request message; its verdict's future, or None when the channel
        cannot take it now (full, or the message too large): evaluate it another way."""
        if len(request) > REQUEST_LIMIT - _ID.size or self.closed:
            return None
        self._next += 1
        ident = self._next
        try:
            self._sock.sendmsg([_ID.pack(ident), request])
        except (BlockingIOError, InterruptedError, OSError):
            return None
        verdict: asyncio.Future[Verdict] = self.loop.create_future()
        self._waiting[ident] = verdict
        return verdict

    def _readable(self) -> None:
        while True:
            try:
                message = self._sock.recv(_VERDICT_LIMIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if len(message) < _HEAD.size:  # the library's end is gone
                self.close()
                return
            ident, status, nanos = _HEAD.unpack_from(message)
            verdict = self._waiting.pop(ident, None)
            if verdict is not None and not verdict.done():
                text = message[_HEAD.size :].decode("utf-8", "replace")
                verdict.set_result((status, nanos, text))

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for verdict in waiting.values():
            if not verdict.done():
                verdict.set_exception(WafUnavailable("the coraza verdict channel closed"))

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop watching and close our end: the library's reader then stops; verdicts
        still awaited fail with WafUnavailable."""
        if self.closed:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._fail_waiting()
