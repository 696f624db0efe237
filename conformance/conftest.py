"""Conformance suite: installs every values profile of charts/quic-proxy-waf on a real cluster.

    tox -e conformance                       # provider from QUICPROXY_CLUSTER (default auto)
    QUICPROXY_CLUSTER=local tox -e conformance
    pytest conformance --cluster=kind -k daemonset

Options / environment:
  --cluster / QUICPROXY_CLUSTER       local | kind | k3d | existing | auto (default)
  --profile / QUICPROXY_PROFILES      comma-separated subset of profiles
  --kubeconfig / KUBECONFIG           an existing cluster: pytest-helm-charts' option (the
                                      package is a test dependency; its kube_cluster fixture
                                      connects to the cluster under test, whatever the provider)
  QUICPROXY_IMAGE                     use this image instead of building one from the tree
  QUICPROXY_BASE_IMAGE                Dockerfile BASE_IMAGE; "debootstrap" builds one locally
                                      (the default for the local provider, which has no registry)
  QUICPROXY_KEEP_CLUSTER=1            leave a cluster this run started running
  QUICPROXY_CACHE                     cache dir (default /var/cache/quicproxy-conformance)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._cluster import IMAGE_DIR, Provider, run_streamed, select
from ._kube import Kube

ROOT = Path(__file__).resolve().parent.parent
_config: pytest.Config | None = None
_t0 = time.monotonic()


def progress(msg: str) -> None:
    """Print a progress line now, even while pytest captures output."""
    line = f"[conformance {time.strftime('%H:%M:%S')} +{time.monotonic() - _t0:5.0f}s] {msg}\n"
    capman = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capman is not None:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(line)
            sys.stderr.flush()
    else:
        sys.stderr.write(line)
        sys.stderr.flush()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("conformance")
    g.addoption(
        "--cluster",
        default=os.environ.get("QUICPROXY_CLUSTER", "auto"),
        help="cluster provider: local, kind, k3d, existing, auto (env QUICPROXY_CLUSTER)",
    )
    g.addoption(
        "--profile",
        default=os.environ.get("QUICPROXY_PROFILES", ""),
        help="comma-separated values profiles to run (default all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


@pytest.fixture(scope="session")
def provider(request: pytest.FixtureRequest) -> Iterator[Provider]:
    name = request.config.getoption("--cluster")
    # pytest-helm-charts' --kubeconfig: an existing cluster, unless another provider is named
    kube_config = request.config.getoption("kubeconfig", None)
    if kube_config and name == "auto":
        name = "existing"
    prov, why = select(name, kube_config)
    if prov is None and name == "auto":
        if os.environ.get("CI"):  # CI installs what the local provider needs: never skip there
            pytest.fail(f"no usable cluster provider in CI: {why}", pytrace=False)
        pytest.skip(why)
    if prov is None or why:
        pytest.fail(f"cluster provider {name!r} is not usable: {why}", pytrace=False)
    assert prov is not None
    t = time.monotonic()
    progress(f"cluster provider: {prov.name}; bringing the cluster up")
    try:
        prov.up(lambda line: progress("  " + line))
    except Exception:
        prov.down(lambda line: progress("  " + line))
        raise
    progress(f"cluster up ({time.monotonic() - t:.0f}s), KUBECONFIG={prov.kubeconfig}")
    yield prov
    t = time.monotonic()
    prov.down(lambda line: progress("  " + line))
    if prov.started_here:
        progress(f"cluster down ({time.monotonic() - t:.0f}s)")


@pytest.fixture(scope="session")
def kube(provider: Provider) -> Kube:
    k = Kube(provider, progress)
    # Edge nodes: every real node carries the label the edge example selects.  On an
    # existing cluster only when asked (QUICPROXY_LABEL_EDGE_NODES=1): it is not ours.
    if provider.name == "existing" and os.environ.get("QUICPROXY_LABEL_EDGE_NODES") != "1":
        return k
    real = [
        node
        for node in k.items("nodes")
        if node["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") != "fake"
    ]
    # With three real nodes or more, the last stays unlabelled: a real node on which the
    # edge profiles must run no pod (kwok's fake nodes check the same without a kubelet).
    spare = real[-1]["metadata"]["name"] if len(real) >= 3 else None
    for node in real:
        if node["metadata"]["name"] != spare:
            k.label("nodes", node["metadata"]["name"], {"node-role.kubernetes.io/edge": "true"})
    return k


@pytest.fixture(scope="session")
def image(provider: Provider, request: pytest.FixtureRequest) -> str:
    """Ref (<registry>/<repository>:<tag>) of the image under test, loaded into the cluster."""
    ref = os.environ.get("QUICPROXY_IMAGE")
    if ref:
        progress(f"image: using {ref} as given")
        return ref
    env = provider.tools_env()
    if provider.registry_less and not env.get("QUICPROXY_BASE_IMAGE"):
        env["QUICPROXY_BASE_IMAGE"] = "debootstrap"
    t = time.monotonic()
    started = run_streamed(
        ["bash", str(Path(__file__).parent / "cluster" / "ensure-docker.sh")],
        lambda line: progress("  " + line),
        env,
    )
    if "started" in started:
        pidfile = (
            Path(env.get("QUICPROXY_CACHE", "/var/cache/quicproxy-conformance"))
            / "run"
            / "dockerd.pid"
        )

        def stop_dockerd() -> None:
            try:
                pid = int(pidfile.read_text())
                os.kill(pid, 15)
                progress(f"stopped the dockerd this run started (pid {pid})")
            except (OSError, ValueError):
                pass

        request.addfinalizer(stop_dockerd)
    progress("building the image from the working tree")
    out = run_streamed(
        ["bash", str(IMAGE_DIR / "build-image.sh")], lambda line: progress("  " + line), env
    ).split()
    ref, tar = out[-2], out[-1]
    progress(f"image built: {ref} ({time.monotonic() - t:.0f}s); loading into the cluster")
    t = time.monotonic()
    provider.load_image(ref, tar, lambda line: progress("  " + line))
    progress(f"image loaded ({time.monotonic() - t:.0f}s)")
    return ref


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each profile's checks together, in definition order (install first, uninstall
    last).  Checks are generated only for the profiles they apply to, so their module-scoped
    parameter indices differ, and pytest groups by index.  A check whose every selected
    profile was filtered out (--profile subset) is dropped, not skipped as an empty set."""
    mine = [
        i
        for i in items
        if getattr(i, "module", None)
        and i.module.__name__.endswith("test_profiles")
        and isinstance(i, pytest.Function)
    ]
    if not mine:
        return
    order = {p.name: n for n, p in enumerate(mine[0].module.PROFILES)}
    empty = [i for i in mine if getattr(i.callspec.params.get("profile"), "files", None) is None]
    if empty:
        config.hook.pytest_deselected(items=empty)
    keep = [i for i in mine if i not in empty]
    keep.sort(
        key=lambda i: (order[i.callspec.params["profile"].name], i.function.__code__.co_firstlineno)
    )
    first = items.index(mine[0])
    rest = [i for i in items if i not in mine]
    items[:] = rest[:first] + keep + rest[first:]


@pytest.fixture(scope="module")
def kube_config(provider: Provider) -> str:
    """pytest-helm-charts' ``kube_config`` fixture, for every provider: the kubeconfig of the
    cluster under test, so the package's own ``kube_cluster`` fixture (an ExistingCluster
    with a pykube client) connects to the cluster this run brought up, or to the one
    ``--kubeconfig`` / ``KUBECONFIG`` names."""
    return provider.kubeconfig


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"conformance: cluster provider {config.getoption('--cluster')!r}"]
