"""Rate limiting: token buckets per client address, 429 + Retry-After on every
protocol, an allow-list, and a bucket table that stays bounded under a flood."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest

from quicproxy._config import RateLimitConfig
from quicproxy._metrics import metrics
from quicproxy._ratelimit import RateLimiter
from tests.helpers import fetch_from

PROTOCOLS = ["h1", "h2", "h3"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **kw: object) -> RateLimiter:
    return RateLimiter(RateLimitConfig(enabled=True, **kw), clock)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the limiter itself


def test_burst_then_refill_at_rate():
    clock = Clock()
    rl = limiter(clock, rate=2.0, burst=3)
    assert [rl.check("10.0.0.1") for _ in range(3)] == [None, None, None]
    wait = rl.check("10.0.0.1")
    assert wait is not None and 0.4 < wait <= 0.5  # one token comes in 1/rate seconds
    clock.now += 0.5
    assert rl.check("10.0.0.1") is None
    assert rl.check("10.0.0.1") is not None
    clock.now += 100  # refill stops at the burst size
    assert [rl.check("10.0.0.1") for _ in range(4)].count(None) == 3


def test_clients_have_separate_buckets():
    rl = limiter(Clock(), rate=1.0, burst=1)
    assert rl.check("10.0.0.1") is None
    assert rl.check("10.0.0.1") is not None
    assert rl.check("10.0.0.2") is None


def test_per_route_buckets_only_when_asked():
    shared = limiter(Clock(), rate=1.0, burst=1)
    assert shared.check("10.0.0.1", "/api") is None
    assert shared.check("10.0.0.1", "/static") is not None
    split = limiter(Clock(), rate=1.0, burst=1, per_route=True)
    assert split.check("10.0.0.1", "/api") is None
    assert split.check("10.0.0.1", "/static") is None
    assert split.check("10.0.0.1", "/api") is not None


def test_allow_listed_networks_are_never_limited_nor_stored():
    rl = limiter(Clock(), rate=1.0, burst=1, allow=["10.1.0.0/16", "::1"])
    assert all(rl.check("10.1.2.3") is None for _ in range(50))
    assert all(rl.check("::ffff:10.1.2.3") is None for _ in range(5))
    assert all(rl.check("::1") is None for _ in range(5))
    assert len(rl) == 0
    assert rl.check("10.2.0.1") is None and rl.check("10.2.0.1") is not None


def test_100k_distinct_addresses_keep_the_table_bounded():
    rl = limiter(Clock(), rate=1.0, burst=1, max_entries=10_000)
    tracemalloc.start()
    base = int(ipaddress.IPv4Address("11.0.0.0"))
    for i in range(100_000):
        assert rl.check(str(ipaddress.IPv4Address(base + i))) is None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rl) == 10_000
    assert peak < 8 << 20, f"peak {peak} bytes"
    print(f"table size after 100000 addresses: {len(rl)}; peak memory {peak / 1e6:.1f} MB")
    # the most recent addresses are still limited; the oldest were forgotten
    assert rl.check(str(ipaddress.IPv4Address(base + 99_999))) is not None
    assert rl.check(str(ipaddress.IPv4Address(base))) is None


def test_hostile_keys_do_not_raise():
    rl = limiter(Clock(), rate=1.0, burst=1, allow=["10.0.0.0/8"], max_entries=4)
    for key in ["", "not an ip", "x" * 100_000, "fe80::1%eth0", "\0\n\r", "::ffff:1.2.3.4"]:
        rl.check(key)
    assert len(rl) <= 4


def test_retry_after_is_whole_seconds_at_least_one():
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(1.2) == "2"


# ------------------------------------------------------------------ over the wire

LIMITED = {"rate_limit": {"enabled": True, "rate": 0.05, "burst": 3}}  # a token per 20 s


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_client_over_its_rate_gets_429_while_another_is_served(
    make_proxy, backend, certs, proto
):
    proxy = await make_proxy(backend, **LIMITED)
    statuses = [(await fetch_from("127.0.0.1", proxy, certs, proto, "/a"))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers, body = await fetch_from("127.0.0.1", proxy, certs, proto, "/a")
    assert status == 429, body
    assert 1 <= int(headers["retry-after"]) <= 20
    assert headers["x-request-id"]
    other = await fetch_from("127.0.0.2", proxy, certs, proto, "/b")
    assert other[0] == 200 and other[2] == b"hello from backend /b"
    assert [r[1] for r in backend.requests] == ["/a", "/a", "/a", "/b"]
    assert metrics.value("quicproxy_rate_limited_total", route="default") == 1


async def test_allow_listed_client_is_not_limited(make_proxy, backend, certs):
    rl = {"enabled": True, "rate": 0.5, "burst": 1, "allow": ["127.0.0.2/32"]}
    proxy = await make_proxy(backend, rate_limit=rl)
    got = [(await fetch_from("127.0.0.2", proxy, certs, "h2", "/"))[0] for _ in range(4)]
    assert got == [200] * 4
    got = [(await fetch_from("127.0.0.1", proxy, certs, "h2", "/"))[0] for _ in range(2)]
    assert got == [200, 429]


async def test_many_loopback_addresses_keep_the_table_bounded(make_proxy, backend, certs):
    rl = {"enabled": True, "rate": 0.5, "burst": 1, "max_entries": 8}
    proxy = await make_proxy(backend, rate_limit=rl)
    for i in range(2, 42):
        status, _, _ = await fetch_from(f"127.0.1.{i}", proxy, certs, "h1", "/")
        assert status == 200
    assert proxy.handler.limiter is not None
    assert len(proxy.handler.limiter) == 8
    assert metrics.value("quicproxy_rate_limit_buckets") == 8
