"""Metrics of the WAF service (prometheus-client, one registry per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ._info import WafInfo

__all__ = ["ServiceMetrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"Upper bounds (seconds) of the evaluation latency histogram."


class ServiceMetrics:
    """What the WAF service counts; ``render()`` is the /metrics body."""

    def __init__(self, info: WafInfo | None = None) -> None:
        self.registry = reg = CollectorRegistry()
        self._evaluated = Counter("waf_requests_evaluated", "Requests evaluated.", registry=reg)
        self._blocked = Counter("waf_requests_blocked", "Requests blocked.", registry=reg)
        self._detected = Counter(
            "waf_requests_detected", "Requests allowed with rule matches.", registry=reg
        )
        self._errors = Counter(
            "waf_errors", "Evaluation calls that failed, by kind.", ["kind"], registry=reg
        )
        self._connections = Counter("waf_connections", "TCP connections accepted.", registry=reg)
        self._open = Gauge("waf_connections_open", "TCP connections open.", registry=reg)
        self._latency = Histogram(
            "waf_evaluation_seconds", "Evaluation latency.", buckets=LATENCY_BUCKETS, registry=reg
        )
        for kind in ("bad_request", "engine"):
            self._errors.labels(kind)
        if info is not None:
            labels = info.labels()
            Gauge("waf_info", "Engine and rule set.", list(labels), registry=reg).labels(
                **labels
            ).set(1)
            rules = Gauge("waf_rules_loaded", "Rules loaded.", ["engine"], registry=reg)
            rules.labels(info.engine).set(info.rules)

    def observe(self, seconds: float, allowed: bool, matched: bool) -> None:
        self._evaluated.inc()
        if not allowed:
            self._blocked.inc()
        elif matched:
            self._detected.inc()
        self._latency.observe(seconds)

    def connection_opened(self) -> None:
        self._connections.inc()
        self._open.inc()

    def connection_closed(self) -> None:
        self._open.dec()

    def bad_request(self) -> None:
        """A POST /evaluate refused as malformed (400, 413)."""
        self._errors.labels("bad_request").inc()

    def engine_error(self) -> None:
        """An evaluation that failed inside the engine (500)."""
        self._errors.labels("engine").inc()

    def _value(self, name: str, **labels: str) -> int:
        return int(self.registry.get_sample_value(name, labels) or 0)

    @property
    def evaluated(self) -> int:
        return self._value("waf_requests_evaluated_total")

    @property
    def connections(self) -> int:
        return self._value("waf_connections_total")

    @property
    def open_connections(self) -> int:
        return self._value("waf_connections_open")

    def render(self) -> str:
        return generate_latest(self.registry).decode()
