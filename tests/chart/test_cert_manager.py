"""examples/values/cert-manager.yaml: a cert-manager Certificate writes the
Secret proxy.tls.secretName, which the proxy pods mount (and reload)."""

from __future__ import annotations

import pytest

EXAMPLE = "examples/cert-manager"


def test_no_certificate_by_default(profile):
    assert profile("default").find("Certificate") is None


def test_certificate_writes_the_secret_the_pods_mount(profile):
    m = profile(EXAMPLE)
    cert = m.get("Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["metadata"]["namespace"] == "edge-ns"
    spec = cert["spec"]
    assert spec["secretName"] == "edge-tls"
    assert spec["dnsNames"] == ["edge.example.com", "www.edge.example.com"]
    assert spec["commonName"] == "edge.example.com"
    assert spec["issuerRef"] == {
        "name": "letsencrypt",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert (spec["duration"], spec["renewBefore"]) == ("2160h", "720h")
    volumes = m.proxy_pod()["spec"]["volumes"]
    secrets = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert secrets - {"edge-quic-proxy-waf-proxy-quic"} == {"edge-tls"}  # and the QUIC secret
    tls = m.proxy_config()["tls"]
    assert tls == {"cert": "/etc/quicproxy/tls/tls.crt", "key": "/etc/quicproxy/tls/tls.key"}


def test_secret_is_mounted_as_a_folder_so_kubelet_updates_reach_the_pod(profile):
    c = profile(EXAMPLE).proxy_container()
    mounts = [v for v in c["volumeMounts"] if v["name"].startswith("tls-")]
    assert mounts and all("subPath" not in v for v in mounts)  # subPath never updates


@pytest.mark.parametrize(
    "values,words",
    [
        (
            {"proxy": {"tls": {"certManager": {"enabled": True}}}},
            "set proxy.tls.secretName",
        ),
        (
            {"proxy": {"tls": {"secretName": "x", "certManager": {"enabled": True}}}},
            "issuerRef.name and at least one dnsNames",
        ),
    ],
)
def test_incomplete_cert_manager_values_fail_with_the_fix(render_error, values, words):
    assert words in render_error(values=values)
