"""Host and path-prefix routing to upstream pools, round-robin over members."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ._config import Backend, Route, parse_backend

__all__ = ["Pool", "Router", "DEMO"]

DEMO = Backend("demo", 0)
"""Member address that stands for the built-in demo backend."""


@dataclass
class Pool:
    """An upstream pool: members taken in turn."""

    name: str
    "Readable name (for logs)."
    members: list[Backend]
    "Host, port and scheme of each member."
    _cycle: itertools.cycle[Backend] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(self.members)

    def pick(self) -> Backend:
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

    def __init__(self, default: Pool | None = None) -> None:
        self.default = default
        self._rules: list[_Rule] = []

    def add(self, route: Route) -> None:
        """Add a route (also at run time, from library code)."""
        members = [parse_backend(f"route {route.path_prefix}", url) for url in route.backends]
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
