"""The runtime configuration: what one request runs on, built from a Config, swapped whole.

A :class:`Runtime` is immutable once built: the effective config, the router (routes and
backends), the rate limiter, the WAF handle, the access-log formatter and the trusted
proxies. The handler holds the current one; each request takes the one in force when
its exchange began and keeps it to the end (``Handler.exchange``), so a reload never
changes a request half-way. :func:`build_runtime` makes the next one from a new Config,
reusing the parts whose settings did not change (the rate limiter's buckets, the WAF
engine unless its settings changed or a rebuild is asked for) and building the others
fresh, beside the running ones (a new :class:`Router` each time).

Some settings belong to sockets and processes and cannot change live: they stay as they
are in the effective config, and :func:`fixed_changes` names those a new config changes
(see ``FIXED``). ``timeouts`` and the header limits the protocol parsers enforce apply to
connections opened after the swap; everything else to requests that begin after it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ._access import AccessLog
from ._config import Config
from ._forward import TrustedProxies
from ._ratelimit import RateLimiter
from ._router import Router
from .waf._audit import WafAudit
from .waf._policy import WafPolicies
from .waf._types import Waf

__all__ = ["FIXED", "Runtime", "Uses", "build_runtime", "fixed_changes", "effective_config"]

log = logging.getLogger("quicproxy")

FIXED = ("listen", "tls", "quic", "metrics", "workers", "upstream")
"""Config sections (or keys) that need a restart: sockets, the default certificate pair
(watched on its own; ``tls.certificates`` excepted: the SNI pairs are reloaded), worker
processes, and the upstream connection pools (``upstream.tls``, retries, the retry budget
and passive health excepted: they shape the router, rebuilt on every reload)."""
LIVE_IN_FIXED = {
    ("upstream", "tls"),
    ("upstream", "retries"),
    ("upstream", "retry_budget"),
    ("upstream", "outlier"),
    ("tls", "certificates"),
}
"Keys of FIXED sections that do change live: they shape the router, rebuilt each time."


@dataclass
class Uses:
    """Requests running on one runtime, and what to do once it is retired and idle."""

    count: int = 0
    retired: bool = False
    on_idle: Callable[[], None] | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        self._check()

    def retire(self, on_idle: Callable[[], None]) -> None:
        self.retired, self.on_idle = True, on_idle
        self._check()

    def _check(self) -> None:
        if self.retired and self.count == 0 and self.on_idle is not None:
            done, self.on_idle = self.on_idle, None
            done()


@dataclass(frozen=True)
class Runtime:
    """One configuration in force: everything a request reads, built once, never changed."""

    cfg: Config
    "The effective config (the FIXED sections as they were at start)."
    router: Router
    waf: Waf | None
    limiter: RateLimiter | None
    access: AccessLog
    trusted: TrustedProxies
    policies: WafPolicies
    "Each route's WAF mode and rule set (routes[].waf) over ``waf``."
    audit: WafAudit | None
    "The WAF audit log (waf.audit), None when off or without a WAF."
    version: int = 1
    "1 at start, +1 per reload."
    uses: Uses = field(default_factory=Uses, compare=False)

    @property
    def waf_engine(self) -> str:
        """Engine label of the WAF metrics: coraza or modsecurity inline, else 'service'."""
        waf = self.cfg.waf
        return waf.engine if waf.mode == "inline" else waf.mode


def new_router(cfg: Config) -> Router:
    """The routes and backends of ``cfg`` (ConfigError naming the key when one is unusable)."""
    router = Router(upstream=cfg.upstream)
    if cfg.backend:
        router.default = router.pool("default", [router.member("backend", cfg.backend)])
    for route in cfg.routes:
        router.add(route)
    return router


def effective_config(new: Config, running: Config) -> Config:
    """``new`` with the FIXED settings of ``running`` (they stay until a restart)."""
    upstream = dataclasses.replace(
        running.upstream,
        **{key: getattr(new.upstream, key) for name, key in LIVE_IN_FIXED if name == "upstream"},
    )
    tls = dataclasses.replace(running.tls, certificates=new.tls.certificates)
    return dataclasses.replace(
        new,
        listen=running.listen,
        tls=tls,
        quic=running.quic,
        metrics=running.metrics,
        workers=running.workers,
        upstream=upstream,
    )


def fixed_changes(old: Config, new: Config) -> list[str]:
    """The FIXED keys ``new`` changes against ``old`` (both as loaded), e.g. listen.https_port."""
    changed: list[str] = []
    for name in FIXED:
        before, after = getattr(old, name), getattr(new, name)
        if not dataclasses.is_dataclass(before):
            if before != after:
                changed.append(name)
            continue
        for f in dataclasses.fields(before):
            if (name, f.name) in LIVE_IN_FIXED:
                continue
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{name}.{f.name}")
    return changed


def build_runtime(
    cfg: Config,
    waf: Waf | None,
    previous: Runtime | None = None,
    router: Router | None = None,
    policies: WafPolicies | None = None,
) -> Runtime:
    """The runtime for ``cfg`` with ``waf`` (built or kept by the caller), ``router``
    (default: a new one from ``cfg``) and the routes' WAF ``policies`` (default: compiled
    here); ``previous``'s rate limiter (its buckets), access log and WAF audit log kept
    where their settings are the same, fresh ones otherwise."""
    if router is None:
        router = new_router(cfg)
    if policies is None:
        policies = WafPolicies(cfg, waf)
    audit = None
    if cfg.waf.mode != "off" and cfg.waf.audit.log != "off":
        if (
            previous is not None
            and previous.audit is not None
            and (previous.cfg.waf.audit == cfg.waf.audit)
        ):
            audit = previous.audit
        else:
            audit = WafAudit(cfg.waf.audit)
    limiter = None
    if cfg.rate_limit.enabled:
        if previous is not None and previous.cfg.rate_limit == cfg.rate_limit:
            limiter = previous.limiter  # the buckets carry over
        if limiter is None:
            limiter = RateLimiter(cfg.rate_limit)
    if previous is not None and previous.access.format == cfg.log.access:
        access = previous.access
    elif previous is not None:
        access = AccessLog(cfg.log.access, sink=previous.access.sink)  # one writer thread
    else:
        access = AccessLog(cfg.log.access)
    return Runtime(
        cfg=cfg,
        router=router,
        waf=waf,
        limiter=limiter,
        access=access,
        trusted=TrustedProxies(cfg.trusted_proxies),
        policies=policies,
        audit=audit,
        version=previous.version + 1 if previous is not None else 1,
    )
