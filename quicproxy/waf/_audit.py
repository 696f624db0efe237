"""The WAF audit log: one JSON record per request the WAF refused or scored.

``waf.audit`` picks the requests (``record``: refused, scored or all) and where their
records go (``log``: stdout, a file, or off). A record names the request (the access
log's request id, client, host, method, path, protocol, route), the policy evaluated
(engine, mode, paranoia levels, threshold), the verdict, the inbound anomaly scores at
the blocking and the detection paranoia level, and every rule that matched with its
variable and logged data, cut to ``data_limit`` bytes, secrets masked (``mask``).

Records are rate-bounded by one token bucket (``rate`` per second, ``burst``) so an
attack cannot turn the audit log into a disk or log flood, and written by a background
thread (:class:`.._access.LineWriter`), so a slow disk or reader never stalls the
event loop; records over either bound are dropped and counted
(``quicproxy_waf_audit_dropped_total``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._access import LineWriter
from .._config import RateLimitConfig, WafAuditConfig
from .._errors import ConfigError
from .._metrics import metrics
from .._model import Headers
from .._ratelimit import RateLimiter
from ._types import RuleMatch, WafDecision

__all__ = ["AuditEntry", "WafAudit", "MASKED"]

MASKED = "***"
"What a masked secret reads as."

MAX_RULES = 20
"Rules listed per record at most (the rest are counted in ``rules_omitted``)."

_MATCHED = re.compile(r"^Matched Data: (.*?) found within ")
_SHORTEST_SECRET = 4
"Secret values shorter than this are masked only where their own variable matched."


@dataclass
class AuditEntry:
    """What the proxy knows of one evaluated request, besides the WAF's decision."""

    request_id: str
    started: float
    "time.time() when the request arrived."
    client: str
    host: str
    method: str
    path: str
    protocol: str
    route: str | None
    mode: str
    "block or detect: whether the policy refuses what it finds."
    verdict: str
    "What the proxy did: allow, detect or block."
    headers: Headers
    "Request headers (lower-case names): the secrets to mask are read from them."


def _dropped() -> None:
    with contextlib.suppress(Exception):
        metrics.waf_audit_dropped.inc()


class _Secrets:
    """The values of masked headers and cookies in one request."""

    def __init__(self, headers: Headers, names: set[str], cookies: set[str]) -> None:
        self.variables: set[str] = set()
        self.values: list[str] = []
        for name, value in headers:
            if name in names:
                self.variables.add(f"request_headers:{name}")
                self._add(value)
            if name == "cookie" and cookies:
                for part in value.split(";"):
                    key, _, item = part.strip().partition("=")
                    if key.lower() in cookies or "*" in cookies:
                        self.variables.add(f"request_cookies:{key.lower()}")
                        self._add(item)

    def _add(self, value: str) -> None:
        """The value, and its credentials alone when it has a scheme (``Bearer x``)."""
        value = value.strip().lower()
        if value:
            self.values.append(value)
            scheme, _, credentials = value.partition(" ")
            if credentials.strip():
                self.values.append(credentials.strip())

    def mask(self, variable: str, data: str) -> str:
        if not data:
            return data
        if variable.lower() in self.variables:
            return MASKED
        lowered = data.lower()
        for value in self.values:
            if len(value) < _SHORTEST_SECRET:
                continue
            at = lowered.find(value)
            while at >= 0:
                data = data[:at] + MASKED + data[at + len(value) :]
                lowered = lowered[:at] + MASKED + lowered[at + len(value) :]
                at = lowered.find(value, at + len(MASKED))
        fragment = _MATCHED.match(data)
        if fragment and len(fragment.group(1)) >= 3:
            piece = fragment.group(1).lower()
            if any(piece in value for value in self.values):
                data = f"Matched Data: {MASKED}{data[fragment.end(1) :]}"
        return data


def _cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes (a character cut in half is left out)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore") + "..."


def _stamp(when: float) -> str:
    millis = int((when % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{millis:03d}Z"


class WafAudit:
    """Decides which requests get a record, builds it, and writes it (bounded)."""

    def __init__(
        self,
        config: WafAuditConfig,
        sink: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._names = {m.lower() for m in config.mask if not m.lower().startswith("cookie:")}
        self._cookies = {m.lower()[7:] for m in config.mask if m.lower().startswith("cookie:")}
        self._bucket = RateLimiter(
            RateLimitConfig(enabled=True, rate=config.rate, burst=config.burst, max_entries=1),
            clock,
        )
        self._writer: LineWriter | None = None
        self._fd: int | None = None
        if sink is None:
            fd = 1 if config.log == "stdout" else self._open(config.log)
            self._fd = None if fd == 1 else fd
            self._writer = LineWriter(fd, limit=1 << 20, on_drop=_dropped, name="waf-audit")
            sink = self._writer
        self.sink = sink

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise ConfigError(
                "waf.audit.log", f"cannot open {path} ({exc.strerror})", "give a writable file"
            ) from None

    def close(self) -> None:
        """Write what waits (bounded), then stop the writer and close the file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # -- which requests ----------------------------------------------------------------

    def wanted(self, entry: AuditEntry, decision: WafDecision) -> bool:
        """Whether ``decision`` gets a record under ``record``."""
        what = self.config.record
        if what == "all":
            return True
        if what == "scored" and (decision.rule_ids or any(decision.scores or ())):
            return True
        return (
            entry.verdict == "block"
            or would_refuse(decision)
            or would_refuse_at_detection_level(decision)
        )

    def write(self, entry: AuditEntry, decision: WafDecision) -> bool:
        """Record ``decision`` if wanted and within the rate; True when written."""
        if not self.wanted(entry, decision):
            return False
        if self._bucket.check("audit") is not None:
            _dropped()
            return False
        line = json.dumps(self.record(entry, decision), ensure_ascii=True, separators=(",", ":"))
        try:
            if self.sink(line) is False:  # the writer is behind: dropped and counted
                return False
        except (OSError, ValueError):
            _dropped()
            return False
        with contextlib.suppress(Exception):
            metrics.waf_audit_records.inc()
        return True

    # -- the record --------------------------------------------------------------------

    def record(self, entry: AuditEntry, decision: WafDecision) -> dict[str, object]:
        secrets = _Secrets(entry.headers, self._names, self._cookies)
        rules = [self._rule(m, secrets) for m in decision.matches[:MAX_RULES]]
        return {
            "time": _stamp(entry.started),
            "request_id": entry.request_id,
            "client": entry.client,
            "host": entry.host,
            "method": entry.method,
            "path": _cut(entry.path, 2048),
            "protocol": entry.protocol,
            "route": entry.route,
            "engine": decision.engine or None,
            "mode": entry.mode,
            "verdict": entry.verdict,
            "status": decision.status,
            "paranoia_level": decision.paranoia_level or None,
            "detection_paranoia_level": decision.detection_paranoia_level or None,
            "anomaly_threshold": decision.anomaly_threshold or None,
            "scores": {
                "inbound": decision.score_at(decision.paranoia_level),
                "inbound_detection": decision.score_at(decision.detection_paranoia_level),
                "inbound_per_level": decision.scores,
                "outbound": None,  # responses are not inspected
            },
            "would_refuse": would_refuse(decision),
            "would_refuse_at_detection_level": would_refuse_at_detection_level(decision),
            "rules": rules,
            "rules_omitted": max(0, len(decision.matches) - MAX_RULES),
        }

    def _rule(self, match: RuleMatch, secrets: _Secrets) -> dict[str, object]:
        return {
            "id": match.rule_id,
            "message": _cut(secrets.mask("", match.message), 512),
            "severity": match.severity,
            "variable": _cut(match.variable, 256),
            "data": _cut(secrets.mask(match.variable, match.data), self.config.data_limit),
        }


def would_refuse(decision: WafDecision) -> bool:
    """The policy's blocking level refuses it (refused, or would be in detect mode)."""
    if not decision.allowed:
        return True
    return _reaches(decision, decision.paranoia_level)


def would_refuse_at_detection_level(decision: WafDecision) -> bool:
    """Its score at the detection paranoia level reaches the threshold (CRS 4's
    detection level: the rules above the blocking level ran and were logged, not scored
    into the verdict)."""
    return _reaches(decision, decision.detection_paranoia_level)


def _reaches(decision: WafDecision, level: int) -> bool:
    score = decision.score_at(level)
    threshold = decision.anomaly_threshold
    return bool(score is not None and threshold and score >= threshold)
