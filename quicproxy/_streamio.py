"""Bounded reads and writes on asyncio streams, for every TCP connection (the h1 and h2
servers, the upstream pool, the WAF service client)."""

from __future__ import annotations

import asyncio

__all__ = ["buffered", "read_within", "write_within", "READ_SIZE"]

READ_SIZE = 65536


async def read_within(reader: asyncio.StreamReader, size: int, seconds: float | None) -> bytes:
    """``reader.read(size)``, TimeoutError after ``seconds`` (None: no limit). Cheaper than
    ``asyncio.wait_for``, which makes a task per read: this runs on every read of every
    connection."""
    if seconds is None or ready(reader):
        return await reader.read(size)
    async with asyncio.timeout(seconds):
        return await reader.read(size)


def buffered(reader: asyncio.StreamReader) -> bytes | bytearray:
    """The bytes the reader holds already (asyncio has no public way to see them; this is
    the one place that looks)."""
    return getattr(reader, "_buffer", None) or b""


def ready(reader: asyncio.StreamReader) -> bool:
    """A read would return at once (bytes buffered, or the end seen): no timer needed.
    A response's body usually arrives with its head, so most body reads are these."""
    return bool(buffered(reader)) or reader.at_eof()


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
