"""`helm lint --strict` passes on every values profile."""

from __future__ import annotations

import subprocess

import pytest

from ._chart import CHART, KUBE_VERSION, NAMESPACE, PROFILES


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_helm_lint_strict_passes_on_profile(helm: str, name: str) -> None:
    args = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBE_VERSION]
    for f in PROFILES[name]:
        args += ["-f", str(f)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_every_documented_profile_exists() -> None:
    expected = {
        "default",
        "daemonset",
        "examples/daemonset-edge-complete",
        "examples/daemonset-no-hostports",
        "examples/custom-ports",
        "examples/waf-disabled",
    }
    assert expected <= set(PROFILES), sorted(PROFILES)
