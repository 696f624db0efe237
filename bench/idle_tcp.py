"""TLS connections over TCP for the memory figures, run as its own process.

    python -m bench.idle_tcp hold HOST PORT h1|h2 N HOLD_SECONDS [SERVER_NAME]
    python -m bench.idle_tcp churn HOST PORT h1|h2 N CONCURRENCY [SERVER_NAME]

hold: opens N connections (ALPN http/1.1, or h2 with its preface and SETTINGS sent and
the server's read), prints "READY <ok> <failed>", keeps them idle until stdin closes or
HOLD_SECONDS pass, and closes them.
churn: opens N connections, CONCURRENCY at a time, each making one GET / and closing;
prints "DONE <ok> <failed>".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import ssl
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
TIMEOUT = 15.0


def context(proto: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2" if proto == "h2" else "http/1.1"])
    return ctx


PATH = "/1k"


def h2_get(name: str) -> bytes:
    """HEADERS for GET PATH on stream 1, END_STREAM: :method and :scheme from the static
    table, :path and :authority as literals without indexing (no Huffman)."""
    host, path = name.encode(), PATH.encode()
    block = bytes([0x82, 0x87, 0x04, len(path)]) + path + bytes([0x01, len(host)]) + host
    return len(block).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + block


def source(host: str, i: int) -> tuple[str, int] | None:
    """Connections to a loopback address come from 16 loopback sources in turn: a server's
    per-address connection cap (quicproxy: 256) is not what is measured."""
    return (f"127.0.0.{1 + i % 16}", 0) if host.startswith("127.") else None


async def open_one(
    host: str, port: int, proto: str, name: str, ctx: ssl.SSLContext, i: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=name, local_addr=source(host, i)
        ),
        TIMEOUT,
    )
    if proto == "h2":
        writer.write(PREFACE + SETTINGS)
        await asyncio.wait_for(reader.read(65536), TIMEOUT)  # the server's SETTINGS
        writer.write(SETTINGS_ACK)
    return reader, writer


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: str, name: str
) -> bool:
    """One GET /; True once the response's end is seen (h2: a frame with END_STREAM on
    stream 1; h1: the head and a Content-Length body)."""
    if proto == "h2":
        writer.write(h2_get(name))
        buf = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not data:
                return False
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                size, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
                    return True
                if kind == 0x7 or (stream == 1 and kind == 0x3):  # GOAWAY, RST_STREAM
                    return False
                buf = buf[9 + size :]
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return head.startswith(b"HTTP/1.1 2")


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2.0)


async def hold(host: str, port: int, proto: str, n: int, seconds: float, name: str) -> None:
    ctx = context(proto)
    sem = asyncio.Semaphore(32)
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> bool:
        async with sem:
            try:
                _, writer = await open_one(host, port, proto, name, ctx, i)
            except Exception:
                return False
            writers.append(writer)
            return True

    ok = sum(await asyncio.gather(*(one(i) for i in range(n))))
    print(f"READY {ok} {n - ok}", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), seconds
        )
    await asyncio.gather(*(close(w) for w in writers))


async def churn(host: str, port: int, proto: str, n: int, conc: int, name: str) -> None:
    ctx = context(proto)
    left = [n]
    ok = [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            try:
                reader, writer = await open_one(host, port, proto, name, ctx, left[0])
            except Exception:
                continue
            try:
                done = await request(reader, writer, proto, name)
            except Exception:
                done = False
            ok[0] += done  # not `ok[0] += await ...`: that reads ok[0] before the await
            await close(writer)

    await asyncio.gather(*(worker() for _ in range(conc)))
    print(f"DONE {ok[0]} {n - ok[0]}", flush=True)


def main(argv: list[str]) -> None:
    mode, host, port, proto, n, arg = argv[:6]
    name = argv[6] if len(argv) > 6 else "localhost"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, int(n) + 256)), hard))
    if mode == "hold":
        asyncio.run(hold(host, int(port), proto, int(n), float(arg), name))
    else:
        asyncio.run(churn(host, int(port), proto, int(n), int(arg), name))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
