"""Tools for attack tests: a health prober, process memory and descriptors, raw QUIC packets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import socket
import ssl
import time
from typing import Any

import httpx
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


def rss_kib() -> int:
    """Resident memory of this process (the in-process proxy), KiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class HealthProbe:
    """Asks /_gwhealthz on the plain port every ``every`` seconds while an attack runs;
    records the slowest answer and every failure."""

    def __init__(self, port: int, every: float = 0.2) -> None:
        self.url = f"http://127.0.0.1:{port}/_gwhealthz"
        self.every = every
        self.slowest = 0.0
        self.answers = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                started = time.monotonic()
                try:
                    resp = await client.get(self.url)
                    if resp.status_code != 200:
                        self.failures.append(f"status {resp.status_code}")
                    self.answers += 1
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)
                await asyncio.sleep(self.every)

    async def __aenter__(self) -> HealthProbe:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def client_initial(port: int, host: str = "127.0.0.1") -> bytes:
    """The first datagram (a padded Initial with a ClientHello) of a real aioquic client."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
    cfg.verify_mode = ssl.CERT_NONE
    conn = QuicConnection(configuration=cfg)
    conn.connect((host, port), now=time.monotonic())
    data, _ = conn.datagrams_to_send(now=time.monotonic())[0]
    return data


def split_client_hello(port: int, host: str = "127.0.0.1") -> tuple[Any, list[bytes]]:
    """A real qh3 client and its first datagrams: its post-quantum key share
    (X25519MLKEM768) makes the ClientHello span two padded Initials."""
    from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
    from qh3.quic.connection import QuicConnection as Qh3Connection

    cfg = Qh3Configuration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
    cfg.verify_mode = ssl.CERT_NONE
    conn = Qh3Connection(configuration=cfg)
    now = time.monotonic()
    conn.connect((host, port), now=now)
    datagrams: list[bytes] = []
    for step in range(100):  # qh3 paces the second datagram a few ms behind the first
        datagrams += [data for data, _ in conn.datagrams_to_send(now=now + step * 0.01)]
        if len(datagrams) > 1:
            break
    return conn, datagrams


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``: until a non-blocking read would block, or a
    socket with a timeout has waited that long for the next one."""
    got = []
    while True:
        try:
            got.append(sock.recv(65535))
        except (BlockingIOError, TimeoutError):
            return got


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def flood(sources: list[str], packets: list[bytes], port: int, seconds: float) -> int:
    """Send ``packets`` round-robin from UDP sockets bound to ``sources``, evenly over
    ``seconds``; returns how many were sent. Meant for :func:`in_process`."""
    socks = [udp_socket(host) for host in sources]
    start = time.monotonic()
    sent = 0
    for i, data in enumerate(packets):
        try:
            socks[i % len(socks)].sendto(data, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
        ahead = start + seconds * (i + 1) / len(packets) - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    for sock in socks:
        sock.close()
    return sent


async def in_process(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a forked process: an attacker is another program, and must not
    share this interpreter's lock with the proxy under test."""
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
