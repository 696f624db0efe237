"""gRPC unary load: python -m bench.grpc_unary TARGET CONNS SECONDS [SIZE]

TARGET is ``h2c://HOST:PORT`` (the backend itself) or ``https://NAME:PORT`` (a proxy; TLS
not verified: the bench's own certificate, so the channel trusts the served chain). CONNS
concurrent callers on one channel (gRPC multiplexes them on one HTTP/2 connection) call
/bench.Echo/Unary with a SIZE-byte message back to back for SECONDS. Prints one JSON
line: calls completed with status OK, the window, p50/p99 latency (ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time


def _server_chain(host: str, port: int) -> bytes:
    """The PEM certificate the target presents (trusted as the channel's root)."""
    pem = ssl.get_server_certificate((host, port))
    return pem.encode()


async def main(target: str, conns: int, seconds: float, size: int) -> dict[str, float]:
    import grpc

    scheme, rest = target.split("://", 1)
    host, port = rest.rsplit(":", 1)
    if scheme == "h2c":
        channel = grpc.aio.insecure_channel(rest)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_server_chain("127.0.0.1", int(port))
        )
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", host)]
        )
    call = channel.unary_unary("/bench.Echo/Unary")
    payload = os.urandom(size)
    latencies: list[float] = []
    until = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            reply = await call(payload, timeout=10)
            latencies.append(time.perf_counter() - t0)
            if reply != payload:
                raise RuntimeError("echo differs")

    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(conns)))
    window = time.monotonic() - start
    await channel.close()
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000

    return {"calls": len(latencies), "seconds": window, "p50_ms": pct(50), "p99_ms": pct(99)}


if __name__ == "__main__":
    a = sys.argv[1:]
    got = asyncio.run(main(a[0], int(a[1]), float(a[2]), int(a[3]) if len(a) > 3 else 1024))
    print(json.dumps(got), flush=True)
