"""Every profile renders objects that the Kubernetes OpenAPI schemas accept,
validated offline and strictly (unknown fields rejected)."""

from __future__ import annotations

import kubernetes_validate
import pytest

from ._chart import PROFILES

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ["1.26.0", "1.31.0"]
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")

VARIANTS = {
    "tls-secret": {"proxy": {"tls": {"secretName": "edge-tls"}}},
    "tls-secret-split-dirs": {
        "proxy": {
            "tls": {
                "secretName": "tls-certificate",
                "certFile": "/etc/ssl/certs/tls.crt",
                "keyFile": "/etc/ssl/private/tls.key",
            }
        }
    },
    "everything-on": {
        "metrics": {"serviceMonitor": {"enabled": True}},
        "serviceAccount": {"annotations": {"example.com/role": "edge"}},
        "service": {"externalTrafficPolicy": "Local", "labels": {"tier": "edge"}},
        "proxy": {
            "env": [{"name": "WAF_FAIL", "value": "open"}],
            "envFrom": [{"configMapRef": {"name": "extra"}}],
            "podAnnotations": {"a": "b"},
            "priorityClassName": "system-node-critical",
            "extraArgs": ["--workers", "2"],
        },
        "global": {"imagePullSecrets": [{"name": "regcred"}]},
        "networkPolicy": {
            "wafExtraFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "proxyExtraEgress": [{"ports": [{"port": 9090, "protocol": "TCP"}]}],
        },
        "labels": {"team": "edge"},
        "annotations": {"owner": "edge-team"},
    },
    "nodeport": {"service": {"type": "NodePort"}},
    "waf-plugins-audit": {
        "waf": {
            "plugins": {"files": {"app-before.conf": "# rules\n", "app-config.conf": "#\n"}},
            "audit": {"log": "/tmp/waf-audit.log", "mask": ["cookie:*"]},
        },
    },
    "inline-waf-plugins-configmap": {
        "waf": {"enabled": False, "plugins": {"configMap": "edge-plugins"}},
        "proxy": {
            "config": {
                "routes": [
                    {
                        "path_prefix": "/api",
                        "backends": ["http://api:80"],
                        "waf": {"mode": "detect", "body_limit": 4096},
                    }
                ]
            }
        },
    },
}


def _validate(docs: list[dict], version: str) -> None:
    assert docs, "nothing rendered"
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}"
            ) from None


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_objects_match_kubernetes_schema(profile, name: str, version: str) -> None:
    _validate(profile(name).docs, version)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_optional_features_match_kubernetes_schema(render, variant: str, version: str) -> None:
    _validate(render(values=VARIANTS[variant]).docs, version)


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards the check itself: a misplaced field must not pass."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "hostPort": 80}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)
