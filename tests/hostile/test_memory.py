"""Memory per TLS connection, read from `quicproxy serve`'s VmRSS (a process of its own):
idle h1 and h2 connections cost tens of KiB, not the 256 KiB receive buffer asyncio
gives each TLS connection; connections opened, used and closed in batches leave RSS
flat, not growing with every batch.

Measured on a loaded 2-core box (tests/hostile/memprobe.py): idle h1 +31 KiB, idle h2
+37 KiB per connection (both ~290 before one receive buffer per thread); batches of
200 h2 connections: 63, 56, 63, 62, 63 MiB (a first batch alone: 50 -> 60, was 50 -> 110).
"""

from __future__ import annotations

import asyncio

from tests.backend import Backend
from tests.hostile import memprobe

IDLE = 300
PER_IDLE_KIB = 90
"About 2x what an idle connection costs (31 h1, 37 h2); 290 before the fix."
BATCH = 200
BATCHES = 5
FIRST_BATCH_KIB = 120
"RSS kept per connection after the first batch closed: 50 (was 300)."
LATER_GROWTH_KIB = 16 * 1024
"RSS growth over the four later batches (800 connections): ~10 MiB."


async def test_idle_tls_connections_cost_tens_of_kib_and_batches_leave_rss_flat(certs):
    backend = await Backend().start()
    try:
        async with memprobe.ServedProxy(backend.url, cert=certs[0], key=certs[1]) as proxy:
            start = await memprobe.settle(proxy, 1.0)
            costs = {}
            async with memprobe.idle(proxy.https, "http/1.1", IDLE):
                with_h1 = await memprobe.settle(proxy, 1.0)
                costs["h1"] = (with_h1 - start) / IDLE
                async with memprobe.idle(proxy.https, "h2", IDLE):
                    costs["h2"] = (await memprobe.settle(proxy, 1.0) - with_h1) / IDLE
            await asyncio.sleep(1.0)
            base = proxy.rss()
            levels = []
            for _ in range(BATCHES):
                writers = await memprobe.used(proxy.https, "h2", BATCH, 3)
                await memprobe.close_all(writers)
                levels.append(await memprobe.settle(proxy, 1.0))
            assert proxy.proc is not None and proxy.proc.poll() is None
    finally:
        await backend.stop()
    print(f"KiB per idle connection {costs}; MiB after each batch {[x // 1024 for x in levels]}")
    assert costs["h1"] < PER_IDLE_KIB and costs["h2"] < PER_IDLE_KIB, costs
    assert levels[0] - base < BATCH * FIRST_BATCH_KIB, (base, levels)
    assert max(levels[1:]) - levels[0] < LATER_GROWTH_KIB, levels
    assert "Traceback" not in proxy.stderr and "ERROR" not in proxy.stderr, proxy.stderr[-2000:]
