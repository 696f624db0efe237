"""Metrics: the proxy's /metrics listener on a container port of its own (never
a host port), scraped by the ServiceMonitor through the headless -metrics Service."""

from __future__ import annotations

import pytest

from ._chart import CHART, PROFILES, ports_by_name

ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}
    }
}


def test_no_service_monitor_by_default(profile):
    m = profile("default")
    assert m.all("ServiceMonitor") == [] and m.find("Service", "-metrics") is None


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_metrics_port_is_a_container_port_and_a_host_port_only_with_host_network(profile, name):
    m = profile(name)
    port = ports_by_name(m.proxy_container())["metrics"]
    host_network = m.proxy_pod()["spec"].get("hostNetwork", False)
    expected = {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    if host_network:  # the pod is the node's network: Kubernetes sets hostPort anyway
        expected["hostPort"] = 9464
    assert port == expected
    assert m.proxy_config()["metrics"] == {"port": 9464, "host": "0.0.0.0"}


def test_metrics_port_is_configurable(render):
    m = render(values={"metrics": {"port": 9100, **ON["metrics"]}})
    assert ports_by_name(m.proxy_container())["metrics"]["containerPort"] == 9100
    assert m.proxy_config()["metrics"]["port"] == 9100
    assert m.get("Service", "-metrics")["spec"]["ports"][0]["port"] == 9100


def test_metrics_port_must_differ_from_the_proxy_ports(render_error):
    err = render_error(values={"metrics": {"port": 8443}})
    assert "metrics.port: 8443" in err and "port of its own" in err, err


@pytest.mark.parametrize("files", [[], [CHART / "values-daemonset.yaml"]], ids=["deploy", "ds"])
def test_service_monitor_scrapes_the_proxy_metrics_port_and_the_waf(render, files):
    m = render(*files, values=ON)
    (sm,) = m.all("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"},
        {"port": "http", "path": "/metrics", "interval": "15s"},
    ]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["edge-ns"]}
    selected = {
        s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]}
        for s in m.all("Service")
        if s["metadata"]["labels"].items() >= sm["spec"]["selector"]["matchLabels"].items()
    }
    assert selected == {
        "edge-quic-proxy-waf-proxy-metrics": {"metrics"},
        "edge-quic-proxy-waf-waf": {"http"},
    }


def test_metrics_service_is_headless_on_the_metrics_port(render):
    m = render(CHART / "values-daemonset.yaml", values=ON)
    svc = m.get("Service", "-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert m.proxy_pod()["metadata"]["labels"].items() >= svc["spec"]["selector"].items()


def test_public_proxy_service_does_not_carry_the_metrics_port(profile):
    svc = profile("default").proxy_service()
    assert svc is not None and "metrics" not in {p["name"] for p in svc["spec"]["ports"]}
