"""nodeSelector, tolerations and affinity reach the pods."""

from __future__ import annotations

from ._chart import CHART

EDGE_SELECTOR = {"node-role.kubernetes.io/edge": "true"}
EDGE_TOLERATION = [{"key": "edge", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
ANTI_AFFINITY = {
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {
                        "matchExpressions": [
                            {
                                "key": "app.kubernetes.io/name",
                                "operator": "In",
                                "values": ["quic-proxy-waf"],
                            }
                        ]
                    },
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    }
}


def _waf_pod(m):
    return m.get("Deployment", "-waf")["spec"]["template"]


def test_complete_example_pins_proxy_and_waf_to_edge_nodes(profile):
    m = profile("examples/daemonset-edge-complete")
    for pod in (m.proxy_pod(), _waf_pod(m)):
        assert pod["spec"]["nodeSelector"] == EDGE_SELECTOR
        assert pod["spec"]["tolerations"] == [
            {"key": "edge-taint", "operator": "Exists", "effect": "NoSchedule"}
        ]


def test_node_selector_and_tolerations_reach_daemonset_pods(render):
    m = render(
        CHART / "values-daemonset.yaml",
        values={"nodeSelector": EDGE_SELECTOR, "tolerations": EDGE_TOLERATION},
    )
    spec = m.get("DaemonSet", "-proxy")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == EDGE_SELECTOR
    assert spec["tolerations"] == EDGE_TOLERATION


def test_anti_affinity_example_spreads_deployment_pods(render):
    m = render(values={"affinity": ANTI_AFFINITY})
    pod = m.get("Deployment", "-proxy")["spec"]["template"]
    assert pod["spec"]["affinity"] == ANTI_AFFINITY
    # the example's selector matches the pods it is meant to spread
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "quic-proxy-waf"


def test_waf_placement_can_differ_from_the_proxy(render):
    m = render(
        values={
            "nodeSelector": EDGE_SELECTOR,
            "waf": {"nodeSelector": {"pool": "waf"}, "tolerations": EDGE_TOLERATION},
        }
    )
    assert m.proxy_pod()["spec"]["nodeSelector"] == EDGE_SELECTOR
    assert "tolerations" not in m.proxy_pod()["spec"]
    assert _waf_pod(m)["spec"]["nodeSelector"] == {"pool": "waf"}
    assert _waf_pod(m)["spec"]["tolerations"] == EDGE_TOLERATION


def test_no_placement_by_default(profile):
    m = profile("default")
    for pod in (m.proxy_pod(), _waf_pod(m)):
        assert not {"nodeSelector", "tolerations", "affinity"} & set(pod["spec"])
