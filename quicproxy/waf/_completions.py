"""Verdicts evaluated on the Coraza library's goroutines, delivered to the event loop.

The loop hands a request over (a foreign call that copies it and starts a
goroutine, GIL held for microseconds) and awaits a future; the goroutine writes
the transaction's handle to a pipe this class watches. No Python thread and no
GIL hand-over sits between the request and its verdict, and Go runs the
evaluations on every core.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

__all__ = ["Completions"]

_TOKEN = struct.Struct("<Q")


class Completions:
    """One pipe per event loop; handles written to it complete the futures waiting on them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)  # the writer (a goroutine) may block; we may not
        self._waiting: dict[int, Callable[[], None]] = {}
        loop.add_reader(self.read_fd, self._readable)

    def expect(self, handle: int, done: Callable[[], None]) -> None:
        """Call ``done`` on the loop once ``handle`` is written to the pipe."""
        self._waiting[handle] = done

    def _readable(self) -> None:
        try:
            data = os.read(self.read_fd, _TOKEN.size * 512)
        except (BlockingIOError, InterruptedError):
            return
        for (handle,) in _TOKEN.iter_unpack(data[: len(data) - len(data) % _TOKEN.size]):
            done = self._waiting.pop(handle, None)
            if done is not None:
                done()

    def close(self, writers_left: int) -> None:
        """Stop watching; the pipe is closed only when no goroutine can still write to it
        (a closed descriptor number may be reused by another file)."""
        if not self.loop.is_closed():
            self.loop.remove_reader(self.read_fd)
        if writers_left == 0:
            os.close(self.read_fd)
            os.close(self.write_fd)
