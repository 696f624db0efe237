"""Web application firewall: Coraza + OWASP CRS 4 or ModSecurity v3 + OWASP CRS,
inline or as a service."""

from __future__ import annotations

from .._config import WafConfig
from .._errors import ConfigError
from ._client import WafClient
from ._coraza import CorazaWaf
from ._engine import InlineWaf, engine_version
from ._info import WafInfo, waf_info
from ._service import WafService, run_waf_service, start_waf_service
from ._types import Waf, WafDecision, WafRequest, WafTransaction, WafUnavailable

__all__ = [
    "Waf",
    "WafDecision",
    "WafRequest",
    "WafTransaction",
    "WafUnavailable",
    "InlineWaf",
    "CorazaWaf",
    "WafInfo",
    "inline_waf",
    "waf_info",
    "WafClient",
    "WafService",
    "create_waf",
    "engine_version",
    "start_waf_service",
    "run_waf_service",
]


def inline_waf(config: WafConfig, workers: int | None = None) -> CorazaWaf | InlineWaf:
    """The in-process engine ``config.engine`` names, with its rule set loaded."""
    if config.engine == "coraza":
        return CorazaWaf(config, workers)
    if config.engine == "modsecurity":
        return InlineWaf(config, workers)
    raise ConfigError("waf.engine", f"invalid value {config.engine!r}", "use coraza or modsecurity")


def create_waf(config: WafConfig) -> Waf | None:
    """The WAF ``config`` asks for: None (off), the inline engine, or a service client.

    Raises ConfigError (one line naming the fix) when the engine or rules are missing.
    """
    if config.mode == "off":
        return None
    if config.mode == "inline":
        return inline_waf(config)
    if config.mode == "service":
        return WafClient(config)
    raise ConfigError("waf.mode", f"invalid value {config.mode!r}", "use off, inline or service")
