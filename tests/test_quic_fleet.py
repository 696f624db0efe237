"""The QUIC keys a fleet shares (``quic.shared_secret_file``): a proxy that lost a
connection (it restarted, or a balancer moved the client) resets it statelessly with the
token the connection was given, and the client reconnects at once."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from quicproxy import Proxy
from tests.helpers import free_port, need_tool, proxy_config

CLIENTS = Path(__file__).parent / "clients"


def secret_file(path: Path, *secrets: bytes) -> str:
    path.write_text("".join(base64.b64encode(s).decode() + "\n" for s in secrets))
    return str(path)


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """quic-go's HTTP/3 client (tests/clients/h3_restart.go), built once: a client that
    recognises stateless resets (qh3 and aioquic clients do not: qh3 drops a datagram
    for an unknown connection ID before it looks for a reset token, aioquic never does)."""
    go = "/usr/local/go/bin/go" if os.path.isfile("/usr/local/go/bin/go") else None
    go = go or need_tool("go", "install Go (https://go.dev/dl/)")
    binary = tmp_path_factory.mktemp("go-h3") / "h3_restart"
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0:
        pytest.fail(f"go build of the quic-go client failed: {build.stderr.strip()[-500:]}")
    return str(binary)


class GoClient:
    """The quic-go client: one GET per ``get()``, over one kept connection."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    async def get(self) -> dict[str, Any]:
        self.proc.stdin.write(b"get\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        return json.loads(line)  # type: ignore[no-any-return]


@asynccontextmanager
async def go_client_for(binary: str, port: int, cafile: str) -> AsyncIterator[GoClient]:
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"https://127.0.0.1:{port}/hello",
        cafile,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield GoClient(proc)
    finally:
        proc.kill()
        await proc.wait()


@asynccontextmanager
async def proxy_process(config: Path, log: Path) -> AsyncIterator[Any]:
    """``quicproxy serve --config`` in a process of its own (to be killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "is listening" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the proxy did not start"
            await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_a_client_of_a_restarted_proxy_is_reset_and_reconnects_at_once(
    go_client, certs, backend, tmp_path
):
    secret = secret_file(tmp_path / "secret", os.urandom(32))
    http, https = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "http_port": http, "https_port": https},
                "tls": {"cert": certs[0], "key": certs[1]},
                "backend": backend.url,
                "quic": {"shared_secret_file": secret},
            }
        )
    )
    async with go_client_for(go_client, https, certs[0]) as client:
        async with proxy_process(config, tmp_path / "a.log") as first:
            first_get = await client.get()
            assert first_get.get("status") == 200, first_get
            assert (await client.get()).get("status") == 200  # the same connection
            first.send_signal(signal.SIGKILL)  # gone without a word to its clients
            first.wait(10)
        listen = {"host": "127.0.0.1", "http_port": http, "https_port": https}
        second = Proxy(
            proxy_config(certs, backend, listen=listen, quic={"shared_secret_file": secret})
        )
        await second.start()
        try:
            lost = await client.get()  # its datagrams reach a process that never knew it
            again = await client.get()
            resets = second._quic.stats["reset"]
        finally:
            await second.stop(grace=1)
    print(f"after the restart: {lost}, then {again}")
    assert lost.get("reset") is True, lost  # quic-go's StatelessResetError
    assert lost["seconds"] < 3.0  # not its 30 s idle timeout
    assert resets >= 1
    assert again["status"] == 200 and again["seconds"] < 2.0, again
