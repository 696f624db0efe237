"""Image tests: the container image built from the working tree, run with testcontainers.

    tox -e image                              # builds the image, then runs these tests
    QUICPROXY_IMAGE=ref tox -e image          # test an image that is already built

The image is built by conformance/image/build-image.sh (the script the conformance suite
uses).  Its base: QUICPROXY_BASE_IMAGE, else "debootstrap" (conformance/image/build-base.sh
makes one: these machines reach no image registry, and the README's test command must pass
on them with or without CI=true); QUICPROXY_BASE_IMAGE=python:3.11-slim-bookworm takes the
Dockerfile's default from a registry.  As root with dockerd installed and no engine
running, conformance/cluster/ensure-docker.sh starts one.  Without Docker the tests fail under
CI=true and are skipped otherwise, with the reason.  Ryuk (testcontainers' reaper) needs an
image from a registry: TESTCONTAINERS_RYUK_DISABLED=true is set, containers are removed by the
fixtures themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
IMAGE_DIR = ROOT / "conformance" / "image"
CLUSTER_DIR = ROOT / "conformance" / "cluster"
CACHE = Path(os.environ.get("QUICPROXY_CACHE", "/var/cache/quicproxy-conformance"))
_t0 = time.monotonic()
_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def progress(msg: str) -> None:
    """A progress line now, even while pytest captures output (the first build takes minutes)."""
    line = f"[image {time.strftime('%H:%M:%S')} +{time.monotonic() - _t0:4.0f}s] {msg}\n"
    capman = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capman is None:
        sys.stderr.write(line)
        return
    with capman.global_and_fixture_disabled():
        sys.stderr.write(line)
        sys.stderr.flush()


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _stream(cmd: list[str], env: dict[str, str]) -> str:
    """Run cmd, stderr lines to progress as they come; return stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    tail: list[str] = []
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-30:]
        progress("  " + line.rstrip())
    out = proc.stdout.read()
    if proc.wait():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))
    return out


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest) -> None:
    if not shutil.which("docker"):
        unavailable("docker CLI not found: install Docker (Debian: apt-get install docker.io)")
    if _docker_answers():
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        unavailable("no Docker engine answers `docker info`: start Docker")
    out = _stream(["bash", str(CLUSTER_DIR / "ensure-docker.sh")], dict(os.environ))
    if "started" in out:
        pidfile = CACHE / "run" / "dockerd.pid"

        def stop() -> None:
            try:
                os.kill(int(pidfile.read_text()), 15)
            except (OSError, ValueError):
                pass

        request.addfinalizer(stop)


@pytest.fixture(scope="session")
def image(docker_engine: None) -> str:
    ref = os.environ.get("QUICPROXY_IMAGE")
    if ref:
        progress(f"using {ref} as given")
        return ref
    env = dict(os.environ)
    if not env.get("QUICPROXY_BASE_IMAGE"):
        env["QUICPROXY_BASE_IMAGE"] = "debootstrap"
    if env.get("QUICPROXY_BASE_IMAGE") == "debootstrap" and not shutil.which("debootstrap"):
        unavailable("a debootstrap base image needs debootstrap: apt-get install debootstrap")
    t = time.monotonic()
    progress("building the image from the working tree (conformance/image/build-image.sh)")
    ref = _stream(["bash", str(IMAGE_DIR / "build-image.sh")], env).split()[-2]
    progress(f"image {ref} ready ({time.monotonic() - t:.0f}s)")
    return ref


@pytest.fixture(scope="session")
def network(docker_engine: None) -> Iterator[object]:
    from testcontainers.core.network import Network

    with Network() as net:
        yield net
