"""Prometheus text-format counters, gauges and one latency histogram."""

from __future__ import annotations

from collections import Counter

__all__ = ["Metrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        "(protocol, status) -> requests answered."
        self.events: Counter[str] = Counter()
        "Named events: waf_blocked, waf_unavailable, waf_fail_open, upstream_errors..."
        self.in_flight = 0
        "Requests being handled now."
        self._buckets = [0] * (len(_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, protocol: str, status: int, seconds: float) -> None:
        self.requests[(protocol, status)] += 1
        self._sum += seconds
        self._count += 1
        for i, bound in enumerate(_BUCKETS):
            if seconds <= bound:
                self._buckets[i] += 1
                break
        else:
            self._buckets[-1] += 1

    def render(self) -> str:
        lines = [
            "# HELP quicproxy_requests_total Requests answered, by protocol and status.",
            "# TYPE quicproxy_requests_total counter",
        ]
        for (proto, status), n in sorted(self.requests.items()):
            lines.append(f'quicproxy_requests_total{{protocol="{proto}",status="{status}"}} {n}')
        lines += [
            "# HELP quicproxy_events_total Notable events (WAF blocks, fail-open, upstream errors)",
            "# TYPE quicproxy_events_total counter",
        ]
        for name, n in sorted(self.events.items()):
            lines.append(f'quicproxy_events_total{{event="{name}"}} {n}')
        lines += [
            "# HELP quicproxy_in_flight_requests Requests being handled.",
            "# TYPE quicproxy_in_flight_requests gauge",
            f"quicproxy_in_flight_requests {self.in_flight}",
            "# HELP quicproxy_request_duration_seconds Time to response headers.",
            "# TYPE quicproxy_request_duration_seconds histogram",
        ]
        running = 0
        for bound, n in zip(_BUCKETS, self._buckets, strict=False):
            running += n
            lines.append(f'quicproxy_request_duration_seconds_bucket{{le="{bound}"}} {running}')
        lines.append(f'quicproxy_request_duration_seconds_bucket{{le="+Inf"}} {self._count}')
        lines.append(f"quicproxy_request_duration_seconds_sum {self._sum:.6f}")
        lines.append(f"quicproxy_request_duration_seconds_count {self._count}")
        return "\n".join(lines) + "\n"
