"""Per-evaluation latency of each engine, inline vs through the service (a measurement,
not a test): the engine's own CPU per evaluation, beside what the bench adds on top.

Run: ``python -m tests.waf.measure_latency [rounds] [coraza|modsecurity]`` from the
repository root. The service runs in its own process; the corpus is replayed sequentially.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from quicproxy._config import WafConfig
from quicproxy.waf import CorazaWaf, InlineWaf, Waf, WafClient, inline_waf, waf_info
from quicproxy.waf._coraza import CorazaTransaction
from quicproxy.waf._coraza_lib import library_path
from quicproxy.waf._engine import InlineTransaction
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


def _engine_cpu(waf: CorazaWaf | InlineWaf, rounds: int) -> tuple[list[float], list[float]]:
    """Wall and CPU time of whole evaluations run in this thread (no event loop)."""
    wall, cpu = [], []
    for _ in range(rounds):
        for _name, method, uri, headers, body in ATTACKS + BENIGN:
            request = make_request(method, uri, headers, body)
            tx: CorazaTransaction | InlineTransaction
            if isinstance(waf, CorazaWaf):
                tx = CorazaTransaction(waf.engine, request)
            else:
                tx = InlineTransaction(waf.engine, request)
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


async def main(rounds: int, engine: str) -> None:
    config = inline_config(engine=engine)
    direct = inline_waf(config)
    info = waf_info(direct, config)
    print(f"{info.engine} {info.engine_version}, CRS {info.crs_version}, {info.rules} rules")
    _engine_cpu(direct, 1)
    wall, cpu = _engine_cpu(direct, rounds)
    print(f"engine, same thread: wall {_percentiles(wall)}; cpu {_percentiles(cpu)}")
    direct.engine.close()

    async def inline() -> Waf:
        return inline_waf(config)

    port = free_port()
    code = (
        "from quicproxy._config import WafConfig; from quicproxy.waf import run_waf_service; "
        f"run_waf_service(WafConfig(mode='inline', engine='{engine}'), '127.0.0.1', {port})"
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
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    built = os.path.isfile(library_path())
    for name in sys.argv[2:] or (["coraza"] if built else []) + ["modsecurity"]:
        asyncio.run(main(count, name))
