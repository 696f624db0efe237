"""What the proxy needs from a WAF, whichever mode runs it (inline or service)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .._model import Headers

__all__ = ["RuleMatch", "WafDecision", "WafRequest", "WafTransaction", "Waf", "WafUnavailable"]


@dataclass
class WafRequest:
    """The parts of a request the engine inspects."""

    method: str
    "Request method."
    uri: str
    "Path and query as sent."
    headers: Headers
    "Request headers, lower-case names, including host."
    protocol: str
    "'HTTP/1.1', 'HTTP/2' or 'HTTP/3'."
    remote_addr: str
    "Client address."
    remote_port: int
    "Client port."
    server_addr: str
    "Local address."
    server_port: int
    "Local port."
    has_body: bool = True
    "False when the request has no body: the engine may run every phase in ``headers()``."


@dataclass
class RuleMatch:
    """One rule that matched, as the audit log shows it."""

    rule_id: str
    "Rule id."
    message: str
    "Rule message (msg action), may be empty."
    severity: int | None
    "Severity number 0-7, None when the rule gives none."
    variable: str = ""
    "The variable the rule matched first, e.g. ARGS:q or REQUEST_HEADERS:user-agent."
    data: str = ""
    "The rule's logdata (CRS: 'Matched Data: ... found within VAR: value'), cut short."


@dataclass
class WafDecision:
    """The engine's verdict, taken from ModSecurity's intervention and log callback."""

    allowed: bool
    "False when the request must be blocked."
    status: int = 200
    "Status to answer a blocked request with (403 by default)."
    rule_ids: list[str] = field(default_factory=list)
    "Ids of the rules that matched."
    messages: list[str] = field(default_factory=list)
    "Rule messages."
    severity: str | None = None
    "Highest severity among the matches (CRITICAL, ERROR, WARNING, NOTICE)."
    matches: list[RuleMatch] = field(default_factory=list)
    "The rules that matched, in ``rule_ids`` order, with variable and logged data."
    scores: list[int] | None = None
    """Inbound anomaly score added at each paranoia level 1-4 (CRS ``tx.*_pl1..4``), None
    when the engine did not report them (blocked before the CRS scored, or no CRS)."""
    engine: str = ""
    "coraza or modsecurity (the engine that evaluated, also behind the WAF service)."
    paranoia_level: int = 0
    "Blocking paranoia level of the policy evaluated (0: not known)."
    detection_paranoia_level: int = 0
    "Detection paranoia level of the policy evaluated (0: not known)."
    anomaly_threshold: int = 0
    "Inbound anomaly threshold of the policy evaluated (0: not known)."

    def score_at(self, level: int) -> int | None:
        """Inbound anomaly score counting the rules up to paranoia ``level``."""
        return None if self.scores is None else sum(self.scores[: max(0, level)])


class WafUnavailable(Exception):
    """The WAF could not give a decision (service down, timeout, bad answer)."""


class WafTransaction(Protocol):
    """One request's inspection: headers, then body chunks, then a final verdict."""

    engine_seconds: float
    """Time the engine itself spent on this request's phases so far (0.0 where the
    proxy cannot know it: service mode). What the WAF adds beyond it is hand-over."""

    async def headers(self) -> WafDecision | None:
        """Run the connection/URI/headers phases; a blocking decision or None."""

    async def body_chunk(self, data: bytes) -> None:
        """Feed part of the body (only the inspected prefix is ever fed)."""

    async def finish(self) -> WafDecision:
        """End of (inspected) body: run the body phase and return the verdict."""

    async def close(self) -> None:
        """Release the transaction (logging phase)."""


class Waf(Protocol):
    def transaction(self, request: WafRequest) -> WafTransaction:
        """Start inspecting ``request``."""

    async def aclose(self) -> None:
        """Release engine or connections."""
