"""The proxy's config.yaml (ConfigMap) is one quicproxy accepts, and matches the pod."""

from __future__ import annotations

import posixpath

import pytest
import yaml

from ._chart import PROFILES, container

# ENV of the project's image (Dockerfile); the pod must override what matters.
IMAGE_ENV = {"HTTP_PORT": "8080", "HTTPS_PORT": "8443", "WAF_PORT": "9000"}


def _load(m, tmp_path):
    """What `quicproxy serve` would run with: file < image env < pod env < flags."""
    from quicproxy import load_config

    c = m.proxy_container()
    path = tmp_path / "config.yaml"
    data = yaml.safe_load(m.get("ConfigMap", "-proxy-config")["data"]["config.yaml"])
    if "cert" in data["tls"]:  # a mounted Secret: check the pod mounts it, load stand-ins
        mounts = [v["mountPath"] for v in c["volumeMounts"] if v["name"].startswith("tls-")]
        assert posixpath.dirname(data["tls"]["cert"]) in mounts
        assert posixpath.dirname(data["tls"]["key"]) in mounts
        from quicproxy._tls import self_signed

        self_signed(tmp_path / "tls.crt", tmp_path / "tls.key")
        listed = data["tls"].get("certificates", [])
        for pair in listed:  # the SNI pairs (proxy.tls.secrets): mounted too
            assert posixpath.dirname(pair["cert"]) in mounts
            assert posixpath.dirname(pair["key"]) in mounts
        data["tls"] = {"cert": str(tmp_path / "tls.crt"), "key": str(tmp_path / "tls.key")}
        if listed:
            data["tls"]["certificates"] = [dict(data["tls"]) for _ in listed]
    secret = data.get("quic", {}).get("shared_secret_file")
    if secret:  # the QUIC secret's Secret: check the pod mounts it, load a stand-in
        mounts = [v["mountPath"] for v in c["volumeMounts"] if v["name"] == "quic-secret"]
        assert posixpath.dirname(secret) in mounts
        (tmp_path / "quic-secret").write_text(m.made_secret_text())
        data["quic"]["shared_secret_file"] = str(tmp_path / "quic-secret")
    path.write_text(yaml.safe_dump(data))
    env = dict(IMAGE_ENV)
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    assert c["command"] == ["quicproxy"] and c["args"][:3] == [
        "serve",
        "--config",
        "/etc/quicproxy/config/config.yaml",
    ]
    return load_config(str(path), env=env)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_quicproxy_accepts_the_rendered_config(profile, name, tmp_path):
    m = profile(name)
    cfg = _load(m, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in m.proxy_container()["ports"]}
    assert cfg.listen.http_port == ports["http"]
    assert cfg.listen.https_port == ports["https"] == ports["http3"]
    if not m.all("Certificate"):
        assert cfg.tls.self_signed_dir == "/var/run/quicproxy/tls"
    assert cfg.metrics.port == ports["metrics"] and cfg.metrics.host == "0.0.0.0"
    assert cfg.log.access == "json"


def test_config_file_is_mounted_where_serve_reads_it(profile):
    pod = profile("default").proxy_pod()
    mount = next(v for v in container(pod, "proxy")["volumeMounts"] if v["name"] == "config")
    # a folder, not subPath: the kubelet's updates of the ConfigMap reach the running pod
    assert mount == {"name": "config", "mountPath": "/etc/quicproxy/config", "readOnly": True}
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert (
        volume["configMap"]["name"]
        == profile("default").get("ConfigMap", "-proxy-config")["metadata"]["name"]
    )


def test_backend_comes_from_proxy_backend(profile):
    cfg = profile("examples/daemonset-edge-complete").proxy_config()
    assert cfg["backend"] == "http://api-backend.internal:8080"


def test_no_backend_means_the_demo_backend(profile):
    assert "backend" not in profile("default").proxy_config()


def test_extra_config_is_merged_over_the_generated_file(render, tmp_path):
    routes = [{"host": "api.example.com", "path_prefix": "/", "backends": ["http://api:8080"]}]
    m = render(
        values={
            "proxy": {
                "config": {
                    "routes": routes,
                    "log_level": "debug",
                    "listen": {"plain_http": "proxy"},
                }
            }
        }
    )
    cfg = m.proxy_config()
    assert cfg["routes"] == routes and cfg["log_level"] == "debug"
    assert cfg["listen"]["plain_http"] == "proxy"
    assert cfg["listen"]["https_port"] == 8443  # generated keys kept
    loaded = _load(m, tmp_path)
    assert loaded.routes[0].host == "api.example.com"


def test_shutdown_grace_reaches_config_and_pod(render):
    m = render(values={"proxy": {"shutdownGrace": 50}})
    assert m.proxy_config()["shutdown_grace"] == 50
    assert m.proxy_pod()["spec"]["terminationGracePeriodSeconds"] == 55


@pytest.mark.parametrize(
    "cert,key,volumes",
    [
        ("/etc/quicproxy/tls/tls.crt", "/etc/quicproxy/tls/tls.key", 1),
        # the replaced chart's paths keep working
        ("/etc/ssl/certs/tls.crt", "/etc/ssl/private/tls.key", 2),
    ],
)
def test_tls_secret_is_mounted_at_cert_and_key_files(render, cert, key, volumes):
    m = render(
        values={"proxy": {"tls": {"secretName": "edge-tls", "certFile": cert, "keyFile": key}}}
    )
    assert m.proxy_config()["tls"] == {"cert": cert, "key": key}
    pod = m.proxy_pod()
    volumes_of = pod["spec"]["volumes"]
    secrets = {
        v["name"]: v["secret"] for v in volumes_of if "secret" in v and v["name"] != "quic-secret"
    }
    assert len(secrets) == volumes
    assert all(s["secretName"] == "edge-tls" for s in secrets.values())
    files = {}
    for mount in container(pod, "proxy")["volumeMounts"]:
        if mount["name"] in secrets:
            assert mount["readOnly"] is True
            for item in secrets[mount["name"]]["items"]:
                files[posixpath.join(mount["mountPath"], item["path"])] = item["key"]
    assert files == {cert: "tls.crt", key: "tls.key"}
    assert all(v["name"] != "tls-self-signed" for v in pod["spec"]["volumes"])


def test_configmap_is_valid_yaml_with_no_unknown_top_level_keys(profile):
    known = {
        "backend",
        "routes",
        "listen",
        "tls",
        "quic",
        "limits",
        "upstream",
        "waf",
        "trusted_proxies",
        "rate_limit",
        "log",
        "metrics",
        "shutdown_grace",
        "workers",
        "log_level",
    }
    data = yaml.safe_load(
        profile("daemonset").get("ConfigMap", "-proxy-config")["data"]["config.yaml"]
    )
    assert set(data) <= known


def test_host_network_pods_wait_for_the_pod_they_replace_to_free_the_ports(profile, render):
    """On the host network the old pod drains on 80/443 while the new one starts."""
    daemonset = profile("daemonset").proxy_config()
    assert daemonset["listen"]["bind_wait"] == daemonset["shutdown_grace"] + 15
    assert "bind_wait" not in profile("default").proxy_config()["listen"]
    hostports = render(PROFILES["daemonset"][0], values={"daemonset": {"hostNetwork": False}})
    assert "bind_wait" not in hostports.proxy_config()["listen"]
