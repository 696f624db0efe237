"""What runs: engine, versions, paranoia level, rule count (``quicproxy waf info``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._config import WafConfig

if TYPE_CHECKING:
    from ._coraza import CorazaWaf
    from ._engine import InlineWaf

__all__ = ["WafInfo", "waf_info"]


@dataclass
class WafInfo:
    engine: str
    "coraza or modsecurity."
    engine_version: str
    "e.g. 3.8.1 (coraza) or 3.0.9 (ModSecurity)."
    crs_version: str
    "OWASP CRS version loaded, e.g. 4.25.0."
    paranoia_level: int
    "Blocking paranoia level."
    rules: int
    "Rules loaded."

    def labels(self) -> dict[str, str]:
        return {
            "engine": self.engine,
            "engine_version": self.engine_version,
            "crs_version": self.crs_version,
            "paranoia_level": str(self.paranoia_level),
        }

    def text(self) -> str:
        return (
            f"engine: {self.engine}\nengine version: {self.engine_version}\n"
            f"CRS version: {self.crs_version}\nparanoia level: {self.paranoia_level}\n"
            f"rules loaded: {self.rules}\n"
        )


def waf_info(waf: CorazaWaf | InlineWaf, config: WafConfig) -> WafInfo:
    """The facts of a loaded engine."""
    engine = waf.engine
    return WafInfo(
        engine.name, engine.release, engine.crs_release, config.paranoia_level, engine.rule_count
    )
