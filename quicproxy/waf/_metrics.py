"""Counters of the WAF service, rendered in the Prometheus text format."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ._info import WafInfo

__all__ = ["ServiceMetrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"Upper bounds (seconds) of the evaluation latency histogram."


@dataclass
class ServiceMetrics:
    evaluated: int = 0
    "Requests evaluated."
    blocked: int = 0
    "Requests the WAF would block."
    detected: int = 0
    "Requests allowed although some rule matched (DetectionOnly, low scores)."
    bad_requests: int = 0
    "POST /evaluate calls refused as malformed (400, 413)."
    errors: int = 0
    "Evaluations that failed inside the engine (500)."
    connections: int = 0
    "TCP connections accepted."
    open_connections: int = 0
    "TCP connections open now."
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    "Evaluations per latency bucket (the last one is +Inf)."
    latency_sum: float = 0.0
    "Total evaluation time in seconds."
    info: WafInfo | None = None
    "Engine and rule set, rendered as the labels of waf_info."

    def observe(self, seconds: float, allowed: bool, matched: bool) -> None:
        self.evaluated += 1
        if not allowed:
            self.blocked += 1
        elif matched:
            self.detected += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        metric(
            "waf_requests_evaluated_total",
            "counter",
            "Requests evaluated.",
            [f"waf_requests_evaluated_total {self.evaluated}"],
        )
        metric(
            "waf_requests_blocked_total",
            "counter",
            "Requests blocked.",
            [f"waf_requests_blocked_total {self.blocked}"],
        )
        metric(
            "waf_requests_detected_total",
            "counter",
            "Requests allowed with rule matches.",
            [f"waf_requests_detected_total {self.detected}"],
        )
        metric(
            "waf_errors_total",
            "counter",
            "Evaluation calls that failed.",
            [
                f'waf_errors_total{{kind="bad_request"}} {self.bad_requests}',
                f'waf_errors_total{{kind="engine"}} {self.errors}',
            ],
        )
        metric(
            "waf_connections_total",
            "counter",
            "TCP connections accepted.",
            [f"waf_connections_total {self.connections}"],
        )
        metric(
            "waf_connections_open",
            "gauge",
            "TCP connections open.",
            [f"waf_connections_open {self.open_connections}"],
        )
        buckets = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, None), self.latency_counts, strict=True):
            running += count
            le = "+Inf" if bound is None else repr(bound)
            buckets.append(f'waf_evaluation_seconds_bucket{{le="{le}"}} {running}')
        buckets.append(f"waf_evaluation_seconds_sum {self.latency_sum:.6f}")
        buckets.append(f"waf_evaluation_seconds_count {running}")
        metric("waf_evaluation_seconds", "histogram", "Evaluation latency.", buckets)
        if self.info is not None:
            labels = ",".join(f'{k}="{v}"' for k, v in self.info.labels().items())
            metric(
                "waf_info", "gauge", "Engine and CRS in use (value 1).", [f"waf_info{{{labels}}} 1"]
            )
            metric(
                "waf_rules_loaded",
                "gauge",
                "Rules loaded by the engine.",
                [f'waf_rules_loaded{{engine="{self.info.engine}"}} {self.info.rules}'],
            )
        return "\n".join(out) + "\n"
