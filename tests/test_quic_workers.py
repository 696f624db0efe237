"""Several workers on one QUIC port: a client whose address changes mid-transfer reaches
a worker that does not know its connection; that worker hands the datagrams to the owner
(connection IDs carry the owner's index) and the transfer completes. The same across two
runs on the port (a restart: connection IDs carry the run's generation too)."""

from __future__ import annotations

import asyncio
import hashlib
import socket

from quicproxy import Proxy
from quicproxy.quic._listen import Workers
from tests.backend import pattern_bytes
from tests.helpers import free_port, h3, proxy_config


async def rebind(proto) -> None:
    """Move the client to a new local UDP port, as a NAT rebinding would."""
    old = proto._transport
    family = old.get_extra_info("socket").family
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: proto, sock=sock)
    old.close()


async def test_rebinding_client_is_handed_to_the_worker_that_owns_its_connection(
    certs, backend, tmp_path
):
    http, https = free_port(), free_port()
    ports = {"listen": {"host": "127.0.0.1", "http_port": http, "https_port": https}}
    proxies = []
    for index in range(2):
        cfg = proxy_config(certs, backend, **ports)
        proxy = Proxy(cfg, reuse_port=True, workers=Workers(index, 2, str(tmp_path)))
        await proxy.start()
        proxies.append(proxy)
    try:
        size = 6_000_000
        async with h3(proxies[0], certs) as client:
            assert (await client.request("GET", "/warm-up")).status == 200
            digest = hashlib.sha256()
            download = asyncio.ensure_future(
                client.request("GET", f"/bytes/{size}", keep_body=False, hasher=digest)
            )
            moves = 0
            while moves < 12:  # each new port has an even chance to hash to the other worker
                await asyncio.sleep(0.2)
                await rebind(client.proto)
                moves += 1
                ping = await client.request("GET", f"/ping-{moves}", timeout=20)
                assert ping.status == 200
                if sum(p._quic.stats["handed_over"] for p in proxies) > 0 and moves >= 3:
                    break
            resp = await asyncio.wait_for(download, 60)
            after = await client.request("GET", "/after-moves")
            owners = [len(p._quic.connections) for p in proxies]  # while it is open
        handed = [p._quic.stats["handed_over"] for p in proxies]
    finally:
        for proxy in proxies:
            await proxy.stop(grace=1)
    assert resp.status == 200 and resp.size == size
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert after.status == 200
    assert sum(handed) > 0, f"no datagram crossed workers in {moves} moves: {handed}"
    assert sorted(owners) == [0, 1]  # one worker owned the connection throughout


async def test_a_new_run_on_the_port_hands_the_old_runs_datagrams_back(certs, backend, tmp_path):
    """Two runs (generations 1 and 2) on one port, as during a restart: the old run's
    connection keeps working while its client's datagrams reach the new run (the client
    moves to new ports), and a new connection is the new run's even while the old one
    drains and its Initials reach the old run."""
    http, https = free_port(), free_port()
    ports = {"listen": {"host": "127.0.0.1", "http_port": http, "https_port": https}}
    runs = []
    for generation in (1, 2):
        cfg = proxy_config(certs, backend, **ports)
        workers = Workers(0, 1, str(tmp_path), generation=generation)
        runs.append(Proxy(cfg, reuse_port=True, workers=workers))
    old, new = runs
    await old.start()
    try:
        size = 6_000_000
        async with h3(old, certs) as client:
            assert (await client.request("GET", "/before")).status == 200
            digest = hashlib.sha256()
            download = asyncio.ensure_future(
                client.request("GET", f"/bytes/{size}", keep_body=False, hasher=digest)
            )
            await new.start()
            await asyncio.sleep(0.1)
            old._quic.drain()  # SIGTERM's first step: no new connection is taken
            moves = 0
            while moves < 12 and not (new._quic.stats["handed_over"] and moves >= 3):
                await asyncio.sleep(0.2)
                await rebind(client.proto)
                moves += 1
            resp = await asyncio.wait_for(download, 60)
            owners = (len(old._quic.connections), len(new._quic.connections))
        fresh = []
        for _ in range(6):  # each has an even chance to hash to the old run
            async with h3(new, certs) as other:
                fresh.append((await other.request("GET", "/new")).status)
        old_stats, new_stats = dict(old._quic.stats), dict(new._quic.stats)
    finally:
        for run in runs:
            await run.stop(grace=1)
    assert resp.status == 200 and resp.size == size
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    # the old run owned the connection throughout (the new one never did); once the
    # download ended, the draining old run may already have closed it
    assert owners in ((1, 0), (0, 0))
    assert new_stats["handed_over"] > 0, f"nothing crossed in {moves} moves"
    assert fresh == [200] * 6 and old_stats["handshakes"] == 1  # new ones are the new run's
    assert new_stats["handshakes"] == 6
    print(
        f"handed over: old run {old_stats['handed_over']} (dropped "
        f"{old_stats['handover_dropped']}), new run {new_stats['handed_over']} (dropped "
        f"{new_stats['handover_dropped']}) in {moves} moves"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # both runs' sockets are gone
