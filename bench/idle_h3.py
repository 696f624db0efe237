"""Hold N idle HTTP/3 connections open (aioquic client), run as its own process.

    python -m bench.idle_h3 HOST PORT N HOLD_SECONDS [SERVER_NAME]

Prints "READY <ok> <failed>" once every handshake is done, then keeps the connections
idle until stdin closes or HOLD_SECONDS pass, and closes them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
import sys
from contextlib import AsyncExitStack

from aioquic.asyncio.client import connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic.configuration import QuicConfiguration

SERVER_NAME = sys.argv[5] if len(sys.argv) > 5 else "localhost"


async def _open(
    stack: AsyncExitStack, host: str, port: int, sem: asyncio.Semaphore, opened: list
) -> bool:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        verify_mode=ssl.CERT_NONE,
        idle_timeout=300.0,
        server_name=SERVER_NAME,
    )
    async with sem:
        try:
            client = await asyncio.wait_for(
                stack.enter_async_context(connect(host, port, configuration=config)), 10.0
            )
        except Exception:
            return False
    H3Connection(client._quic)  # opens the control and QPACK streams, sends SETTINGS
    client.transmit()
    opened.append(client)
    return True


async def main(host: str, port: int, n: int, hold: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
    sem = asyncio.Semaphore(32)
    opened: list = []
    async with AsyncExitStack() as stack:
        results = await asyncio.gather(*(_open(stack, host, port, sem, opened) for _ in range(n)))
        ok = sum(results)
        print(f"READY {ok} {n - ok}", flush=True)
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(stdin_closed, hold)
        except TimeoutError:
            pass
        # Close every connection at once; waiting on each in turn takes a PTO apiece.
        for client in opened:
            client.close()
        await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in opened], timeout=3.0)
        os._exit(0)


if __name__ == "__main__":
    h, p, count, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    asyncio.run(main(h, p, count, secs))
