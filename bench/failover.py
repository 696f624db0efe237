"""Failover load: python -m bench.failover URL CONNS SECONDS

CONNS concurrent GETs of URL back to back for SECONDS over one HTTP/2 connection (httpx,
TLS not verified: the bench's own certificate); the parent kills one of the route's three
backends part-way. Prints one JSON line: requests answered 200, requests that failed
(another status, or no answer within 5 s), the window.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def main(url: str, conns: int, seconds: float) -> dict[str, float]:
    import httpx

    ok = failed = 0
    start = time.monotonic()
    until = start + seconds

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal ok, failed
        while time.monotonic() < until:
            try:
                r = await client.get(url)
                if r.status_code == 200 and len(r.content) == 1024:
                    ok += 1
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1
                await asyncio.sleep(0.01)

    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(http2=True, verify=False, timeout=5.0, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(conns)))
    return {"ok": ok, "failed": failed, "seconds": time.monotonic() - start}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(asyncio.run(main(args[0], int(args[1]), float(args[2])))), flush=True)
