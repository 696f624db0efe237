"""`labels` and `annotations` reach every object and every pod; selectors stay stable."""

from __future__ import annotations

import pytest

from ._chart import CHART, PROFILES

EXTRA = {"labels": {"team": "edge"}, "annotations": {"owner": "edge-team"}}


def _pod_templates(m):
    for d in m.docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["metadata"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["metadata"]


@pytest.mark.parametrize("files", [[], [CHART / "values-daemonset.yaml"]], ids=["deploy", "ds"])
def test_labels_and_annotations_reach_every_object_and_pod(render, files):
    m = render(*files, values={**EXTRA, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert len(m.docs) >= 8
    for d in m.docs:
        meta, name = d["metadata"], f"{d['kind']}/{d['metadata']['name']}"
        assert meta["labels"]["team"] == "edge", name
        assert meta["annotations"]["owner"] == "edge-team", name
    for name, meta in _pod_templates(m):
        assert meta["labels"]["team"] == "edge", name
        assert meta["annotations"]["owner"] == "edge-team", name


def test_user_labels_stay_out_of_selectors(render):
    m = render(values=EXTRA)
    for d in m.docs:
        selector = d.get("spec", {}).get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert "team" not in selector, d["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_selectors_match_their_pods(profile, name):
    m = profile(name)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in m.docs
        if d["kind"] in ("Deployment", "DaemonSet")
    }
    for d in m.docs:
        if d["kind"] in ("Deployment", "DaemonSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            assert pods[d["metadata"]["name"]].items() >= sel.items()
        if d["kind"] in ("Service", "PodDisruptionBudget"):
            sel = d["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            matching = [n for n, labels in pods.items() if labels.items() >= sel.items()]
            assert len(matching) == 1, (d["metadata"]["name"], matching)


def test_service_annotations_reach_the_proxy_service_only(render):
    nlb = {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}
    m = render(values={"service": {"annotations": nlb}})
    assert m.get("Service", "-proxy")["metadata"]["annotations"] == nlb
    assert "annotations" not in m.get("Service", "-waf")["metadata"]


def test_pod_annotations_and_labels_reach_their_pods_only(render):
    m = render(
        values={
            "proxy": {"podAnnotations": {"p": "1"}, "podLabels": {"pl": "1"}},
            "waf": {"podAnnotations": {"w": "1"}, "podLabels": {"wl": "1"}},
        }
    )
    proxy = m.proxy_pod()["metadata"]
    waf = m.get("Deployment", "-waf")["spec"]["template"]["metadata"]
    assert proxy["annotations"]["p"] == "1" and "w" not in proxy["annotations"]
    assert proxy["labels"]["pl"] == "1" and "wl" not in proxy["labels"]
    assert waf["annotations"]["w"] == "1" and "p" not in waf["annotations"]
    assert set(waf["annotations"]) == {"w", "checksum/config"} and waf["labels"]["wl"] == "1"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_no_namespace_object_so_helm_install_n_works(profile, name):
    m = profile(name)
    assert "Namespace" not in m.kinds()
    assert all(d["metadata"]["namespace"] == "edge-ns" for d in m.docs)
