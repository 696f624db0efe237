"""Stream I/O of the HTTP/1.1 paths: the read loop over h11 (the h1 server) and the bounded
reads and writes every HTTP/1.1 connection uses (server, upstream, WAF client)."""

from __future__ import annotations

import asyncio

import h11

__all__ = ["next_event", "read_within", "write_within", "READ_SIZE"]

READ_SIZE = 65536


async def read_within(reader: asyncio.StreamReader, size: int, seconds: float | None) -> bytes:
    """``reader.read(size)``, TimeoutError after ``seconds`` (None: no limit). Cheaper than
    ``asyncio.wait_for``, which makes a task per read: this runs on every read of every
    connection."""
    if seconds is None:
        return await reader.read(size)
    async with asyncio.timeout(seconds):
        return await reader.read(size)


async def write_within(
    writer: asyncio.StreamWriter, data: bytes, seconds: float | None = None
) -> None:
    """Write; wait for the transport (TimeoutError after ``seconds``; None: no limit) only
    when bytes are left queued, so the common small write costs neither a timer nor a task."""
    writer.write(data)
    if writer.transport.get_write_buffer_size() or writer.is_closing():
        if seconds is None:
            await writer.drain()
        else:
            async with asyncio.timeout(seconds):
                await writer.drain()


async def next_event(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    *,
    timeout: float | None = None,
    deadline: float | None = None,
) -> h11.Event:
    """The next h11 event, reading from ``reader`` as needed.

    ``timeout`` bounds each read (an idle timeout: it restarts when bytes come);
    ``deadline`` (event-loop time) bounds the whole wait however the bytes trickle
    in. Either raises TimeoutError. End of input gives h11.ConnectionClosed (or
    RemoteProtocolError when the peer stopped mid-message)."""
    loop = asyncio.get_running_loop()
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        wait = timeout
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("deadline passed")
            wait = left if wait is None else min(wait, left)
        conn.receive_data(await read_within(reader, READ_SIZE, wait))
