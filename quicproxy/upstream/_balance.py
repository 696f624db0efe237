"""Choosing a route's member: the :class:`Pool` (members, weights, health, load, retry
budget) and its balancing policies (``routes[].balance``).

- ``least_request`` (default): two members drawn at random, the less loaded one wins
  (Envoy's default, "the power of two choices"). A member's load is its requests in
  flight times its recent latency (an EWMA of the time to the response head over about
  :data:`_DECAY` seconds, which also fades toward 0 while the member gets no request,
  so a member passed over is tried again now and then): a member ten times slower than
  its peers loses nearly every draw even one request at a time, without being ejected.
  5xx answers are not measured (a fast error page would make its member look fast), a
  timeout is (as the time it took), and a member not measured yet counts as average.
  With unequal weights the member is drawn at random in proportion to its weight over
  its requests in flight + 1 (Envoy's weighted least request): latency is left out
  there, as its noise would blur the shares the weights ask for.
- ``round_robin``: smooth weighted round robin (nginx's): exact shares by weight.
- ``hash``: weighted rendezvous hashing of the key (``routes[].hash_on``: the client's
  address, a header or a cookie): a key sticks to its member while that member is up;
  when it goes, only its keys move. A request without the key is balanced as
  ``least_request``.

Only the members :class:`~quicproxy.upstream._health.RouteHealth` lets through are
drawn, and a retry never goes back to a member already tried for the request.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Collection, Sequence

from .._config import HealthConfig, OutlierConfig
from .._model import Headers
from ._health import RouteHealth
from ._member import Member
from ._retry import RetryBudget

__all__ = ["Pool", "Load", "hash_key", "POLICIES"]

POLICIES = ("least_request", "round_robin", "hash")
_DECAY = 2.0
"Seconds over which latencies are averaged, and a member's estimate fades when not chosen."
_FLOOR = 0.001
"Latencies below a millisecond are not told apart (loopback noise)."


class Load:
    """A member's load: requests in flight and an EWMA of its latency."""

    __slots__ = ("active", "_average", "_count", "_stamp")

    def __init__(self) -> None:
        self.active = 0
        self._average = 0.0
        self._count = 0
        "Answers observed (up to 100): the first ones are averaged alike."
        self._stamp = 0.0

    def observe(self, seconds: float, now: float | None = None) -> None:
        """A response head came ``seconds`` after the request left."""
        now = time.monotonic() if now is None else now
        # An answer weighs by the time since the last (one after a pause weighs more);
        # the first ones are averaged alike (a first answer, with its connect, is slower).
        self._count = min(self._count + 1, 100)
        keep = math.exp(-max(0.0, now - self._stamp) / _DECAY)
        share = max(1.0 - keep, 1.0 / self._count)
        self._average += share * (seconds - self._average)
        self._stamp = now

    def latency(self, now: float) -> float:
        """The latency estimate, decayed toward 0 since the last answer."""
        return self._average * math.exp(-max(0.0, now - self._stamp) / _DECAY)

    @property
    def measured(self) -> bool:
        """Whether a latency was observed yet."""
        return self._count > 0

    def cost(self, now: float, unmeasured: float = 0.0) -> float:
        """Requests in flight + 1 times the latency (``unmeasured`` when none was seen)."""
        latency = self.latency(now) if self._count else unmeasured
        return (self.active + 1) * (latency + _FLOOR)


class Pool:
    """A route's members and how one is chosen for each request."""

    def __init__(
        self,
        name: str,
        members: list[Member],
        weights: Sequence[int] | None = None,
        *,
        balance: str = "least_request",
        hash_on: str | None = None,
        outlier: OutlierConfig | None = None,
        probe: HealthConfig | None = None,
        retry_budget: float = 0.2,
        retries: int = 2,
    ) -> None:
        self.name = name
        "Readable name (for logs and metric labels)."
        self.members = members
        "Scheme, host, port and TLS profile of each member."
        self.weights = list(weights) if weights is not None else [1] * len(members)
        self.balance = balance
        self.hash_on = hash_on or ("client" if balance == "hash" else None)
        self.health = RouteHealth(name, members, outlier, probe)
        self.loads = [Load() for _ in members]
        self.budget = RetryBudget(retry_budget)
        self.retries = retries
        "Attempts on other members after the first (``upstream.retries``)."
        self._current = [0] * len(members)
        self._rng = random.Random()

    def pick(self) -> Member:
        """A member for one request (no key, no retry); RouteDown if all are down."""
        return self.members[self.choose()]

    def choose(self, key: str | None = None, tried: Collection[int] = ()) -> int:
        """The index of the member for a request with hash ``key``, not one of ``tried``.

        Raises :class:`RouteDown` when every member is down, LookupError when the only
        members up were tried already."""
        now = time.monotonic()
        up = self.health.candidates(now)
        if not up:
            raise self.health.route_down(now)
        left = [i for i in up if i not in tried] if tried else up
        if not left:
            raise LookupError("every member up was tried")
        if len(left) == 1:
            return left[0]
        if self.balance == "hash" and key is not None:
            return self._rendezvous(key, left)
        if self.balance == "round_robin":
            return self._round_robin(left)
        return self._least_request(left, now)

    def _least_request(self, left: list[int], now: float) -> int:
        weights = self.weights
        if all(weights[i] == weights[left[0]] for i in left):
            a, b = self._rng.sample(left, 2)
            load_a, load_b = self.loads[a], self.loads[b]
            # a member never measured (new, or answering only 5xx) is taken as average
            seen = [self.loads[i].latency(now) for i in left if self.loads[i].measured]
            usual = sum(seen) / len(seen) if seen else 0.0
            cost_a, cost_b = load_a.cost(now, usual), load_b.cost(now, usual)
            return a if cost_a < cost_b or (cost_a == cost_b and self._rng.random() < 0.5) else b
        shares = [weights[i] / (self.loads[i].active + 1) for i in left]
        return self._rng.choices(left, shares)[0]

    def _round_robin(self, left: list[int]) -> int:
        total = 0
        best = left[0]
        for i in left:
            self._current[i] += self.weights[i]
            total += self.weights[i]
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= total
        return best

    def _rendezvous(self, key: str, left: list[int]) -> int:
        def score(i: int) -> float:
            digest = hashlib.blake2b(
                f"{key}\0{self.members[i].label}".encode("utf-8", "surrogateescape"),
                digest_size=8,
            ).digest()
            unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
            return self.weights[i] / -math.log(unit)

        return max(left, key=score)


def hash_key(hash_on: str | None, client: str, headers: Headers) -> str | None:
    """The request's hash key for ``hash_on`` (client, header:NAME, cookie:NAME); None
    when the request has none (balanced by load then)."""
    if hash_on is None:
        return None
    if hash_on == "client":
        return client
    kind, _, name = hash_on.partition(":")
    name = name.lower() if kind == "header" else name
    if kind == "header":
        values = [v for k, v in headers if k == name]
        return ",".join(values) if values else None
    for k, v in headers:
        if k != "cookie":
            continue
        for pair in v.split(";"):
            cname, eq, cvalue = pair.strip().partition("=")
            if eq and cname == name:
                return cvalue.strip().strip('"')
    return None
