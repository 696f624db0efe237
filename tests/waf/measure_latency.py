"""Per-evaluation latency, inline vs through the service (a measurement, not a test).

Run: ``python -m tests.waf.measure_latency [rounds]`` from the repository root.
The service runs in its own process; the corpus is replayed sequentially.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from quicproxy._config import WafConfig
from quicproxy.waf import InlineWaf, Waf, WafClient, engine_version
from quicproxy.waf._engine import InlineTransaction
from quicproxy.waf._rules import find_crs
from tests.helpers import free_port

from .corpus import ATTACKS, BENIGN
from .helpers import evaluate, inline_config, make_request


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms  p99 {p99 * 1000:.2f} ms  (n={len(ordered)})"


async def _measure(waf: Waf, rounds: int) -> list[float]:
    cases = ATTACKS + BENIGN
    samples = []
    for _ in range(rounds):
        for _name, method, uri, headers, body in cases:
            started = time.perf_counter()
            await evaluate(waf, method, uri, headers, body)
            samples.append(time.perf_counter() - started)
    return samples


def _engine_cpu(waf: InlineWaf, rounds: int) -> tuple[list[float], list[float]]:
    """Wall and CPU time of whole evaluations run in this thread (no event loop)."""
    wall, cpu = [], []
    for _ in range(rounds):
        for _name, method, uri, headers, body in ATTACKS + BENIGN:
            tx = InlineTransaction(waf.engine, make_request(method, uri, headers, body))
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                tx.evaluate(body)
            finally:
                tx._end(None)
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    return wall, cpu


async def _throughput(waf: Waf, total: int, concurrency: int) -> float:
    cases = ATTACKS + BENIGN
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            _name, method, uri, headers, body = cases[queue.pop() % len(cases)]
            await evaluate(waf, method, uri, headers, body)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def _wait_healthy(port: int) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            try:
                await http.get(f"http://127.0.0.1:{port}/health")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise RuntimeError("service did not start")


async def main(rounds: int) -> None:
    print(engine_version(), "CRS", ".".join(map(str, find_crs(inline_config().rules_dir).version)))
    direct = InlineWaf(inline_config())
    _engine_cpu(direct, 1)
    wall, cpu = _engine_cpu(direct, rounds)
    print(f"engine, same thread: wall {_percentiles(wall)}; cpu {_percentiles(cpu)}")
    direct.engine.close()

    async def inline() -> Waf:
        return InlineWaf(inline_config())

    port = free_port()
    code = (
        "from quicproxy._config import WafConfig; from quicproxy.waf import run_waf_service; "
        f"run_waf_service(WafConfig(mode='inline'), '127.0.0.1', {port})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])

    async def service() -> Waf:
        await _wait_healthy(port)
        url = f"http://127.0.0.1:{port}"
        return WafClient(WafConfig(mode="service", url=url, timeout_ms=10000))

    runs: list[tuple[str, Callable[[], Awaitable[Waf]]]] = [
        ("inline ", inline),
        ("service", service),
    ]
    try:
        for label, make in runs:
            waf = await make()
            await _measure(waf, 1)  # warm up
            samples = await _measure(waf, rounds)
            rate = await _throughput(waf, 2000, 16)
            print(f"{label}: {_percentiles(samples)}; {rate:.0f} req/s at concurrency 16")
            await waf.aclose()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
