"""NetworkPolicies: `from` under ingress, `to` under egress, ports that match the pods."""

from __future__ import annotations

import pytest

from ._chart import PROFILES, container


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_rules_use_from_for_ingress_and_to_for_egress(profile, name):
    policies = profile(name).all("NetworkPolicy")
    assert policies, name
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            assert set(rule) <= {"from", "ports"}, pol["metadata"]["name"]
        for rule in pol["spec"].get("egress", []):
            assert set(rule) <= {"to", "ports"}, pol["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_proxy_policy_opens_exactly_the_proxy_ports(profile, name):
    m = profile(name)
    pol = m.get("NetworkPolicy", "-proxy")
    labels = m.proxy_pod()["metadata"]["labels"]
    assert labels.items() >= pol["spec"]["podSelector"]["matchLabels"].items()
    (rule,) = pol["spec"]["ingress"]
    assert "from" not in rule  # reachable from anywhere: it is the edge
    opened = {(p["port"], p["protocol"]) for p in rule["ports"]}
    wanted = {(p["containerPort"], p["protocol"]) for p in m.proxy_container()["ports"]}
    assert opened == wanted


def test_proxy_may_reach_dns_backend_and_waf_only(profile):
    m = profile("examples/daemonset-edge-complete")
    egress = m.get("NetworkPolicy", "-proxy")["spec"]["egress"]
    open_anywhere = {
        (p["port"], p["protocol"]) for r in egress if "to" not in r for p in r["ports"]
    }
    assert open_anywhere == {(53, "UDP"), (53, "TCP"), (8080, "TCP")}
    (to_waf,) = [r for r in egress if "to" in r]
    waf_pod = m.get("Deployment", "-waf")["spec"]["template"]
    selector = to_waf["to"][0]["podSelector"]["matchLabels"]
    assert waf_pod["metadata"]["labels"].items() >= selector.items()
    assert to_waf["ports"] == [
        {"port": container(waf_pod, "waf")["ports"][0]["containerPort"], "protocol": "TCP"}
    ]


def test_waf_accepts_only_the_proxy(profile):
    m = profile("default")
    pol = m.get("NetworkPolicy", "-waf")
    (rule,) = pol["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"
    assert m.proxy_pod()["metadata"]["labels"].items() >= peer["podSelector"]["matchLabels"].items()
    assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_policies_can_be_disabled(render):
    assert render(values={"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []


def test_no_waf_policy_without_waf(profile):
    assert profile("examples/waf-disabled").find("NetworkPolicy", "-waf") is None
