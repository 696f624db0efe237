"""The WAF policy of each route: its mode and the rule set it is evaluated against.

``routes[].waf`` sets a route's mode (``off``: not inspected; ``detect``: inspected,
logged and audited, never refused; ``block``) and, over the global ``waf.*`` key by key,
its paranoia levels, anomaly threshold, allowed methods and content types (CRS
``tx.allowed_methods``, ``tx.allowed_request_content_type``), body limit and extra
exclusions. A policy that changes the
rules gets a rule set of its own, compiled once at start beside the global one; routes
with the same effective settings share it (a CRS rule set costs ~0.05-0.2 s and a few
MB). Paranoia levels and exclusions are thus plain CRS settings and ``ctl:`` rules in
each rule set (:mod:`._rules`), the same on both engines; the route itself is chosen by
the router, never re-derived from paths inside the rules. A route's body limit is its
rule set's ``body_limit``, which its transactions enforce (:mod:`._pooled`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .._config import Config, Route, RouteWaf, WafConfig
from ._types import Waf

__all__ = ["RoutePolicy", "WafPolicies", "effective_config", "route_name"]


@dataclass
class RoutePolicy:
    """What the WAF does on one route."""

    mode: str
    "off, detect or block."
    waf: Waf | None
    "The rule set its requests are evaluated against (None when mode is off)."


def route_name(route: Route) -> str:
    """The name the router gives the route's pool (``host/prefix``, ``*`` for any host)."""
    return f"{route.host or '*'}{route.path_prefix}"


def effective_config(base: WafConfig, policy: RouteWaf) -> WafConfig:
    """The global WAF settings with the route's policy over them."""
    level = policy.paranoia_level if policy.paranoia_level is not None else base.paranoia_level
    detection = policy.detection_paranoia_level or base.detection_paranoia_level or level
    threshold = policy.anomaly_threshold
    return dataclasses.replace(
        base,
        rule_engine="On" if policy.mode == "block" else base.rule_engine,
        paranoia_level=level,
        detection_paranoia_level=max(detection, level),
        anomaly_threshold=threshold if threshold is not None else base.anomaly_threshold,
        exclusions=[*base.exclusions, *policy.exclusions],
        allowed_methods=_given(policy.allowed_methods, base.allowed_methods),
        allowed_content_types=_given(policy.allowed_content_types, base.allowed_content_types),
        body_limit=policy.body_limit if policy.body_limit is not None else base.body_limit,
    )


def _given(value: list[str] | None, default: list[str]) -> list[str]:
    return list(value) if value is not None else default


def _own_rules(base: WafConfig, policy: RouteWaf) -> bool:
    return policy.changes_rules or (policy.mode == "block" and base.rule_engine != "On")


class WafPolicies:
    """Every route's policy; built once (at start), looked up per request by pool name."""

    def __init__(
        self,
        config: Config,
        default: Waf | None,
        build: Callable[[WafConfig], Waf | None] | None = None,
    ) -> None:
        self.default = RoutePolicy(
            "detect" if config.waf.rule_engine == "DetectionOnly" else "block", default
        )
        self.built: list[Waf] = []
        "Rule sets compiled for routes (closed by ``aclose``)."
        self._routes: dict[str, RoutePolicy] = {}
        cache: dict[str, Waf | None] = {}
        for route in config.routes:
            policy = route.waf
            if policy is None or default is None:
                continue
            mode = policy.mode or self.default.mode
            waf: Waf | None = default
            if mode == "off":
                waf = None
            elif _own_rules(config.waf, policy):
                settings = effective_config(config.waf, policy)
                key = repr(settings)
                if key not in cache:
                    cache[key] = (build or _build)(settings)
                    if cache[key] is not None:
                        self.built.append(cache[key])  # type: ignore[arg-type]
                waf = cache[key]
            self._routes[route_name(route)] = RoutePolicy(mode, waf)

    def get(self, pool_name: str | None) -> RoutePolicy:
        """The policy of the route whose pool is ``pool_name`` (the global one if none)."""
        if pool_name is None:
            return self.default
        return self._routes.get(pool_name, self.default)

    async def aclose(self) -> None:
        for waf in self.built:
            await waf.aclose()
        self.built.clear()


def _build(settings: WafConfig) -> Waf | None:
    from . import create_waf

    return create_waf(settings)
