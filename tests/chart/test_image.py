"""Image = global.registry/<repository>:<image.tag or global.tag or appVersion>."""

from __future__ import annotations

import pytest
import yaml

from ._chart import CHART, PROFILES

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def _images(m):
    return {
        c["name"]: c["image"]
        for d in m.docs
        if d["kind"] in ("Deployment", "DaemonSet", "Pod")
        for c in (d["spec"]["template"]["spec"] if d["kind"] != "Pod" else d["spec"])["containers"]
    }


def test_default_image_is_the_published_one_tagged_with_app_version(profile):
    images = _images(profile("default"))
    expected = f"ghcr.io/quic-proxy-waf/quic-proxy-waf:{APP_VERSION}"
    assert images == {"proxy": expected, "waf": expected, "healthz": expected, "http3": expected}


def test_complete_example_uses_its_registry_and_tag(profile):
    images = _images(profile("examples/daemonset-edge-complete"))
    assert images["proxy"] == "ghcr.io/pmh-only/quic-proxy/quic-proxy-waf:v1.1.0"
    assert images["waf"] == "ghcr.io/pmh-only/quic-proxy/quic-proxy-waf:v1.1.0"


def test_image_tag_beats_global_tag(render):
    images = _images(
        render(
            values={
                "global": {"tag": "v2.0.0"},
                "proxy": {"image": {"tag": "v2.0.1"}},
                "waf": {"image": {"repository": "quic-proxy-waf-slim"}},
            }
        )
    )
    assert images["proxy"].endswith("/quic-proxy-waf:v2.0.1")
    assert images["waf"].endswith("/quic-proxy-waf-slim:v2.0.0")


def test_registry_trailing_slash_is_tolerated(render):
    images = _images(render(values={"global": {"registry": "registry.local:5000/edge/"}}))
    assert images["proxy"] == f"registry.local:5000/edge/quic-proxy-waf:{APP_VERSION}"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_pin_published_tags_never_latest(profile, name):
    for image in _images(profile(name)).values():
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest"
        if name != "examples/daemonset-edge-complete":
            assert tag == APP_VERSION, image


def test_pull_policy_and_secrets_reach_every_pod(render):
    m = render(
        values={"global": {"imagePullPolicy": "Always", "imagePullSecrets": [{"name": "regcred"}]}}
    )
    for d in m.docs:
        if d["kind"] in ("Deployment", "DaemonSet", "Pod"):
            spec = d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"]
            assert spec["imagePullSecrets"] == [{"name": "regcred"}], d["metadata"]["name"]
            assert {c["imagePullPolicy"] for c in spec["containers"]} == {"Always"}
