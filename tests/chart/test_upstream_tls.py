"""proxy.backend.scheme and proxy.upstreamTls: TLS to the backend from a mounted Secret."""

from __future__ import annotations

import yaml

from ._chart import container, stand_in_quic_secret

MOUNT = "/etc/quicproxy/upstream-tls"


def test_by_default_the_backend_is_plain_http_with_no_upstream_tls(render):
    m = render(values={"proxy": {"backend": {"host": "api"}}})
    cfg = m.proxy_config()
    assert cfg["backend"] == "http://api:8080" and "upstream" not in cfg
    assert all(v["name"] != "upstream-tls" for v in m.proxy_pod()["spec"]["volumes"])


def test_an_https_backend_with_a_secret_gets_its_ca_and_client_pair_mounted(render, tmp_path):
    values = {
        "proxy": {
            "backend": {"host": "api", "port": 8443, "scheme": "https"},
            "upstreamTls": {
                "secretName": "api-client",
                "clientCertificate": True,
                "serverName": "api.internal",
            },
        }
    }
    m = render(values=values)
    cfg = m.proxy_config()
    assert cfg["backend"] == "https://api:8443"
    assert cfg["upstream"]["tls"] == {
        "ca": f"{MOUNT}/ca.crt",
        "cert": f"{MOUNT}/tls.crt",
        "key": f"{MOUNT}/tls.key",
        "server_name": "api.internal",
    }
    pod = m.proxy_pod()
    mount = next(v for v in container(pod, "proxy")["volumeMounts"] if v["name"] == "upstream-tls")
    assert mount == {"name": "upstream-tls", "mountPath": MOUNT, "readOnly": True}
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "upstream-tls")
    assert volume["secret"]["secretName"] == "api-client"

    # quicproxy accepts it, with stand-in PEM files where the Secret is mounted
    from quicproxy import load_config
    from quicproxy._tls import self_signed

    self_signed(tmp_path / "tls.crt", tmp_path / "tls.key")
    text = m.get("ConfigMap", "-proxy-config")["data"]["config.yaml"]
    text = text.replace(f"{MOUNT}/ca.crt", str(tmp_path / "tls.crt")).replace(MOUNT, str(tmp_path))
    data = yaml.safe_load(text)
    data["tls"] = {"self_signed_dir": str(tmp_path)}
    stand_in_quic_secret(data, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg_obj = load_config(str(path), env={})
    assert cfg_obj.upstream.tls.cert == str(tmp_path / "tls.crt")


def test_verify_false_and_the_system_store_need_no_secret(render):
    values = {"proxy": {"backend": {"host": "api", "scheme": "https"}}}
    assert "upstream" not in render(values=values).proxy_config()
    values["proxy"]["upstreamTls"] = {"verify": False}
    assert render(values=values).proxy_config()["upstream"] == {"tls": {"verify": False}}


def test_a_client_certificate_without_a_secret_fails_naming_the_key(render_error):
    err = render_error(values={"proxy": {"upstreamTls": {"clientCertificate": True}}})
    assert "proxy.upstreamTls.clientCertificate" in err and "secretName" in err


def test_the_schema_refuses_an_unknown_backend_scheme(render_error):
    err = render_error(values={"proxy": {"backend": {"scheme": "ftp"}}})
    assert "proxy.backend.scheme" in err and "must be one of" in err
