"""The WAF engine's own time per evaluation of the request the latency test sends, measured
in this process's thread (no event loop, no pool, no proxy): the figure the bench sets
beside the latency the WAF adds through the proxy, so the proxy's overhead shows.

Evaluations are paced at the latency test's request rate: an engine called every 10 ms
runs about twice as long as one called back to back (caches go cold between calls), and
the latency test meets the former.

Run: ``python -m bench.waf_engine ENGINE ROUNDS RATE``; prints one JSON line
{"wall_p50_ms", "cpu_p50_ms", "wall_p99_ms", "n", "rate", "engine", "crs"}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from bench.targets import NAME
from bench.workloads import OHA_VERSION


def measure(engine: str, rounds: int, rate: float) -> dict[str, object]:
    from quicproxy._config import WafConfig
    from quicproxy.waf import WafRequest, inline_waf, waf_info

    config = WafConfig(mode="inline", engine=engine)
    waf = inline_waf(config, workers=1)
    info = waf_info(waf, config)
    # What oha sends on HTTP/3 for the latency test (GET {url}/1k), as the proxy hands it over.
    request = WafRequest(
        method="GET",
        uri="/1k",
        headers=[("host", NAME), ("user-agent", f"oha/{OHA_VERSION}"), ("accept", "*/*")],
        protocol="HTTP/3",
        remote_addr="127.0.0.1",
        remote_port=40000,
        server_addr="127.0.0.1",
        server_port=443,
        has_body=False,
    )
    wall: list[float] = []
    cpu: list[float] = []
    try:
        due = time.perf_counter()
        for i in range(rounds + rounds // 10):
            due += 1 / rate
            w, c = time.perf_counter(), time.thread_time()
            decision = waf.evaluate_here(request)
            if i >= rounds // 10:  # the first tenth warms caches up
                wall.append(time.perf_counter() - w)
                cpu.append(time.thread_time() - c)
            if not decision.allowed:
                raise RuntimeError(f"{engine} refused the bench request: {decision}")
            time.sleep(max(0.0, due - time.perf_counter()))
    finally:
        waf.engine.close()
    wall.sort()
    return {
        "engine": f"{info.engine} {info.engine_version}",
        "crs": info.crs_version,
        "n": len(wall),
        "rate": rate,
        "wall_p50_ms": statistics.median(wall) * 1000,
        "wall_p99_ms": wall[min(len(wall) - 1, int(len(wall) * 0.99))] * 1000,
        "cpu_p50_ms": statistics.median(cpu) * 1000,
    }


if __name__ == "__main__":
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 100.0
    print(json.dumps(measure(sys.argv[1], rounds, rate)))
