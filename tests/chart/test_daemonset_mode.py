"""proxy.kind: daemonset renders one proxy pod per node (values-daemonset.yaml)."""

from __future__ import annotations

from ._chart import PROFILES


def test_daemonset_profile_renders_a_daemonset_without_replicas(profile):
    m = profile("daemonset")
    ds = m.get("DaemonSet", "-proxy")
    assert "replicas" not in ds["spec"]
    assert m.find("Deployment", "-proxy") is None


def test_daemonset_rolls_one_node_at_a_time(profile):
    ds = profile("daemonset").get("DaemonSet", "-proxy")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }


def test_update_strategy_comes_from_values(render):
    ds = render(
        PROFILES["daemonset"][0],
        values={
            "daemonset": {
                "updateStrategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": "25%"},
                }
            }
        },
    ).get("DaemonSet", "-proxy")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": "25%"}


def test_daemonset_with_host_network_uses_cluster_dns(profile):
    spec = profile("daemonset").proxy_pod()["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_dns_policy_comes_from_values(render):
    spec = render(
        PROFILES["daemonset"][0], values={"daemonset": {"dnsPolicy": "Default"}}
    ).proxy_pod()["spec"]
    assert spec["dnsPolicy"] == "Default"


def test_host_network_can_be_turned_off_keeping_host_ports(render):
    m = render(PROFILES["daemonset"][0], values={"daemonset": {"hostNetwork": False}})
    spec = m.proxy_pod()["spec"]
    assert "hostNetwork" not in spec and "dnsPolicy" not in spec
    ports = {p["name"]: p.get("hostPort") for p in m.proxy_container()["ports"]}
    assert ports == {"http": 80, "https": 443, "http3": 443, "metrics": None}


def test_daemonset_without_host_ports_gets_a_service_and_no_host_network(render):
    # useHostPorts: false means nothing is bound on the node, even if
    # daemonset.hostNetwork was left on from values-daemonset.yaml
    m = render(PROFILES["daemonset"][0], values={"proxy": {"ports": {"useHostPorts": False}}})
    assert "hostNetwork" not in m.proxy_pod()["spec"]
    assert m.proxy_service() is not None


def test_daemonset_with_host_ports_has_no_service_and_no_pdb(profile):
    m = profile("daemonset")
    assert m.proxy_service() is None
    assert m.all("PodDisruptionBudget") == []


def test_deployment_and_daemonset_share_one_pod_template(render):
    """The two workloads differ only in the fields around the pod."""
    dep = render(values={"proxy": {"kind": "deployment"}}).proxy_workload()
    ds = render(values={"proxy": {"kind": "daemonset"}}).proxy_workload()
    assert dep["kind"] == "Deployment" and ds["kind"] == "DaemonSet"
    assert dep["spec"]["template"] == ds["spec"]["template"]
    assert dep["spec"]["selector"] == ds["spec"]["selector"]
    assert set(dep["spec"]) - set(ds["spec"]) == {"replicas", "strategy"}
    assert set(ds["spec"]) - set(dep["spec"]) == {"updateStrategy"}
