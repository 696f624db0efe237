"""Token-bucket rate limiting per client address (optionally per route).

Each key (client address, or address and route) has a bucket of ``burst``
tokens refilled at ``rate`` per second; a request takes one token or gets 429
with the seconds until the next token in Retry-After. The bucket table is an
LRU capped at ``max_entries``: a flood of distinct (spoofed) addresses evicts
the least recently seen buckets instead of growing memory. An evicted client
comes back with a full bucket, which errs on the side of serving it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from ._config import RateLimitConfig
from ._forward import TrustedProxies

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = cfg.rate
        self.burst = float(cfg.burst)
        self.per_route = cfg.per_route
        self.max_entries = cfg.max_entries
        self._allow = TrustedProxies(cfg.allow)
        "Networks never limited."
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        "key -> [tokens, time of last refill]; oldest first."

    def __len__(self) -> int:
        return len(self._buckets)

    def allowed_network(self, addr: str) -> bool:
        return addr in self._allow

    def check(self, addr: str, route: str = "") -> float | None:
        """Take a token for ``addr`` (on ``route``): None if allowed, else seconds to wait."""
        if self.allowed_network(addr):
            return None
        key = (addr[:64], route if self.per_route else "")
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_entries:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return (1.0 - bucket[0]) / self.rate

    @staticmethod
    def retry_after(seconds: float) -> str:
        """Retry-After value: whole seconds, at least 1."""
        return str(max(1, math.ceil(seconds)))
