"""Chart tests run the real ``helm`` binary on charts/quic-proxy-waf.

helm is looked up in PATH, then in $(go env GOPATH)/bin. Without it the tests
fail when the CI environment variable is set and are skipped otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._chart import (
    HELM_INSTALL,
    PROFILES,
    HelmError,
    Manifests,
    find_helm,
    helm_template,
    random_made,
)


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        reason = f"helm not found in PATH or $(go env GOPATH)/bin; install: {HELM_INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., Manifests]:
    """render(*value_files, values={...}) -> Manifests; fails on a helm error."""

    def _render(*files: Path | str, values: dict[str, Any] | None = None) -> Manifests:
        out = helm_template(helm, files, values)
        if out.returncode != 0:
            raise HelmError(out.stderr.strip())
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        return Manifests(docs, random_made(docs))

    return _render


@pytest.fixture(scope="session")
def render_error(helm: str) -> Callable[..., str]:
    """render_error(*value_files, values={...}) -> helm's error text; fails if helm succeeds."""

    def _render_error(*files: Path | str, values: dict[str, Any] | None = None) -> str:
        out = helm_template(helm, files, values)
        assert out.returncode != 0, f"helm accepted the values:\n{out.stdout[:2000]}"
        return out.stderr

    return _render_error


@pytest.fixture(scope="session")
def profile(render: Callable[..., Manifests]) -> Callable[[str], Manifests]:
    def _profile(name: str) -> Manifests:
        return render(*PROFILES[name])

    return _profile
