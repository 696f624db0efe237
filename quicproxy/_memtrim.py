"""Memory given back to the system after connections close: the cycles they leave
collected (``gc.collect``), then the heap trimmed (glibc's ``malloc_trim``).

A closed QUIC connection is a graph of reference cycles (qh3's connection holds its own
bound methods in its frame-handler table, its TLS context and key-update callbacks; ~200
objects, ~25 KiB each): reference counting never frees it. It lived long enough to reach
the collector's oldest generation, which with the raised thresholds (``_cli.tune_gc``) is
scanned once per ~700,000 net allocations: after 300 HTTP/3 connections closed, an idle
proxy stayed at its peak (+18 MiB) for good. So the trim starts with a full collection:
8 MiB of it goes back within one interval (what stays is mostly CPython's 1 MiB
small-object arenas that a few live objects keep).

A closed connection's memory (its TLS state, buffers, Python objects) goes back to the
C allocator, which keeps most of it: the heap's free pages sit between blocks still
in use and are not returned on their own. 500 h2 connections that made ten requests
each left RSS 30 MiB above its start after they closed; ``malloc_trim(0)`` gave back
13 MiB of it in 5 ms. So every few seconds, if enough connections closed since the last
time, the heap is trimmed (a no-op costs ~0.2 ms). Where the C library has no
``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

__all__ = ["Trimmer"]

log = logging.getLogger("quicproxy")


def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return trim
    return None


class Trimmer:
    """Collects garbage and trims the heap every ``interval`` seconds once ``threshold``
    connections closed.

    TCP and QUIC connections report their end (:meth:`closed`); ``open_count`` is
    sampled too, for connections that go away without a word."""

    def __init__(
        self, open_count: Callable[[], int], interval: float = 5.0, threshold: int = 64
    ) -> None:
        self.open_count = open_count
        self.interval = interval
        self.threshold = threshold
        self.pending = 0
        "Connections closed since the last trim."
        self.trims = 0
        self._trim = _malloc_trim()
        self._task: asyncio.Task[None] | None = None

    def closed(self, count: int = 1) -> None:
        self.pending += count

    def start(self) -> None:
        if self._trim is not None and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        last = self.open_count()
        while True:
            await asyncio.sleep(self.interval)
            now = self.open_count()
            self.pending += max(0, last - now)  # what went without saying (QUIC)
            last = now
            if self.pending >= self.threshold:
                self.trim()

    def trim(self) -> None:
        self.pending = 0
        started = time.perf_counter()
        collected = gc.collect()
        log.debug(
            "collected %d objects in %.1f ms", collected, (time.perf_counter() - started) * 1e3
        )
        if self._trim is None:
            return
        try:
            self._trim(0)
            self.trims += 1
        except Exception:  # never worth stopping for
            log.debug("malloc_trim failed", exc_info=True)
