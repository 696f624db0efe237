"""Memory probes: `quicproxy serve` in a subprocess, and real clients that hold
connections idle (TLS: h1, or h2 after its preface) or use them (h2 requests; HTTP/3
with aioquic), to read what each costs in the proxy's VmRSS.

    python -m tests.hostile.memprobe      # prints the figures (a measuring tool)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
from aioquic.asyncio.client import connect as quic_connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from quicproxy._client import H3Client
from quicproxy._client import _Protocol as H3Protocol
from tests.helpers import free_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class ServedProxy:
    """`quicproxy serve` as its own process (no access log, no per-address cap)."""

    def __init__(self, backend_url: str, *, cert: str = "", key: str = "") -> None:
        self.backend_url = backend_url
        self.cert, self.key = cert, key
        self.https = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = ""
        "What it wrote to stderr (once stopped)."
        self._dir = tempfile.TemporaryDirectory()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return rss_kib(self.pid)

    async def __aenter__(self) -> ServedProxy:
        cfg = os.path.join(self._dir.name, "cfg.yaml")
        with open(cfg, "w") as fh:
            fh.write(
                "limits:\n  max_connections_per_address: 100000\n"
                "log:\n  access: 'off'\n"
                "timeouts:\n  idle: 300\n  h2_preface: 300\n  header: 300\n"
            )
        self.http = http = free_port()
        self.https = free_port()
        args = ["serve", "--config", cfg, "--host", "127.0.0.1"]
        args += ["--http-port", str(http), "--https-port", str(self.https)]
        args += ["--backend", self.backend_url]
        if self.cert:
            args += ["--cert", self.cert, "--key", self.key]
        errors = open(os.path.join(self._dir.name, "stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", *args],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env={**os.environ, "HOME": self._dir.name},
        )
        errors.close()  # the child has its copy
        deadline = time.monotonic() + 30
        while True:
            try:
                reader, writer = await open_tls(self.https, "http/1.1")
                writer.close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with open(os.path.join(self._dir.name, "stderr"), "rb") as fh:
            self.stderr = fh.read().decode(errors="replace")
        self._dir.cleanup()


_CTX: dict[str, ssl.SSLContext] = {}


def client_context(alpn: str) -> ssl.SSLContext:
    if alpn not in _CTX:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols([alpn])
        _CTX[alpn] = ctx
    return _CTX[alpn]


async def open_tls(port: int, alpn: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(alpn), server_hostname="localhost"
    )


async def _gather_bounded(coros: list[Any], at_once: int = 64) -> list[Any]:
    sem = asyncio.Semaphore(at_once)

    async def one(coro: Any) -> Any:
        async with sem:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def _idle_one(port: int, alpn: str) -> asyncio.StreamWriter:
    reader, writer = await open_tls(port, alpn)
    if alpn == "h2":
        writer.write(PREFACE + SETTINGS)
        await writer.drain()
        await asyncio.wait_for(reader.read(65536), 30)  # the server's SETTINGS
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


@contextlib.asynccontextmanager
async def idle(port: int, alpn: str, n: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """n TLS connections (ALPN ``alpn``) held open and idle; closed on leaving."""
    writers = await _gather_bounded([_idle_one(port, alpn) for _ in range(n)])
    try:
        yield writers
    finally:
        await close_all(writers)


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.wait_closed(), 2)


async def _h2_used(port: int, requests: int) -> asyncio.StreamWriter:
    """One h2 connection making ``requests`` GETs one after the other."""
    reader, writer = await open_tls(port, "h2")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    head = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/")]
    for i in range(requests):
        sid = 1 + 2 * i
        conn.send_headers(sid, head, end_stream=True)
        writer.write(conn.data_to_send())
        done = False
        while not done:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                raise ConnectionError("closed")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    done = True
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            writer.write(conn.data_to_send())
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


async def _h1_used(port: int, requests: int) -> asyncio.StreamWriter:
    reader, writer = await open_tls(port, "http/1.1")
    for _ in range(requests):
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


async def used(port: int, alpn: str, n: int, requests: int) -> list[asyncio.StreamWriter]:
    """n connections, each having made ``requests`` requests, still open."""
    one = _h2_used if alpn == "h2" else _h1_used
    return await _gather_bounded([one(port, requests) for _ in range(n)], 32)


async def _h3_used(port: int, requests: int) -> tuple[Any, H3Protocol]:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        verify_mode=ssl.CERT_NONE,
        server_name="localhost",
        idle_timeout=300.0,
    )
    opening = quic_connect("127.0.0.1", port, configuration=config, create_protocol=H3Protocol)
    proto = await asyncio.wait_for(opening.__aenter__(), 30)
    proto.opening = opening  # held: dropped, its generator would close the connection
    client = H3Client(proto, f"localhost:{port}")
    for _ in range(requests):
        response = await asyncio.wait_for(client.request("GET", "/"), 30)
        if response.status != 200:
            raise ConnectionError(f"status {response.status}")
    return opening, proto


async def h3_used(port: int, n: int, requests: int) -> list[H3Protocol]:
    """n HTTP/3 connections (aioquic), each having made ``requests`` GETs, still open."""
    opened = await _gather_bounded([_h3_used(port, requests) for _ in range(n)], 32)
    return [proto for _opening, proto in opened]


async def close_h3(protocols: list[H3Protocol]) -> None:
    """CONNECTION_CLOSE on each, all at once (one by one costs a PTO each)."""
    for proto in protocols:
        proto.close()
    await asyncio.wait([asyncio.ensure_future(p.wait_closed()) for p in protocols], timeout=5)
    for proto in protocols:
        proto._transport.close()  # the client's UDP socket (its context manager is not left)


async def churn(proxy: ServedProxy, n: int, seconds: float) -> list[int]:
    """n clients (half h1, half h2) for ``seconds``, each opening a connection, making 3
    requests, closing it, over again; the proxy's RSS (MiB) every 5 s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def client(alpn: str) -> None:
        while loop.time() < end:
            with contextlib.suppress(Exception):
                writer = await (_h2_used if alpn == "h2" else _h1_used)(proxy.https, 3)
                await close_all([writer])

    tasks = [asyncio.ensure_future(client(("h2", "http/1.1")[i % 2])) for i in range(n)]
    levels = [proxy.rss() // 1024]
    while loop.time() < end:
        await asyncio.sleep(5)
        levels.append(proxy.rss() // 1024)
    await asyncio.gather(*tasks)
    levels.append(await settle(proxy, 5) // 1024)
    return levels


async def settle(proxy: ServedProxy, seconds: float = 2.0) -> int:
    await asyncio.sleep(seconds)
    return proxy.rss()


async def scenario(name: str, n: int) -> None:
    """One figure in a fresh proxy: idle-h1, idle-h2, used-h1, used-h2 (10 requests each),
    batches (h2 connections opened, used and closed, 200 at a time)."""
    from tests.backend import Backend

    backend = await Backend().start()
    async with ServedProxy(backend.url) as proxy:
        before = await settle(proxy, 1)
        kind, _, alpn = name.partition("-")
        alpn = {"h1": "http/1.1"}.get(alpn, alpn)
        if kind == "idle":
            async with idle(proxy.https, alpn, n):
                held = await settle(proxy, 1)
        elif kind == "used":
            writers = await used(proxy.https, alpn, n, 10)
            held = await settle(proxy, 1)
            await close_all(writers)
        if kind in ("idle", "used"):
            after = await settle(proxy, 5)
            print(
                f"{name} x{n}: {before / 1024:.0f} MiB, +{(held - before) / n:.0f} KiB/conn,"
                f" {after / 1024:.0f} MiB 5 s after closing"
            )
        elif kind == "churn":
            print(f"{name} x{n}: MiB every 5 s:", await churn(proxy, n, 40.0))
        else:
            levels = [before // 1024]
            for _ in range(n // 200):
                writers = await used(proxy.https, "h2", 200, 3)
                await close_all(writers)
                levels.append(await settle(proxy, 1) // 1024)
            print(f"{name} x{n}: MiB after each 200: {levels}")
    await backend.stop()


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["idle-h1", "idle-h2", "used-h1", "used-h2", "batches"]:
        asyncio.run(scenario(arg, int(os.environ.get("N", "500"))))
