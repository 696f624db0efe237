"""proxy.tls.secrets: more certificate pairs chosen by SNI. Each Secret is mounted as a
folder (kubelet updates reach the pod, the proxy reloads it), named in the rendered
config's tls.certificates, and, in examples/values/cert-manager-sni.yaml, written by a
cert-manager Certificate of its own."""

from __future__ import annotations

import pytest

EXAMPLE = "examples/cert-manager-sni"


def test_no_sni_pairs_by_default(profile):
    assert "certificates" not in profile("default").proxy_config()["tls"]


def test_each_secret_is_mounted_and_named_in_the_config(profile):
    m = profile(EXAMPLE)
    tls = m.proxy_config()["tls"]
    assert tls["cert"] == "/etc/quicproxy/tls/tls.crt"  # the default pair stays
    folders = [f"/etc/quicproxy/tls-sni/{s}" for s in ("shop-tls", "api-tls")]
    assert tls["certificates"] == [{"cert": f"{d}/tls.crt", "key": f"{d}/tls.key"} for d in folders]
    volumes = {v["name"]: v for v in m.proxy_pod()["spec"]["volumes"]}
    assert volumes["tls-sni-0"]["secret"]["secretName"] == "shop-tls"
    assert volumes["tls-sni-1"]["secret"]["secretName"] == "api-tls"
    mounts = {v["name"]: v for v in m.proxy_container()["volumeMounts"]}
    for i, secret in enumerate(("shop-tls", "api-tls")):
        mount = mounts[f"tls-sni-{i}"]
        assert mount["mountPath"] == f"/etc/quicproxy/tls-sni/{secret}"
        assert mount["readOnly"] is True and "subPath" not in mount  # subPath never updates


def test_the_example_renders_a_certificate_per_secret(profile):
    certs = {c["spec"]["secretName"]: c["spec"] for c in profile(EXAMPLE).all("Certificate")}
    assert set(certs) == {"edge-tls", "shop-tls", "api-tls"}
    assert certs["api-tls"]["dnsNames"] == ["api.example.com", "*.api.example.com"]
    assert certs["shop-tls"]["issuerRef"] == certs["edge-tls"]["issuerRef"]
    assert certs["shop-tls"]["renewBefore"] == "720h"


def test_a_secret_without_dns_names_is_mounted_but_gets_no_certificate(render):
    m = render(
        values={"proxy": {"tls": {"secretName": "edge-tls", "secrets": [{"secretName": "own"}]}}}
    )
    assert m.find("Certificate") is None
    assert len(m.proxy_config()["tls"]["certificates"]) == 1


@pytest.mark.parametrize(
    "tls,words",
    [
        ({"secrets": [{"secretName": "shop-tls"}]}, "set proxy.tls.secretName"),
        (
            {"secretName": "a", "secrets": [{"secretName": "b"}, {"secretName": "b"}]},
            "Secret b is listed twice",
        ),
        ({"secretName": "a", "secrets": [{"secretName": "a"}]}, "Secret a is listed twice"),
        ({"secretName": "a", "secrets": ["b"]}, "proxy.tls.secrets"),
    ],
)
def test_bad_secrets_values_fail_with_the_fix(render_error, tls, words):
    assert words in render_error(values={"proxy": {"tls": tls}})
