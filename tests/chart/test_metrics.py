"""metrics.serviceMonitor.enabled scrapes /metrics of the proxy and the WAF."""

from __future__ import annotations

import pytest

from ._chart import CHART

ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}
    }
}


def test_no_service_monitor_by_default(profile):
    m = profile("default")
    assert m.all("ServiceMonitor") == [] and m.find("Service", "-metrics") is None


@pytest.mark.parametrize("files", [[], [CHART / "values-daemonset.yaml"]], ids=["deploy", "ds"])
def test_service_monitor_selects_proxy_and_waf_metrics_services(render, files):
    m = render(*files, values=ON)
    (sm,) = m.all("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["edge-ns"]}
    selected = [
        s
        for s in m.all("Service")
        if s["metadata"]["labels"].items() >= sm["spec"]["selector"]["matchLabels"].items()
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == [
        "edge-quic-proxy-waf-proxy-metrics",
        "edge-quic-proxy-waf-waf",
    ]
    for svc in selected:
        assert "http" in {p["name"] for p in svc["spec"]["ports"]}


def test_metrics_service_is_headless_on_the_proxy_http_port(render):
    m = render(CHART / "values-daemonset.yaml", values=ON)
    svc = m.get("Service", "-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert m.proxy_pod()["metadata"]["labels"].items() >= svc["spec"]["selector"].items()
