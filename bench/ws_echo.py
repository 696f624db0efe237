"""WebSocket echo load: python -m bench.ws_echo URL CONNS SECONDS [SIZE]

CONNS WebSocket connections (the `websockets` client, TLS not verified: the bench's own
certificate), each sending a SIZE-byte binary message and waiting for its echo, back to
back, for SECONDS. Prints one JSON line: messages echoed, the window, p50/p99 round trip (ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time


async def _one(url: str, size: int, until: float, rtts: list[float], ctx: ssl.SSLContext | None):
    import websockets

    payload = os.urandom(size)
    async with websockets.connect(url, ssl=ctx, compression=None, max_size=None) as ws:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            await ws.send(payload)
            echo = await ws.recv()
            rtts.append(time.perf_counter() - t0)
            if len(echo) != size:
                raise RuntimeError("echo of another size")


async def main(url: str, conns: int, seconds: float, size: int) -> dict[str, float]:
    ctx = None
    if url.startswith("wss:"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    rtts: list[float] = []
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(*(_one(url, size, until, rtts, ctx) for _ in range(conns)))
    window = time.monotonic() - start
    rtts.sort()

    def pct(q: float) -> float:
        return rtts[min(len(rtts) - 1, int(q / 100 * len(rtts)))] * 1000 if rtts else float("nan")

    return {"messages": len(rtts), "seconds": window, "p50_ms": pct(50), "p99_ms": pct(99)}


if __name__ == "__main__":
    args = sys.argv[1:]
    got = asyncio.run(
        main(args[0], int(args[1]), float(args[2]), int(args[3]) if len(args) > 3 else 1024)
    )
    print(json.dumps(got), flush=True)
