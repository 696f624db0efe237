"""metrics.dashboard ships the Grafana dashboard as a ConfigMap for the sidecar."""

from __future__ import annotations

import json
import re

from ._chart import CHART

ON = {"metrics": {"dashboard": {"enabled": True}}}
EXPORTED = [
    "quicproxy_requests_total",
    "quicproxy_request_duration_seconds_bucket",
    "quicproxy_upstream_duration_seconds_bucket",
    "quicproxy_request_bytes_total",
    "quicproxy_response_bytes_total",
    "quicproxy_active_connections",
    "quicproxy_in_flight_requests",
    "quicproxy_quic_handshakes_total",
    "quicproxy_quic_retry_sent_total",
    "quicproxy_quic_initials_dropped_total",
    "quicproxy_connections_refused_total",
    "quicproxy_stream_resets_total",
    "quicproxy_waf_decisions_total",
    "quicproxy_waf_evaluation_seconds_bucket",
    "quicproxy_upstream_errors_total",
    "quicproxy_rate_limited_total",
    "quicproxy_rate_limit_buckets",
    "quicproxy_certificate_reloads_total",
]


def _dashboard_cm(m):
    return m.get("ConfigMap", "-dashboard")


def test_no_dashboard_by_default(profile):
    assert profile("default").find("ConfigMap", "-dashboard") is None


def test_dashboard_configmap_carries_the_sidecar_label_and_valid_json(render):
    cm = _dashboard_cm(render(values=ON))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "edge-ns"
    dash = json.loads(cm["data"]["quicproxy.json"])
    assert dash["uid"] == "quic-proxy-waf"
    assert dash == json.loads((CHART / "dashboards" / "quicproxy.json").read_text())


def test_dashboard_label_namespace_and_folder_are_configurable(render):
    values = {
        "metrics": {
            "dashboard": {
                "enabled": True,
                "labels": {"grafana_dashboard": "edge"},
                "annotations": {"grafana_folder": "Edge"},
                "namespace": "monitoring",
            }
        }
    }
    cm = _dashboard_cm(render(values=values))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "edge"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Edge"
    assert cm["metadata"]["namespace"] == "monitoring"


def test_every_panel_queries_metrics_the_proxy_exports():
    dash = json.loads((CHART / "dashboards" / "quicproxy.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"quicproxy_[a-z_]+", e)}
    assert used == set(EXPORTED)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_exported_names_match_the_running_proxy():
    from quicproxy._metrics import Metrics

    m = Metrics()
    m.requests.labels("h1", "2xx", "default").inc()
    for name in ("request_duration", "upstream_duration"):
        getattr(m, name).labels("h1").observe(0.1)
    m.waf_duration.labels("inline").observe(0.001)
    for counter in ("bytes_received", "bytes_sent", "stream_resets", "active_connections"):
        getattr(m, counter).labels("h1").inc()
    m.connections_refused.labels("per_ip").inc()
    m.waf_decisions.labels("coraza", "allow").inc()
    m.upstream_errors.labels("connect").inc()
    m.rate_limited.labels("default").inc()
    m.cert_reloads.labels("ok").inc()
    m.initials_dropped.labels("queue").inc()
    text = m.render().decode()
    for name in EXPORTED:
        assert f"\n{name}" in text, name
