"""Prometheus metrics of the proxy (prometheus-client), one set per process.

Every part of the proxy counts through the module-level :data:`metrics`::

    from ._metrics import metrics
    metrics.quic_handshakes.inc()
    metrics.connections_refused.labels(reason="per_ip").inc()
    metrics.stream_resets.labels(protocol="h3").inc()
    metrics.client_cancels.labels(protocol="h2").inc()
    metrics.retry_sent.inc()
    metrics.upstream_retries.labels(route="*/api", reason="connect").inc()

With ``--workers N`` the parent makes a fresh directory for prometheus-client's
multiprocess mode before forking (:func:`multiprocess_dir`); each worker calls
:meth:`Metrics.use_multiprocess` and every scrape, whichever worker answers,
sums the files of all workers. Recording never raises into a request.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

__all__ = ["Metrics", "metrics", "multiprocess_dir", "CONTENT_TYPE", "status_class"]

log = logging.getLogger("quicproxy")
CONTENT_TYPE = CONTENT_TYPE_LATEST
_ENV = "PROMETHEUS_MULTIPROC_DIR"
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAF_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_WAIT_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
"Fine at the low end: a WAF that keeps up adds tenths of a millisecond."


def status_class(status: int) -> str:
    """'2xx', '4xx'... for a status code."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Metrics:
    """The proxy's metric objects; :meth:`reset` rebuilds them (tests, workers)."""

    def __init__(self) -> None:
        self.multiprocess_dir: str | None = None
        self.reset()

    def reset(self) -> None:
        """New metric objects: in a private registry, or multiprocess files."""
        self._series: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess_dir else self.registry
        p = "quicproxy_"

        self.requests = Counter(
            p + "requests",
            "Requests answered, by protocol, status class and route.",
            ["protocol", "status_class", "route"],
            registry=reg,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from request headers to the end of the response, by protocol.",
            ["protocol"],
            buckets=_TIME_BUCKETS,
            registry=reg,
        )
        self.upstream_duration = Histogram(
            p + "upstream_duration_seconds",
            "Time the upstream took to send response headers, by protocol.",
            ["protocol"],
            buckets=_TIME_BUCKETS,
            registry=reg,
        )
        self.bytes_received = Counter(
            p + "request_bytes",
            "Request body bytes received from clients, by protocol.",
            ["protocol"],
            registry=reg,
        )
        self.bytes_sent = Counter(
            p + "response_bytes",
            "Response body bytes sent to clients, by protocol.",
            ["protocol"],
            registry=reg,
        )
        self.in_flight = Gauge(
            p + "in_flight_requests",
            "Requests being handled.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.active_connections = Gauge(
            p + "active_connections",
            "Client connections open, by protocol.",
            ["protocol"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.tunnels_open = Gauge(
            p + "tunnels_open",
            "WebSocket tunnels open, by the client's protocol.",
            ["protocol"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.tunnel_bytes = Counter(
            p + "tunnel_bytes",
            "Bytes carried by WebSocket tunnels, by protocol and direction (in: from clients).",
            ["protocol", "direction"],
            registry=reg,
        )
        self.quic_handshakes = Counter(
            p + "quic_handshakes", "QUIC handshakes completed.", registry=reg
        )
        self.retry_sent = Counter(p + "quic_retry_sent", "QUIC Retry packets sent.", registry=reg)
        self.stateless_resets = Counter(
            p + "quic_stateless_resets",
            "Stateless resets for datagrams of unknown connections: sent, or over the rate.",
            ["result"],
            registry=reg,
        )
        self.initials_dropped = Counter(
            p + "quic_initials_dropped",
            "Initials of unknown connections dropped before a handshake, by reason.",
            ["reason"],
            registry=reg,
        )
        self.connections_refused = Counter(
            p + "connections_refused",
            "Connections refused by a cap, by reason.",
            ["reason"],
            registry=reg,
        )
        self.stream_resets = Counter(
            p + "stream_resets",
            "Request streams reset by the client, by protocol.",
            ["protocol"],
            registry=reg,
        )
        self.waf_decisions = Counter(
            p + "waf_decisions",
            "WAF decisions, by engine and verdict (allow, detect, block, unavailable, fail_open).",
            ["engine", "verdict"],
            registry=reg,
        )
        self.waf_duration = Histogram(
            p + "waf_evaluation_seconds",
            "Time the WAF took to decide, by engine.",
            ["engine"],
            buckets=_WAF_BUCKETS,
            registry=reg,
        )
        self.waf_engine = Histogram(
            p + "waf_engine_seconds",
            "Time the inline WAF engine itself spent evaluating a request, by engine.",
            ["engine"],
            buckets=_WAF_BUCKETS,
            registry=reg,
        )
        self.waf_wait = Histogram(
            p + "waf_wait_seconds",
            "Time a bodiless request waited on the inline WAF beyond the engine's own "
            "evaluation (hand-overs, queueing for a free evaluator), by engine.",
            ["engine"],
            buckets=_WAIT_BUCKETS,
            registry=reg,
        )
        self.upstream_errors = Counter(
            p + "upstream_errors",
            "Upstream failures, by kind (connect, timeout, closed, internal).",
            ["kind"],
            registry=reg,
        )
        self.upstream_up = Gauge(
            p + "upstream_member_up",
            "1 while a route's member may be chosen, 0 while ejected or failing its probes.",
            ["route", "member"],
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.upstream_ejections = Counter(
            p + "upstream_ejections",
            "Members ejected by passive health (failures in a row), by route and member.",
            ["route", "member"],
            registry=reg,
        )
        self.health_probes = Counter(
            p + "health_probes",
            "Active health probes, by route, member and result (pass, fail).",
            ["route", "member", "result"],
            registry=reg,
        )
        self.upstream_retries = Counter(
            p + "upstream_retries",
            "Requests sent again on another member, by route and reason (connect: never "
            "sent; unanswered: a bodiless GET, HEAD, OPTIONS or TRACE, no response byte).",
            ["route", "reason"],
            registry=reg,
        )
        self.upstream_retries_refused = Counter(
            p + "upstream_retries_refused",
            "Retries not made because the route's retry budget was spent, by route.",
            ["route"],
            registry=reg,
        )
        self.access_log_dropped = Counter(
            p + "access_log_dropped",
            "Access log lines dropped because stdout was not read fast enough.",
            registry=reg,
        )
        self.rate_limited = Counter(
            p + "rate_limited",
            "Requests answered 429 by the rate limiter, by route.",
            ["route"],
            registry=reg,
        )
        self.rate_limit_buckets = Gauge(
            p + "rate_limit_buckets",
            "Token buckets held by the rate limiter.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.cert_reloads = Counter(
            p + "certificate_reloads",
            "Certificate pair reloads, by result (ok, error).",
            ["result"],
            registry=reg,
        )
        self.waf_audit_records = Counter(
            p + "waf_audit_records",
            "WAF audit records written.",
            registry=reg,
        )
        self.waf_audit_dropped = Counter(
            p + "waf_audit_dropped",
            "WAF audit records dropped: over waf.audit.rate, or the writer behind.",
            registry=reg,
        )
        self.config_reloads = Counter(
            p + "config_reloads",
            "Config reloads (SIGHUP, file change), by result (ok, error).",
            ["result"],
            registry=reg,
        )
        self.waf_info = Gauge(
            p + "waf_info",
            "The inline WAF engine and rule set (1 per engine loaded).",
            ["engine", "engine_version", "crs_version", "paranoia_level"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.waf_rules_loaded = Gauge(
            p + "waf_rules_loaded",
            "Rules the inline WAF engine loaded.",
            ["engine"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.response_aborted = Counter(
            p + "responses_aborted",
            "Responses the proxy cut off (upstream failed mid-body), by protocol.",
            ["protocol"],
            registry=reg,
        )
        self.client_cancels = Counter(
            p + "client_cancels",
            "Requests the client cancelled before the response was complete (h2/h3 stream "
            "reset or STOP_SENDING, connection closed; logged as 499), by protocol.",
            ["protocol"],
            registry=reg,
        )

    def request_done(
        self,
        protocol: str,
        status: int,
        route: str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        upstream_seconds: float | None,
    ) -> None:
        """Count one answered request. The labelled series are looked up once per
        (protocol, status class, route), all bounded sets, instead of five times a request."""
        key = (protocol, status_class(status), route)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self.requests.labels(*key),
                self.request_duration.labels(protocol),
                self.bytes_received.labels(protocol),
                self.bytes_sent.labels(protocol),
                self.upstream_duration.labels(protocol),
            )
        requests, duration, received, sent, upstream = series
        requests.inc()
        duration.observe(seconds)
        received.inc(bytes_in)
        sent.inc(bytes_out)
        if upstream_seconds is not None:
            upstream.observe(upstream_seconds)

    def use_multiprocess(self, directory: str) -> None:
        """Record into ``directory`` (shared by every worker) from now on."""
        os.environ[_ENV] = directory
        values.ValueClass = values.MultiProcessValue()
        self.multiprocess_dir = directory
        self.reset()

    def render(self) -> bytes:
        """The Prometheus text exposition of this process (or of every worker)."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one sample (0 when absent); for tests and checks."""
        registry = CollectorRegistry()
        if self.multiprocess_dir:
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        else:
            registry = self.registry
        found = registry.get_sample_value(name, labels)
        return found or 0.0


metrics = Metrics()
"The process's metrics; see the module docstring for the names to call."


@contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh directory for the workers' metric files, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="quicproxy-metrics-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mark_worker_dead(directory: str, pid: int) -> None:
    """Drop a finished worker's live gauges (its counters stay in the sums)."""
    try:
        multiprocess.mark_process_dead(pid, directory)
    except OSError as exc:
        log.debug("metrics cleanup for worker %d: %s", pid, exc)
