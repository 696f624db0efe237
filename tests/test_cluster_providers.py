"""The commands the conformance suite's kind and k3d providers run, and how `auto` picks.

k3d cannot be run on CI machines (no k3s image without a registry): these tests pin the
commands it builds.  kind runs in CI (QUICPROXY_CLUSTER=kind, conformance/README.md).
"""

from __future__ import annotations

import pytest
import yaml

from conformance import _cluster


def test_k3d_create_maps_every_host_port_tcp_and_udp_on_loopback() -> None:
    cmd = _cluster.K3dProvider().create_cmd()
    assert cmd[:4] == ["k3d", "cluster", "create", _cluster.K3dProvider.cluster]
    ports = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-p"]
    assert ports == [
        "127.0.0.1:80:80/tcp@server:0",
        "127.0.0.1:443:443/tcp@server:0",
        "127.0.0.1:443:443/udp@server:0",
        "127.0.0.1:8080:8080/tcp@server:0",
        "127.0.0.1:8443:8443/tcp@server:0",
        "127.0.0.1:8443:8443/udp@server:0",
    ]
    args = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--k3s-arg"]
    assert args == ["--disable=traefik@server:0", "--disable=servicelb@server:0"]
    assert cmd[cmd.index("--timeout") + 1] == "180s" and "--wait" in cmd


def test_k3d_load_and_delete_commands() -> None:
    p = _cluster.K3dProvider()
    assert p.load_cmd("/tmp/qp.tar") == ["k3d", "image", "import", "/tmp/qp.tar", "-c", p.cluster]
    assert p.delete_cmd() == ["k3d", "cluster", "delete", p.cluster]


def test_kind_config_maps_udp_443_for_host_port_http3() -> None:
    cfg = yaml.safe_load(_cluster.kind_config())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (node,) = cfg["nodes"]
    maps = {(m["hostPort"], m["protocol"]): m for m in node["extraPortMappings"]}
    assert set(maps) == set(_cluster.HOST_PORTS)
    assert all(m["containerPort"] == m["hostPort"] for m in maps.values())
    assert {m["listenAddress"] for m in maps.values()} == {"127.0.0.1"}


def test_kind_config_with_workers_maps_host_ports_on_the_control_plane_only() -> None:
    cfg = yaml.safe_load(_cluster.kind_config(nodes=3))
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    assert cfg["nodes"][0]["extraPortMappings"]
    assert all("extraPortMappings" not in n for n in cfg["nodes"][1:])


def test_kind_reaches_workers_on_their_own_address(monkeypatch) -> None:
    monkeypatch.setenv("QUICPROXY_KIND_NODES", "3")
    p = _cluster.KindProvider()
    assert p.nodes == 3
    p.control_plane_ip = "172.18.0.2"
    assert p.host_port_address("172.18.0.2") == "127.0.0.1"
    assert p.host_port_address("172.18.0.3") == "172.18.0.3"


def test_kind_commands(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("QUICPROXY_KIND_NODE_IMAGE", "default")
    p = _cluster.KindProvider()
    assert not p.registry_less and p.node_image == "", "kind's own node image, as asked"
    create = p.create_cmd("/tmp/kind.yaml")
    assert create[1:] == [
        "create",
        "cluster",
        "--name",
        p.cluster,
        "--config",
        "/tmp/kind.yaml",
        "--wait",
        "180s",
    ]
    built = p.create_cmd("/tmp/kind.yaml", "quicproxy.local/kind-node:v1.34.4")
    assert built[built.index("--image") + 1] == "quicproxy.local/kind-node:v1.34.4"
    # the chart README's install step
    assert p.load_cmd("quicproxy.local/quic-proxy-waf:c-1")[1:] == [
        "load",
        "docker-image",
        "quicproxy.local/quic-proxy-waf:c-1",
        "--name",
        p.cluster,
    ]
    assert p.host_port_address("10.0.0.5") == "10.0.0.5"  # a worker: its own address
    p.control_plane_ip = "10.0.0.5"
    assert p.host_port_address("10.0.0.5") == "127.0.0.1"  # the README port mapping


@pytest.mark.parametrize("ci", ["true", None])
def test_kind_builds_its_node_image_unless_told_otherwise(monkeypatch, ci) -> None:
    """With or without CI=true: the README's test command must pass on a machine that
    reaches no image registry."""
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("QUICPROXY_KIND_NODE_IMAGE", raising=False)
    assert _cluster.KindProvider().registry_less
    monkeypatch.setenv("QUICPROXY_KIND_NODE_IMAGE", "kindest/node:v1.34.0")
    given = _cluster.KindProvider()
    assert not given.registry_less and given.node_image == "kindest/node:v1.34.0"


def test_auto_ignores_a_kind_that_is_not_on_path(monkeypatch, tmp_path) -> None:
    """kind installed by the suite into its cache must not make `auto` choose kind (CI's
    default run stays on `local`); an explicit --cluster=kind uses it."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "kind").write_text("#!/bin/sh\n")
    monkeypatch.setattr(_cluster, "CACHE", tmp_path)
    monkeypatch.setattr(_cluster, "_ok", lambda cmd, timeout=20: True)  # "docker info" answers
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("QUICPROXY_KIND_NODE_IMAGE", "default")  # kind's own: no Go needed
    chosen, _ = _cluster.select("auto")
    assert chosen is None or chosen.name != "kind"
    explicit, why = _cluster.select("kind")
    assert explicit is not None and explicit.name == "kind" and not why


def test_kind_config_pins_the_etcd_tag_of_a_locally_built_node_image() -> None:
    assert "kubeadmConfigPatches" not in _cluster.kind_config()
    cfg = yaml.safe_load(_cluster.kind_config("3.6.4-0"))
    (patch,) = cfg["kubeadmConfigPatches"]
    assert yaml.safe_load(patch) == {
        "kind": "ClusterConfiguration",
        "etcd": {"local": {"imageTag": "3.6.4-0"}},
    }
