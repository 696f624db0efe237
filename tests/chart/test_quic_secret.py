"""proxy.quic.sharedSecret: one QUIC secret for every proxy pod, made once by the chart
(kept across upgrades with lookup) or named by the user, mounted and given to quicproxy
as quic.shared_secret_file."""

from __future__ import annotations

import base64

from quicproxy.quic._keys import read_secret_file

from ._chart import container


def test_the_chart_makes_one_secret_and_every_pod_reads_it(render, tmp_path):
    m = render()
    secret = m.get("Secret", "-quic")
    made = base64.b64decode(m.made[secret["metadata"]["name"]])
    path = tmp_path / "secret"
    path.write_bytes(made)
    assert [len(s) for s in read_secret_file(str(path))] == [32]  # what quicproxy accepts
    pod = m.proxy_pod()
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "quic-secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(v for v in container(pod, "proxy")["volumeMounts"] if v["name"] == "quic-secret")
    assert "subPath" not in mount  # a subPath mount never sees the Secret's updates (rotation)
    assert m.proxy_config()["quic"]["shared_secret_file"] == f"{mount['mountPath']}/secret"


def test_two_renders_make_different_secrets(render):
    first = render(values={"proxy": {"quic": {"sharedSecret": {"enabled": True}}}})
    second = render()
    assert first.made and second.made and first.made != second.made


def test_an_existing_secret_is_mounted_and_none_is_made(render):
    m = render(values={"proxy": {"quic": {"sharedSecret": {"existingSecret": "edge-quic"}}}})
    assert m.find("Secret", "-quic") is None
    volume = next(v for v in m.proxy_pod()["spec"]["volumes"] if v["name"] == "quic-secret")
    assert volume["secret"]["secretName"] == "edge-quic"


def test_off_leaves_each_pod_its_own_secret(render):
    m = render(values={"proxy": {"quic": {"sharedSecret": {"enabled": False}}}})
    assert m.find("Secret", "-quic") is None
    assert "quic" not in m.proxy_config()
    assert all(v["name"] != "quic-secret" for v in m.proxy_pod()["spec"]["volumes"])


def test_a_users_quic_config_merges_with_the_secret_file(render):
    m = render(values={"proxy": {"config": {"quic": {"early_data": True}}}})
    quic = m.proxy_config()["quic"]
    assert quic["early_data"] is True and quic["shared_secret_file"]


def test_the_daemonset_profile_shares_the_secret_too(profile):
    m = profile("daemonset")
    assert m.proxy_config()["quic"]["shared_secret_file"] == "/etc/quicproxy/quic/secret"
    assert m.find("Secret", "-quic") is not None


def test_a_bad_existing_secret_name_is_refused(render_error):
    err = render_error(values={"proxy": {"quic": {"sharedSecret": {"existingSecret": "Bad_Name"}}}})
    assert "proxy.quic.sharedSecret.existingSecret" in err, err
