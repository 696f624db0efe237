"""`helm test` runs a Pod that GETs /_gwhealthz over HTTP, TLS and HTTP/3."""

from __future__ import annotations

from ._chart import PROFILES, container


def _test_pod(m):
    (pod,) = [d for d in m.all("Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    return pod


def test_hook_hits_gwhealthz_through_the_service(profile):
    pod = _test_pod(profile("default"))
    healthz = container({"spec": pod["spec"]}, "healthz")
    urls = healthz["command"][3:]
    assert urls == [
        "http://edge-quic-proxy-waf-proxy.edge-ns.svc:80/_gwhealthz",
        "https://edge-quic-proxy-waf-proxy.edge-ns.svc:443/_gwhealthz",
    ]
    h3 = container({"spec": pod["spec"]}, "http3")
    assert h3["command"] + h3["args"] == [
        "quicproxy",
        "get",
        "--insecure",
        "--include",
        "https://edge-quic-proxy-waf-proxy.edge-ns.svc:443/_gwhealthz",
    ]
    assert pod["spec"]["restartPolicy"] == "Never"


def test_hook_uses_the_node_host_ports_without_a_service(profile):
    pod = _test_pod(profile("examples/custom-ports"))
    healthz = container({"spec": pod["spec"]}, "healthz")
    assert healthz["command"][3:] == [
        "http://$(HOST_IP):8080/_gwhealthz",
        "https://$(HOST_IP):8443/_gwhealthz",
    ]
    assert healthz["env"] == [
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    ]
    # scheduled next to a proxy pod, so the node's host ports are the proxy's
    term = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        0
    ]
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_hook_tolerates_the_edge_taints(profile):
    m = profile("examples/daemonset-edge-complete")
    assert _test_pod(m)["spec"]["tolerations"] == m.proxy_pod()["spec"]["tolerations"]


def test_hook_can_be_disabled(render):
    assert (
        render(PROFILES["daemonset"][0], values={"helmTest": {"enabled": False}}).all("Pod") == []
    )
