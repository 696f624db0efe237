"""The TLS memory clients (bench/idle_tcp.py) and their workloads against a small real TLS
server (h1 and h2 by ALPN) on loopback, run in a thread: connections held and counted,
connections churned with one request each. No RSS bound: the figures' arithmetic only."""

from __future__ import annotations

import asyncio
import math
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import workloads
from bench.certs import make_cert
from bench.targets import Target

ROOT = Path(__file__).resolve().parent.parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Server:
    """Answers h1 requests with 200 "ok", h2 HEADERS on a stream with :status 200 and
    END_STREAM; counts connections (open now, in all) and requests."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.open = self.total = self.requests = 0
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.ctx, backlog=512)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.total += 1
        try:
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2":
                await self._h2(reader, writer)
            else:
                while await reader.readuntil(b"\r\n\r\n"):
                    self.requests += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE))
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS
        while True:
            head = await reader.readexactly(9)
            await reader.readexactly(int.from_bytes(head[:3], "big"))
            if head[3] == 0x1:  # HEADERS: answer :status 200 (static index 8), END_STREAM
                self.requests += 1
                writer.write(b"\x00\x00\x01\x01\x05" + head[5:9] + b"\x88")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    with Server(cert, key) as s:
        yield s


def wait_until(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def client(server: Server, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.idle_tcp", args[0], "127.0.0.1", str(server.port), *args[1:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_hold_keeps_n_connections_open_until_stdin_closes(server: Server, proto: str) -> None:
    before = server.total
    proc = client(server, "hold", proto, "40", "60")
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().split() == ["READY", "40", "0"]
        requests = server.requests
        assert wait_until(lambda: server.open == 40)
        assert server.total - before == 40
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until(lambda: server.open == 0)
    assert server.requests == requests  # idle: nothing asked


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_churn_opens_uses_and_closes_each_connection(server: Server, proto: str) -> None:
    total, requests = server.total, server.requests
    proc = client(server, "churn", proto, "50", "8")
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["DONE", "50", "0"]
    assert server.total - total == 50 and server.requests - requests == 50


def test_workloads_report_per_connection_and_after_churn(server: Server) -> None:
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        t = Target("t", "quicproxy", procs=[stand_in])
        t.urls = {p: f"https://localhost:{server.port}" for p in ("h1", "h2", "h3")}
        s = workloads.Settings(idle_conns=30, churn_conns=40, churn_conc=4, warm=0.1)
        got = {}
        for p in ("h1", "h2"):
            got.update(workloads.idle_tcp_memory(t, s, p))
        got.update(workloads.churn_memory(t, s))
    finally:
        stand_in.kill()
        stand_in.wait()
    assert set(got) == {"rss_per_conn/h1", "rss_per_conn/h2", "rss_churn/h2"}
    assert all(math.isfinite(v) for v in got.values())
    assert got["rss_churn/h2"] > 0
    assert all(k in workloads.FIGURES for k in got)
