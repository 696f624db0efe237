"""proxy.kind: deployment renders a Deployment of replicaCount pods behind a Service."""

from __future__ import annotations

from ._chart import NAMESPACE, RELEASE


def test_default_profile_is_a_deployment_with_replica_count(profile):
    m = profile("default")
    dep = m.get("Deployment", "-proxy")
    assert dep["metadata"]["name"] == f"{RELEASE}-quic-proxy-waf-proxy"
    assert dep["spec"]["replicas"] == 3
    assert m.all("DaemonSet") == []


def test_replica_count_reaches_the_deployment(render):
    dep = render(values={"proxy": {"replicaCount": 5}}).get("Deployment", "-proxy")
    assert dep["spec"]["replicas"] == 5


def test_deployment_rolls_without_losing_capacity(profile):
    strategy = profile("default").get("Deployment", "-proxy")["spec"]["strategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


def test_deployment_on_host_ports_rolls_one_pod_at_a_time(render):
    # a surge pod would find its host ports taken on every node
    dep = render(values={"proxy": {"ports": {"useHostPorts": True}}}).proxy_workload()
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_deployment_strategy_comes_from_values(render):
    dep = render(values={"proxy": {"strategy": {"type": "Recreate"}}}).proxy_workload()
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_long_release_names_give_valid_service_names(render):
    m = render(
        values={"fullnameOverride": "x" * 63, "metrics": {"serviceMonitor": {"enabled": True}}}
    )
    names = [s["metadata"]["name"] for s in m.all("Service")]
    assert len(names) == 3
    assert all(len(n) <= 63 and not n.endswith("-") for n in names), names


def test_deployment_gets_a_service_with_tcp_and_udp(profile):
    svc = profile("default").get("Service", "-proxy")
    assert svc["spec"]["type"] == "LoadBalancer"
    ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert ports == {(80, "TCP"), (443, "TCP"), (443, "UDP")}


def test_deployment_never_uses_host_network(render):
    # daemonset.* settings belong to DaemonSet mode only
    pod = render(
        values={"daemonset": {"hostNetwork": True}, "proxy": {"ports": {"useHostPorts": True}}}
    ).proxy_pod()
    assert "hostNetwork" not in pod["spec"]
    assert "dnsPolicy" not in pod["spec"]


def test_deployment_with_host_ports_keeps_its_service(render):
    m = render(values={"proxy": {"ports": {"useHostPorts": True}}})
    assert m.get("Deployment", "-proxy")
    assert m.proxy_service() is not None
    ports = m.proxy_container()["ports"]
    assert {p.get("hostPort") for p in ports if p["name"] != "metrics"} == {80, 443}
    assert [p for p in ports if p["name"] == "metrics" and "hostPort" in p] == []


def test_service_can_be_switched_off(render):
    assert render(values={"service": {"enabled": False}}).proxy_service() is None


def test_objects_live_in_the_release_namespace_and_no_namespace_is_created(profile):
    m = profile("default")
    assert "Namespace" not in m.kinds()
    assert {d["metadata"]["namespace"] for d in m.docs} == {NAMESPACE}
