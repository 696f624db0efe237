"""Least privilege: non-root where possible, root + NET_BIND_SERVICE only where
host networking forces binding below 1024."""

from __future__ import annotations

import pytest

from ._chart import CHART, PROFILES, container


def _pods(m):
    for d in m.docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]


def _is_root(sc):
    return sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_container_is_locked_down(profile, name):
    for pod_name, spec in _pods(profile(name)):
        assert spec["automountServiceAccountToken"] is False, pod_name
        pod_seccomp = spec.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for c in spec["containers"]:
            sc = c["securityContext"]
            where = f"{pod_name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert not sc.get("privileged"), where
            seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
            assert seccomp == "RuntimeDefault", where


@pytest.mark.parametrize(
    "name",
    [
        "default",
        "examples/daemonset-no-hostports",
        "examples/custom-ports",
        "examples/waf-disabled",
    ],
)
def test_proxy_runs_as_non_root_without_privileged_ports(profile, name):
    sc = profile(name).proxy_container()["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert "add" not in sc["capabilities"]


def test_host_ports_without_host_network_stay_non_root(render):
    m = render(CHART / "values-daemonset.yaml", values={"daemonset": {"hostNetwork": False}})
    sc = m.proxy_container()["securityContext"]
    assert sc["runAsNonRoot"] is True and "add" not in sc["capabilities"]


@pytest.mark.parametrize("name", ["daemonset", "examples/daemonset-edge-complete"])
def test_host_network_on_port_80_runs_root_with_only_net_bind_service(profile, name):
    m = profile(name)
    sc = m.proxy_container()["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}
    # the WAF never needs it
    waf = container(m.get("Deployment", "-waf")["spec"]["template"], "waf")
    assert waf["securityContext"]["runAsNonRoot"] is True
    assert "add" not in waf["securityContext"]["capabilities"]


def test_seed_root_snippet_forces_root(render):
    sc = render(
        values={"securityContext": {"runAsNonRoot": False, "runAsUser": 0}}
    ).proxy_container()["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_seed_capabilities_snippet_is_applied(render):
    sc = render(
        values={"securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}}
    ).proxy_container()["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}


def test_run_as_user_zero_alone_is_not_contradicted(render):
    sc = render(values={"securityContext": {"runAsUser": 0}}).proxy_container()["securityContext"]
    assert sc["runAsNonRoot"] is False


def test_writable_paths_are_empty_dirs(profile):
    pod = profile("default").proxy_pod()
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(pod, "proxy")["volumeMounts"]}
    for path in ("/tmp", "/var/run/quicproxy/tls"):
        mount = mounts[path]
        assert not mount.get("readOnly"), path
        assert volumes[mount["name"]] == {"name": mount["name"], "emptyDir": {}}


def test_waf_security_context_can_be_extended(render):
    m = render(values={"waf": {"securityContext": {"runAsUser": 1000}}})
    sc = container(m.get("Deployment", "-waf")["spec"]["template"], "waf")["securityContext"]
    assert sc["runAsUser"] == 1000 and sc["capabilities"]["drop"] == ["ALL"]
