"""SIGTERM drain with h1/TCP connections in every state: quiet, and in-flight requests finish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from tests.backend import Backend
from tests.helpers import free_port
from tests.hostile.raw import exchange, status_of, tls_context


async def _up(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            head = b"GET /_gwhealthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            if status_of(await exchange(port, head, timeout=1)) == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("proxy did not come up")


async def test_sigterm_with_idle_partial_and_busy_h1_connections_is_quiet(tmp_path, certs):
    backend = await Backend().start()
    http, https = free_port(), free_port()
    log = tmp_path / "proxy.log"
    args = ["serve", "--host", "127.0.0.1", "--http-port", str(http), "--https-port", str(https)]
    args += ["--backend", backend.url, "--cert", certs[0], "--key", certs[1]]
    config = tmp_path / "proxy.yaml"
    config.write_text("shutdown_grace: 3\nlisten:\n  plain_http: proxy\n")
    args += ["--config", str(config)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(tmp_path)},
        )
    try:
        await _up(http)
        idle = await asyncio.open_connection("127.0.0.1", http)
        partial = await asyncio.open_connection("127.0.0.1", http)
        partial[1].write(b"GET / HTTP/1.1\r\nHo")
        tls_idle = await asyncio.open_connection("localhost", https, ssl=tls_context(certs))
        slow_head = b"GET /slow?s=2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        busy = asyncio.ensure_future(
            exchange(https, slow_head, ssl_ctx=tls_context(certs), timeout=10)
        )
        body = asyncio.ensure_future(
            exchange(
                https,
                b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n01",
                ssl_ctx=tls_context(certs),
                timeout=3,
            )
        )
        not_reading = await asyncio.open_connection("127.0.0.1", http)
        not_reading[1].write(b"GET /bytes/50000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        answer = await busy
        await body
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        for _, writer in (idle, partial, tls_idle, not_reading):
            writer.transport.abort()
    finally:
        if proc.poll() is None:
            proc.kill()
        await backend.stop()
    assert status_of(answer) == 200 and answer.endswith(b"slow done")
    assert code == 0  # the stalled download ran past the grace period: logged, not an error
    text = log.read_text()
    for noise in ("Traceback", "CancelledError", "never retrieved", "Exception in callback"):
        assert noise not in text, text
