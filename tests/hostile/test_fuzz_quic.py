"""A bounded, seeded fuzz run of the QUIC entry point: mutated Initials (unknown
connections) and mutated packets aimed at an established connection's IDs.
Asserts no traceback in the log and that HTTP/3 is still served afterwards."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from tests.helpers import fetch, h3
from tests.hostile.probe import client_initial, in_thread, udp_socket

BUDGET = 20.0
"Seconds of fuzzing."


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # bit flips anywhere, the header included
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 2:  # a random length / CID length byte
            if len(buf) > 16:
                buf[rng.choice([5, 14, 15, 16])] = rng.randrange(256)
        elif op == 3:  # random bytes spliced in
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == 4:  # first byte: long/short header, packet type, reserved bits
            if buf:
                buf[0] = rng.randrange(256)
        else:  # duplicated tail
            buf += buf[rng.randrange(len(buf) + 1) :]
    return bytes(buf[:65000])


async def test_fuzzed_datagrams_leave_no_traceback_and_h3_keeps_working(
    make_proxy, backend, certs, caplog
):
    caplog.set_level(logging.WARNING)
    proxy = await make_proxy(backend, quic={"handshake_timeout": 2.0})
    port = proxy.https_port
    seeds = [client_initial(port) for _ in range(20)]
    rng = random.Random(11)
    sock = udp_socket()
    sent = 0
    async with h3(proxy, certs) as client:
        assert (await client.request("GET", "/before")).status == 200
        listener = proxy._quic
        cids = list(listener.by_cid)
        deadline = time.monotonic() + BUDGET

        def fuzz() -> int:
            count = 0
            while time.monotonic() < deadline:
                for _ in range(50):
                    if rng.random() < 0.5:
                        data = mutate(rng, rng.choice(seeds))
                    else:  # a short-header packet for the live connection, mutated
                        cid = rng.choice(cids)
                        body = rng.randbytes(rng.randint(20, 1300))
                        data = mutate(rng, bytes([0x40 | rng.randrange(64)]) + cid + body)
                    try:
                        sock.sendto(data, ("127.0.0.1", port))
                        count += 1
                    except OSError:
                        pass
                time.sleep(0.01)
            return count

        sent = await in_thread(fuzz)
        await asyncio.sleep(0.5)
        after = await client.request("GET", "/after-fuzz", timeout=10)
    sock.close()
    status, _, _ = await fetch(proxy, certs, "h3", "GET", "/new-connection")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert sent > 2000
    assert errors == [], [r.getMessage() for r in errors[:5]]
    assert after.status == 200 and status == 200
    print(f"QUIC fuzz: {sent} datagrams, {listener.stats}")
