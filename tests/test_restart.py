"""A restart that drops no HTTP/3 connection: process B (`quicproxy serve`) starts on the
ports of process A while A runs (SO_REUSEPORT), then A gets SIGTERM. A keeps its
established QUIC connections until they finish (a download in progress, requests in
flight): the datagrams of A's connections that the kernel now hashes to B are handed to A
by connection ID (its generation byte), and a new connection goes to B, even when its
datagrams hash to A. A's GOAWAY moves a client's next request to a new connection (B's);
one sent on A's connection anyway is refused unprocessed. TCP the same: B accepts, A drains."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from quicproxy._client import h3_client
from tests.backend import Backend, pattern_bytes
from tests.helpers import free_port, tcp_client

OLD = 100
"Connections opened to A before the restart."
NEW = 8
"Connections opened after A got SIGTERM."
DOWNLOAD = 48 << 20
"Bytes of the download in progress on A across the restart."


async def _until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def _serve(config: Path, log: Path, workers: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`quicproxy serve --config` with its output in ``log``, once it listens."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", "serve", "--config", str(config)]
            + ["--workers", str(workers)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await _until(lambda: "is listening" in log.read_text(), 30, f"{log.name}: the banner")
        if workers > 1:
            await asyncio.sleep(1.0)  # the banner is the first worker's
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _paths(log: Path) -> list[str]:
    """Paths of the access-log lines in ``log``."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line)["path"])
            except (ValueError, KeyError):
                continue
    return found


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_serve_takes_over_and_the_first_keeps_its_connections(
    tmp_path, certs, workers
):
    backend = await Backend().start()
    http, https = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    data = {
        "listen": {"host": "127.0.0.1", "http_port": http, "https_port": https},
        "tls": {"cert": certs[0], "key": certs[1]},
        "backend": backend.url,
        "shutdown_grace": 30,
        "quic": {"handover_dir": str(tmp_path / "handover")},
    }
    config.write_text(json.dumps(data))
    url = f"https://localhost:{https}/"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    try:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(_serve(config, log_a, workers))
            old = [
                await stack.enter_async_context(h3_client(url, cafile=certs[0])) for _ in range(OLD)
            ]
            for i, client in enumerate(old):
                assert (await client.request("GET", f"/before-{i}")).status == 200
            digest = hashlib.sha256()
            download = asyncio.ensure_future(
                old[0].request(
                    "GET", f"/bytes/{DOWNLOAD}", keep_body=False, hasher=digest, timeout=120
                )
            )
            tcp_old = await stack.enter_async_context(tcp_client(certs, http2=True))
            before = await tcp_old.get(f"https://localhost:{https}/tcp-before")
            assert before.status_code == 200 and before.http_version == "HTTP/2"
            await asyncio.sleep(0.3)
            b = await stack.enter_async_context(_serve(config, log_b, workers))
            # in flight across the SIGTERM, on connections hashed to A and B alike now
            slow = [
                asyncio.ensure_future(client.request("GET", "/slow?s=4", timeout=60))
                for client in old[1:]
            ]
            tcp_slow = asyncio.ensure_future(tcp_old.get(f"https://localhost:{https}/slow?s=4"))
            await asyncio.sleep(0.3)
            a.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # A has stopped taking connections
            # after A's GOAWAY a new request on its connection is refused unprocessed
            # (H3_REQUEST_REJECTED: safe to retry), and its retry on a new connection is B's
            during = await old[2].request("GET", "/during", timeout=10)
            async with h3_client(url, cafile=certs[0]) as client:
                retried = (await client.request("GET", "/during-retried", timeout=20)).status
            fresh = []
            for j in range(NEW):
                async with h3_client(url, cafile=certs[0]) as client:
                    fresh.append((await client.request("GET", f"/new-{j}", timeout=20)).status)
            async with tcp_client(certs, http2=True) as tcp:
                tcp_new = [
                    (await tcp.get(f"https://localhost:{https}/tcp-new-{j}")).status_code
                    for j in range(NEW)
                ]
            answers = await asyncio.gather(*slow)
            tcp_answer = (await tcp_slow).status_code
            got = await download
            code_a = await asyncio.get_running_loop().run_in_executor(None, a.wait, 40)
            left = sorted(p.name for p in (tmp_path / "handover" / str(https)).iterdir())
            assert b.poll() is None  # B serves on
    finally:
        await backend.stop()
    paths_a, paths_b = _paths(log_a), _paths(log_b)
    assert [r.status for r in answers] == [200] * (OLD - 1)  # 0 failed on old connections
    assert got.status == 200 and got.size == DOWNLOAD
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(DOWNLOAD)).hexdigest()
    assert fresh == [200] * NEW and tcp_new == [200] * NEW
    assert during.reset and during.status == 0 and retried == 200
    assert "/during" not in paths_a + paths_b and "/during-retried" in paths_b
    assert tcp_answer == 200  # a TCP request in flight on A completes
    new_paths = {f"/new-{j}" for j in range(NEW)} | {f"/tcp-new-{j}" for j in range(NEW)}
    assert new_paths <= set(paths_b), sorted(new_paths - set(paths_b))
    assert not new_paths & set(paths_a)  # every new connection went to B
    # A served its own connections' requests to the end
    assert sum(p.startswith("/slow") for p in paths_a) == OLD
    assert not any(p.startswith("/slow") for p in paths_b)
    assert code_a == 0, log_a.read_text()[-2000:]
    assert len(left) == workers  # A's hand-over sockets went with it: B's are left


def test_handover_dir_must_be_absolute():
    from quicproxy._config import load_config
    from quicproxy._errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"quic": {"handover_dir": "run/quicproxy"}})
    assert "quic.handover_dir" in str(caught.value) and "\n" not in str(caught.value)
    folder = "/tmp/quicproxy-test-handover"
    cfg = load_config(env={}, overrides={"quic": {"handover_dir": folder}})
    assert cfg.quic.handover_dir == folder


def test_handover_folder_is_refused_when_others_can_write_to_it(tmp_path):
    from quicproxy._config import load_config
    from quicproxy.quic._listen import handover_folder

    base = tmp_path / "handover"
    cfg = load_config(env={}, overrides={"quic": {"handover_dir": str(base)}})
    folder = handover_folder(cfg, 8443)
    assert folder == str(base / "8443") and (os.stat(folder).st_mode & 0o777) == 0o700
    os.chmod(base, 0o777)  # anyone could put a socket there and inject datagrams
    with pytest.raises(OSError):
        handover_folder(cfg, 8443)
