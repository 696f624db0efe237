"""Host and path-prefix routing to upstream pools, round-robin over members.

Backend URLs become :class:`Member` keys here, https ones with the TLS profile of
their route (``routes[].tls`` over ``upstream.tls``)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from ._config import Route, UpstreamTlsConfig, parse_upstream
from .upstream._member import Member

__all__ = ["Pool", "Router", "DEMO"]

log = logging.getLogger("quicproxy")

DEMO = Member("demo", 0, "demo")
"""Member that stands for the built-in demo backend."""


@dataclass
class Pool:
    """An upstream pool: members taken in turn."""

    name: str
    "Readable name (for logs)."
    members: list[Member]
    "Scheme, host, port and TLS profile of each member."
    _cycle: itertools.cycle[Member] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(self.members)

    def pick(self) -> Member:
        return next(self._cycle)


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

    def __init__(self, default: Pool | None = None, tls: UpstreamTlsConfig | None = None) -> None:
        self.default = default
        self.tls = tls or UpstreamTlsConfig()
        "TLS settings of https members (upstream.tls); a route's own ``tls`` goes over them."
        self._rules: list[_Rule] = []

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
        members = [self.member(key, url, route.tls) for url in route.backends]
        pool = Pool(f"{route.host or '*'}{route.path_prefix}", members)
        host = route.host.lower() if route.host else None
        self._rules.append(_Rule(host, route.path_prefix, pool))
        self._rules.sort(key=lambda r: (r.host is None, -len(r.prefix)))

    def match(self, host: str, path: str) -> Pool | None:
        for rule in self._rules:
            if rule.host is not None and rule.host != host:
                continue
            if _prefix_matches(rule.prefix, path):
                return rule.pool
        return self.default
