"""`--workers N`: a dead worker is replaced, and the exit code tells whether one died."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.backend import Backend
from tests.helpers import free_port, need_tool
from tests.hostile.raw import exchange, status_of


def listeners_of(port: int) -> str:
    """`ss` line(s) of the TCP listeners on ``port``, naming their processes."""
    ss = need_tool("ss", "apt-get install iproute2")
    cmd = [ss, "-ltnpH", f"sport = :{port}"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


async def health(port: int) -> tuple[int, float]:
    started = time.monotonic()
    head = b"GET /_gwhealthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = await exchange(port, head, timeout=3)
    return status_of(answer), time.monotonic() - started


@asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[Any, int, Path]]:
    """`quicproxy serve --workers 2`, output to a file; yields (process, http port, log)."""
    backend = await Backend().start()
    http, https = free_port(), free_port()
    log = tmp_path / "proxy.log"
    args = ["serve", "--host", "127.0.0.1", "--http-port", str(http), "--https-port", str(https)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", *args, "--backend", backend.url, "--workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(tmp_path)},
        )
    try:
        await until(lambda: len(workers_of(proc.pid)) == 2, 20, "two workers")
        await until(lambda: "is listening" in log.read_text(), 20, "the banner")
        yield proc, http, log
    finally:
        if proc.poll() is None:
            for pid in workers_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait(10)
        await backend.stop()


async def exit_code(proc: Any) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)


async def test_worker_killed_with_sigkill_is_restarted_and_parent_exits_nonzero(tmp_path):
    async with two_workers(tmp_path) as (proc, http, log):
        before = workers_of(proc.pid)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: "killed by signal SIGKILL" in log.read_text(), 10, "the log line")
        answers = [await health(http) for _ in range(10)]  # the other worker answers meanwhile
        await until(lambda: len(workers_of(proc.pid)) == 2, 10, "a replacement worker")
        assert victim not in workers_of(proc.pid)
        [replacement] = set(workers_of(proc.pid)) - {victim} - set(before)
        await until(lambda: f"pid={replacement}," in listeners_of(http), 10, "it listening")
        answers += [await health(http) for _ in range(20)]
        assert [status for status, _ in answers] == [200] * 30
        assert max(seconds for _, seconds in answers) < 1.0
        lines = [line for line in log.read_text().splitlines() if "SIGKILL" in line]
        assert len(lines) == 1 and f"pid {victim}" in lines[0] and "restarting" in lines[0]
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc) == 1
    assert "Traceback" not in log.read_text()


async def test_worker_that_exits_cleanly_is_restarted_and_parent_exits_zero(tmp_path):
    async with two_workers(tmp_path) as (proc, http, log):
        victim = workers_of(proc.pid)[1]
        os.kill(victim, signal.SIGTERM)  # drains and exits 0, but nobody asked the parent
        await until(lambda: "exited with status 0" in log.read_text(), 15, "the log line")
        await until(lambda: len(workers_of(proc.pid)) == 2, 10, "a replacement worker")
        assert (await health(http))[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc) == 0
    assert "Traceback" not in log.read_text()
