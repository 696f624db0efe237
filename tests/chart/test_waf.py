"""waf.enabled deploys the WAF service and the proxy's ConfigMap points at it."""

from __future__ import annotations

from ._chart import NAMESPACE, RELEASE, container

WAF_URL = f"http://{RELEASE}-quic-proxy-waf-waf.{NAMESPACE}.svc:9000"


def test_waf_service_runs_quicproxy_waf_serve(profile):
    m = profile("default")
    dep = m.get("Deployment", "-waf")
    assert dep["spec"]["replicas"] == 2
    waf = container(dep["spec"]["template"], "waf")
    assert waf["command"] + waf["args"] == ["quicproxy", "waf", "serve", "--port", "9000"]
    assert waf["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert waf[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_waf_service_exposes_its_port(profile):
    svc = profile("default").get("Service", "-waf")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = profile("default").get("Deployment", "-waf")["spec"]["template"]["metadata"]["labels"]
    assert labels.items() >= svc["spec"]["selector"].items()


def test_complete_example_runs_three_waf_replicas(profile):
    assert (
        profile("examples/daemonset-edge-complete").get("Deployment", "-waf")["spec"]["replicas"]
        == 3
    )


def test_proxy_calls_the_waf_service_from_its_configmap(profile):
    waf = profile("default").proxy_config()["waf"]
    assert waf == {"mode": "service", "url": WAF_URL, "timeout_ms": 1000, "fail": "closed"}


def test_waf_settings_follow_values(render):
    m = render(
        values={
            "proxy": {"waf": {"timeout": 250, "fail": "open"}},
            "waf": {"service": {"port": 9100}},
        }
    )
    waf = m.proxy_config()["waf"]
    assert waf["timeout_ms"] == 250 and waf["fail"] == "open"
    assert waf["url"].endswith(".svc:9100")
    assert m.get("Service", "-waf")["spec"]["ports"][0]["port"] == 9100
    # the container keeps its own unprivileged port
    waf_c = container(m.get("Deployment", "-waf")["spec"]["template"], "waf")
    assert waf_c["ports"][0]["containerPort"] == 9000


def test_waf_disabled_example_deploys_no_waf_and_turns_inspection_off(profile):
    m = profile("examples/waf-disabled")
    waf_objects = [
        d["metadata"]["name"]
        for d in m.docs
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "waf"
    ]
    assert waf_objects == []
    assert m.find("Deployment", "-waf") is None
    assert m.proxy_config()["waf"]["mode"] == "off"
    assert "url" not in m.proxy_config()["waf"]


def test_without_waf_service_the_proxy_inspects_inline(render):
    m = render(values={"waf": {"enabled": False}})
    assert m.find("Deployment", "-waf") is None
    assert m.proxy_config()["waf"]["mode"] == "inline"


def test_external_waf_url_is_used_when_the_chart_deploys_none(render):
    m = render(
        values={"waf": {"enabled": False}, "proxy": {"waf": {"url": "http://waf.security:9000"}}}
    )
    waf = m.proxy_config()["waf"]
    assert (waf["mode"], waf["url"]) == ("service", "http://waf.security:9000")


def test_proxy_restarts_when_waf_settings_change(render):
    def checksum(values):
        pod = render(values=values).proxy_pod()
        return pod["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"proxy": {"waf": {"timeout": 250}}})
    assert checksum({}) == checksum({"proxy": {"replicaCount": 4}})
