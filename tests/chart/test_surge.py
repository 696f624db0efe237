"""daemonset.surge: on the host network a node's new pod starts beside the old one
(maxSurge 1, maxUnavailable 0) and they share the QUIC hand-over folder; elsewhere refused."""

from __future__ import annotations

from ._chart import PROFILES


def test_surge_on_the_host_network_rolls_with_a_new_pod_beside_the_old(render):
    m = render(PROFILES["daemonset"][0], values={"daemonset": {"surge": True}})
    ds = m.get("DaemonSet", "-proxy")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = m.proxy_pod()["spec"]
    c = m.proxy_container()
    assert pod["hostNetwork"] is True
    assert "ports" not in c  # a declared port is a host port here: two pods cannot hold it
    assert c["readinessProbe"]["httpGet"]["port"] == 80
    assert c["livenessProbe"]["httpGet"]["port"] == 80
    volume = next(v for v in pod["volumes"] if v["name"] == "quic-handover")
    assert volume["hostPath"] == {"path": "/run/quicproxy", "type": "DirectoryOrCreate"}
    mount = next(v for v in c["volumeMounts"] if v["name"] == "quic-handover")
    assert mount["mountPath"] == "/run/quicproxy"
    assert m.proxy_config()["quic"]["handover_dir"] == "/run/quicproxy"


def test_surge_scrapes_metrics_by_port_number(render):
    values = {"daemonset": {"surge": True}, "metrics": {"serviceMonitor": {"enabled": True}}}
    service = render(PROFILES["daemonset"][0], values=values).get("Service", "-proxy-metrics")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [9464]


def test_surge_keeps_the_shared_secret_and_takes_another_node_folder(render):
    values = {
        "daemonset": {"surge": True, "handoverPath": "/var/run/edge"},
        "proxy": {"quic": {"sharedSecret": {"enabled": True}}},
    }
    m = render(PROFILES["daemonset"][0], values=values)
    quic = m.proxy_config()["quic"]
    assert quic == {
        "shared_secret_file": "/etc/quicproxy/quic/secret",
        "handover_dir": "/run/quicproxy",
    }
    volume = next(v for v in m.proxy_pod()["spec"]["volumes"] if v["name"] == "quic-handover")
    assert volume["hostPath"]["path"] == "/var/run/edge"


def test_without_surge_nothing_changes(profile):
    m = profile("daemonset")
    assert m.get("DaemonSet", "-proxy")["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1
    }
    assert "handover_dir" not in m.proxy_config().get("quic", {})
    assert {p["name"] for p in m.proxy_container()["ports"]} == {
        "http",
        "https",
        "http3",
        "metrics",
    }


def test_surge_without_the_host_network_fails_with_the_fix(render_error):
    text = render_error(
        PROFILES["daemonset"][0], values={"daemonset": {"surge": True, "hostNetwork": False}}
    )
    assert "daemonset.surge" in text and "hostPort" in text and "surge=false" in text
