"""waf.enabled deploys the WAF service and the proxy's ConfigMap points at it."""

from __future__ import annotations

import yaml

from quicproxy import load_config

from ._chart import NAMESPACE, RELEASE, container, stand_in_quic_secret

WAF_URL = f"http://{RELEASE}-quic-proxy-waf-waf.{NAMESPACE}.svc:9000"


def test_waf_service_runs_quicproxy_waf_serve(profile):
    m = profile("default")
    dep = m.get("Deployment", "-waf")
    assert dep["spec"]["replicas"] == 2
    waf = container(dep["spec"]["template"], "waf")
    assert waf["command"] + waf["args"] == [
        "quicproxy",
        "waf",
        "serve",
        "--port",
        "9000",
        "--config",
        "/etc/quicproxy/config.yaml",
    ]
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
    audit = {"log": "stdout", "record": "refused", "rate": 50, "burst": 200, "data_limit": 200}
    assert waf == {
        "mode": "service",
        "url": WAF_URL,
        "timeout_ms": 1000,
        "fail": "closed",
        "audit": audit,
    }


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


def test_proxy_restarts_only_for_settings_it_cannot_reload(render):
    """The proxy reloads routes, limits and WAF settings when the mounted ConfigMap
    changes; only ports, certificates, QUIC, workers, upstream pools and rule files roll
    the pods (the checksum annotation)."""

    def checksum(values):
        pod = render(values=values).proxy_pod()
        return pod["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert base == checksum({"proxy": {"waf": {"timeout": 250}}})  # reloaded live
    assert base == checksum({"proxy": {"config": {"routes": [{"backends": ["http://a:1"]}]}}})
    assert base == checksum({"proxy": {"replicaCount": 4}})
    assert base != checksum({"proxy": {"config": {"workers": 2}}})
    assert base != checksum({"proxy": {"config": {"quic": {"idle_timeout": 30}}}})
    assert base != checksum({"proxy": {"tls": {"secretName": "edge-tls"}}})
    rules = {"waf": {"enabled": False, "crs": {"extraRules": {"a.conf": "# one"}}}}
    other = {"waf": {"enabled": False, "crs": {"extraRules": {"a.conf": "# two"}}}}
    assert checksum(rules) != checksum(other)


CRS_VALUES = {
    "engine": "coraza",
    "crs": {
        "paranoiaLevel": 2,
        "detectionParanoiaLevel": 3,
        "inboundAnomalyThreshold": 7,
        "earlyBlocking": True,
        "allowedMethods": ["GET", "POST"],
        "allowedContentTypes": ["application/json", "application/octet-stream"],
        "exclusions": [{"ruleId": 920420, "pathPrefix": "/upload"}, {"ruleId": 913100}],
        "extraRules": {"local.conf": 'SecRule ARGS "@streq x" "id:12345,phase:2,deny"'},
    },
}


def _loads_in_quicproxy(text, tmp_path):
    """The rendered config.yaml as quicproxy reads it (unknown keys or bad values fail)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stand_in_quic_secret(yaml.safe_load(text), tmp_path)))
    return load_config(str(path), env={}).waf


def test_waf_service_gets_engine_and_crs_settings(render, tmp_path):
    m = render(values={"waf": CRS_VALUES})
    data = m.get("ConfigMap", "-waf-config")["data"]
    assert data["local.conf"].strip() == CRS_VALUES["crs"]["extraRules"]["local.conf"]
    waf = _loads_in_quicproxy(data["config.yaml"], tmp_path)
    assert (waf.engine, waf.paranoia_level, waf.detection_paranoia_level) == ("coraza", 2, 3)
    assert (waf.anomaly_threshold, waf.early_blocking) == (7, True)
    assert waf.allowed_methods == ["GET", "POST"]
    assert waf.allowed_content_types == ["application/json", "application/octet-stream"]
    assert [(e.rule_id, e.path_prefix) for e in waf.exclusions] == [
        (920420, "/upload"),
        (913100, None),
    ]
    assert waf.extra_rules == ["/etc/quicproxy/local.conf"]
    pod = m.get("Deployment", "-waf")["spec"]["template"]
    mounts = container(pod, "waf")["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/quicproxy", "readOnly": True} in mounts
    # the service restarts when its settings change
    other = render(values={"waf": {"crs": {"paranoiaLevel": 3}}})
    annotations = other.get("Deployment", "-waf")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"] != pod["metadata"]["annotations"]["checksum/config"]


def test_default_engine_is_coraza_with_crs_defaults(profile, tmp_path):
    data = profile("default").get("ConfigMap", "-waf-config")["data"]
    waf = _loads_in_quicproxy(data["config.yaml"], tmp_path)
    assert (waf.engine, waf.paranoia_level, waf.anomaly_threshold) == ("coraza", 1, 5)
    assert waf.detection_paranoia_level is None and waf.allowed_content_types == []


def test_inline_proxy_gets_engine_settings_and_rule_files(render, tmp_path):
    values = {"waf": {**CRS_VALUES, "enabled": False, "engine": "modsecurity"}}
    m = render(values=values)
    cm = m.get("ConfigMap", "-proxy-config")
    waf = _loads_in_quicproxy(cm["data"]["config.yaml"], tmp_path)
    assert (waf.mode, waf.engine, waf.paranoia_level) == ("inline", "modsecurity", 2)
    assert waf.extra_rules == ["/etc/quicproxy/config/local.conf"]
    assert "local.conf" in cm["data"]
    mounts = container(m.proxy_pod(), "proxy")["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/quicproxy/config", "readOnly": True} in mounts


def test_service_mode_proxy_config_carries_no_engine_settings(render):
    waf = render(values={"waf": CRS_VALUES}).proxy_config()["waf"]
    assert "engine" not in waf and "paranoia_level" not in waf
    assert yaml.safe_dump(waf)
