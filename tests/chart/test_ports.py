"""Host ports, container ports, Service ports and the advertised HTTP/3 port."""

from __future__ import annotations

import pytest

from ._chart import CHART, EXAMPLES, PROFILES, ports_by_name

DAEMONSET = CHART / "values-daemonset.yaml"
CUSTOM = EXAMPLES / "custom-ports.yaml"


def _host_ports(m):
    """Public ports of the proxy container (the metrics port is checked in test_metrics)."""
    ports = [p for p in m.proxy_container()["ports"] if p["name"] != "metrics"]
    return {(p["name"], p["protocol"], p.get("hostPort")) for p in ports}


def test_host_ports_bind_http_tcp_and_https_tcp_and_udp(profile):
    assert _host_ports(profile("daemonset")) == {
        ("http", "TCP", 80),
        ("https", "TCP", 443),
        ("http3", "UDP", 443),
    }


def test_custom_ports_example_binds_8080_and_8443(profile):
    m = profile("examples/custom-ports")
    assert _host_ports(m) == {("http", "TCP", 8080), ("https", "TCP", 8443), ("http3", "UDP", 8443)}
    assert m.proxy_config()["listen"]["alt_svc_port"] == 8443


def test_custom_ports_on_top_of_values_daemonset(render):
    m = render(DAEMONSET, CUSTOM)
    assert _host_ports(m) == {("http", "TCP", 8080), ("https", "TCP", 8443), ("http3", "UDP", 8443)}
    assert m.proxy_service() is None


def test_with_host_network_the_container_binds_the_public_ports(profile):
    m = profile("daemonset")
    for p in m.proxy_container()["ports"]:
        assert p["containerPort"] == p["hostPort"], p
    listen = m.proxy_config()["listen"]
    assert (listen["http_port"], listen["https_port"]) == (80, 443)


def test_without_host_network_hostport_maps_onto_unprivileged_ports(render):
    m = render(DAEMONSET, values={"daemonset": {"hostNetwork": False}})
    ports = ports_by_name(m.proxy_container())
    assert (ports["http"]["hostPort"], ports["http"]["containerPort"]) == (80, 8080)
    assert (ports["https"]["hostPort"], ports["https"]["containerPort"]) == (443, 8443)
    assert (ports["http3"]["hostPort"], ports["http3"]["containerPort"]) == (443, 8443)
    listen = m.proxy_config()["listen"]
    assert (listen["http_port"], listen["https_port"], listen["alt_svc_port"]) == (8080, 8443, 443)


def test_no_host_ports_unless_asked(profile):
    for name in ("default", "examples/daemonset-no-hostports", "examples/waf-disabled"):
        assert all("hostPort" not in p for p in profile(name).proxy_container()["ports"]), name


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_proxy_service_carries_udp_for_http3(profile, name):
    m = profile(name)
    svc = m.proxy_service()
    if svc is None:
        assert m.proxy_workload()["kind"] == "DaemonSet"
        assert m.proxy_container()["ports"][0].get("hostPort")
        return
    by_proto = {(p["protocol"], p["port"]): p["targetPort"] for p in svc["spec"]["ports"]}
    https = m.proxy_config()["listen"]["alt_svc_port"]
    assert by_proto[("UDP", https)] == "http3"
    assert by_proto[("TCP", https)] == "https"
    names = set(ports_by_name(m.proxy_container()))
    assert set(by_proto.values()) <= names


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_alt_svc_advertises_the_public_https_port(profile, name):
    m = profile(name)
    listen = m.proxy_config()["listen"]
    ports = ports_by_name(m.proxy_container())
    assert listen["http_port"] == ports["http"]["containerPort"]
    assert (
        listen["https_port"] == ports["https"]["containerPort"] == ports["http3"]["containerPort"]
    )
    svc = m.proxy_service()
    public = ports["https"].get("hostPort") or next(
        p["port"] for p in svc["spec"]["ports"] if p["name"] == "https"
    )
    assert listen["alt_svc_port"] == public


def test_seed_port_conflict_snippet_alone_gives_host_ports_8080_8443(render):
    m = render(values={"proxy": {"ports": {"http": 8080, "https": 8443, "useHostPorts": True}}})
    assert _host_ports(m) == {("http", "TCP", 8080), ("https", "TCP", 8443), ("http3", "UDP", 8443)}
    svc_ports = {(p["port"], p["protocol"]) for p in m.proxy_service()["spec"]["ports"]}
    assert svc_ports == {(8080, "TCP"), (8443, "TCP"), (8443, "UDP")}
