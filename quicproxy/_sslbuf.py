"""One TLS receive buffer per thread instead of 256 KiB per TLS connection.

asyncio's ``SSLProtocol`` (Python 3.11+) gives every connection its own 256 KiB
``bytearray`` for the socket's ``recv_into``, idle or not: 500 idle TLS connections
held ~140 MiB, and glibc kept it after they closed. On a selector event loop the
bytes read into that buffer are copied into the connection's TLS input (a
``MemoryBIO``) before ``buffer_updated`` returns, so the buffer holds nothing between
reads and one per thread serves every connection on that thread's loop. On another
loop (the proactor's overlapped reads keep the buffer) each connection gets its own,
as before.

:func:`install` swaps ``asyncio.sslproto.SSLProtocol`` (which the event loops look up
when they wrap a connection in TLS) for the subclass here; it is idempotent.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import threading
from typing import Any

__all__ = ["SharedBufferSSLProtocol", "install"]

_READ_SIZE = 256 * 1024
"What one read may take from the socket and from the TLS object: asyncio's own size."


class _PerThread(threading.local):
    buffer: bytearray | None = None


_shared = _PerThread()


def _thread_buffer() -> bytearray:
    if _shared.buffer is None:
        _shared.buffer = bytearray(_READ_SIZE)
    return _shared.buffer


class SharedBufferSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol, reading through the thread's buffer on a selector loop."""

    max_size = 0
    "Read by the base class's constructor only, to size a buffer replaced at once."

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        super().__init__(loop, *args, **kwargs)
        self.max_size = _READ_SIZE  # type: ignore[misc]
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            buffer = _thread_buffer()
        else:
            buffer = bytearray(_READ_SIZE)
        self._ssl_buffer = buffer
        self._ssl_buffer_view = memoryview(buffer)


def install() -> None:
    """Make every TLS connection asyncio wraps from now on use the shared buffer."""
    asyncio.sslproto.SSLProtocol = SharedBufferSSLProtocol  # type: ignore[misc]
