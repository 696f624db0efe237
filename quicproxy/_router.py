"""Host and path-prefix routing to upstream pools.

Backend URLs become :class:`Member` keys here, https ones with the TLS profile of
their route (``routes[].tls`` over ``upstream.tls``); each route becomes a
:class:`~quicproxy.upstream._balance.Pool`, which chooses the member of each request
(balancing, health, retry budget: ``quicproxy/upstream``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ._config import Route, UpstreamConfig, UpstreamTlsConfig, WeightedBackend, parse_upstream
from .upstream._balance import Pool
from .upstream._member import Member

__all__ = ["Pool", "Router", "DEMO"]

log = logging.getLogger("quicproxy")

DEMO = Member("demo", 0, "demo")
"""Member that stands for the built-in demo backend."""


@dataclass
class _Rule:
    host: str | None
    prefix: str
    pool: Pool


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] in "/?"


class Router:
    """Routes are tried most specific first: host rules before any-host rules,
    longer path prefixes before shorter ones; the default pool takes the rest."""

    def __init__(
        self,
        default: Pool | None = None,
        tls: UpstreamTlsConfig | None = None,
        upstream: UpstreamConfig | None = None,
    ) -> None:
        self.default = default
        self.upstream = upstream or UpstreamConfig()
        "Retries, retry budget and passive health of every route."
        self.tls = tls or self.upstream.tls
        "TLS settings of https members (upstream.tls); a route's own ``tls`` goes over them."
        self._rules: list[_Rule] = []
        self.on_add: Callable[[Pool], None] | None = None
        "Called with the pool of a route added while running (its health probes start)."

    @property
    def pools(self) -> list[Pool]:
        """Every pool: the routes' and the default one."""
        found = [rule.pool for rule in self._rules]
        return found + ([self.default] if self.default is not None else [])

    def pool(self, name: str, members: list[Member], route: Route | None = None) -> Pool:
        """A pool of ``members`` with ``route``'s balancing and health settings."""
        up = self.upstream
        weights = (
            [b.weight if isinstance(b, WeightedBackend) else 1 for b in route.backends]
            if route
            else None
        )
        return Pool(
            name,
            members,
            weights,
            balance=route.balance if route else "least_request",
            hash_on=route.hash_on if route else None,
            outlier=up.outlier,
            probe=route.health if route else None,
            retry_budget=up.retry_budget,
            retries=up.retries,
        )

    def member(self, key: str, url: str, tls: UpstreamTlsConfig | None = None) -> Member:
        """The member for backend ``url``; ConfigError naming ``key`` if unusable."""
        scheme, host, port = parse_upstream(key, url)
        if scheme in ("http", "h2c"):
            return Member(host, port, scheme)
        profile = (tls.over(self.tls) if tls is not None else self.tls).profile()
        if not profile.verify:
            log.warning("%s: certificate verification is off (tls.verify: false)", url)
        return Member(host, port, scheme, profile)

    def add(self, route: Route) -> None:
        """Add a route (also at run time, from library code)."""
        key = f"route {route.path_prefix}"
        if route.tls is not None:
            route.tls.check(f"{key} tls")
        route.check(key)
        urls = [b.url if isinstance(b, WeightedBackend) else b for b in route.backends]
        members = [self.member(key, url, route.tls) for url in urls]
        pool = self.pool(f"{route.host or '*'}{route.path_prefix}", members, route)
        host = route.host.lower() if route.host else None
        self._rules.append(_Rule(host, route.path_prefix, pool))
        self._rules.sort(key=lambda r: (r.host is None, -len(r.prefix)))
        if self.on_add is not None:
            self.on_add(pool)

    def match(self, host: str, path: str) -> Pool | None:
        for rule in self._rules:
            if rule.host is not None and rule.host != host:
                continue
            if _prefix_matches(rule.prefix, path):
                return rule.pool
        return self.default
