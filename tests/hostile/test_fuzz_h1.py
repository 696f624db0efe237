"""A bounded, seeded fuzz run of the HTTP/1.1 entry point: no traceback, still serving."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import re
import time

from tests.hostile.raw import exchange, health_seconds, status_of

BUDGET = 40.0
"Seconds of fuzzing (the whole test stays under a minute)."

VALID = [
    b"GET /hello?x=1 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\nhello world",
    b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD /hello HTTP/1.1\r\nHost: localhost:80\r\nConnection: keep-alive\r\n\r\n"
    b"GET /headers HTTP/1.1\r\nHost: localhost\r\nCookie: a=b\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: [::1]\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
]
INSERTS = [b"\r", b"\n", b"\x00", b"\r\n", b" ", b":", b"\t", b"\x7f", b"\xff", b"\r\n\r\n"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # bit flips
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del buf[pos:]
        elif op == 2:  # inserted CR / LF / NUL / odd bytes
            buf[pos:pos] = rng.choice(INSERTS)
        elif op == 3:  # huge lengths
            huge = rng.choice([b"99999999999999999999", b"ffffffffffffffff", b"-1", b"1e9"])
            text = re.sub(rb"\d+", huge, bytes(buf), count=1)
            buf = bytearray(text)
        elif op == 4:  # a header repeated many times
            line = b"X-Fuzz: " + b"v" * rng.randint(0, 100) + b"\r\n"
            at = buf.find(b"\r\n") + 2
            buf[at:at] = line * rng.choice([2, 50, 150, 2000])
        elif op == 5:  # a byte range removed
            del buf[pos : pos + rng.randint(1, 20)]
        elif op == 6:  # two requests spliced
            other = rng.choice(VALID)
            buf = buf[:pos] + bytearray(other[rng.randrange(len(other)) :])
        else:  # a duplicated framing header
            buf = bytearray(
                bytes(buf).replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n", 1)
                if rng.random() < 0.5
                else bytes(buf).replace(b"Host:", b"Host: a\r\nHost:", 1)
            )
    return bytes(buf)


async def test_fuzzed_http1_requests_cause_no_traceback_and_service_goes_on(
    make_proxy, backend, caplog
):
    caplog.set_level(logging.INFO)
    proxy = await make_proxy(
        backend,
        listen={"plain_http": "proxy"},
        timeouts={"header": 0.5, "body": 0.5, "idle": 0.5},
    )
    rng = random.Random(9)
    statuses: dict[int, int] = {}
    cases = 0
    started = time.monotonic()
    while time.monotonic() - started < BUDGET:
        batch = [mutate(rng, rng.choice(VALID)) for _ in range(16)]
        answers = await asyncio.gather(
            *(exchange(proxy.http_port, data, timeout=2) for data in batch),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                assert isinstance(answer, ConnectionError), answer
                continue
            for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer):
                statuses[int(status)] = statuses.get(int(status), 0) + 1
        cases += len(batch)
    gc.collect()  # "Task exception was never retrieved" is logged when a task is freed
    await asyncio.sleep(0.1)
    print(f"fuzz: {cases} cases in {time.monotonic() - started:.0f} s, statuses {statuses}")
    assert cases > 300
    assert 500 not in statuses, statuses
    assert statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0, statuses
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad[:5]]
    assert "Traceback" not in caplog.text
    assert await health_seconds(proxy) < 1.0
    good = b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert status_of(await exchange(proxy.http_port, good)) == 200
