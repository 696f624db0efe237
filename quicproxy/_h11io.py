"""The one read loop over h11: downstream (h1 server), upstream and WAF-client sides."""

from __future__ import annotations

import asyncio

import h11

__all__ = ["next_event", "READ_SIZE"]

READ_SIZE = 65536


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
        if wait is None:
            data = await reader.read(READ_SIZE)
        else:
            data = await asyncio.wait_for(reader.read(READ_SIZE), wait)
        conn.receive_data(data)
