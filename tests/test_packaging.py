"""`pip install .` builds the Coraza engine into the wheel when Go is on PATH, and still
installs (pure Python, with one line saying what to do) when it is not (setup.py).
Real pip, real setuptools, real Go: each wheel is built from a copy of the sources
without a built engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import need_tool

ROOT = Path(__file__).resolve().parent.parent
ENGINE = "quicproxy/waf/coraza/libquicproxy-coraza.so"


def _sources(dest: Path) -> Path:
    """The package's sources as a fresh checkout has them (no engine, no caches)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "quicproxy",
        src / "quicproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.h"),
    )
    return src


def _wheel(src: Path, out: Path, path: str) -> tuple[Path, str]:
    env = {**os.environ, "PATH": path}
    env.pop("QUICPROXY_BUILD_CORAZA", None)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = list(out.glob("quic_proxy_waf-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], done.stdout + done.stderr


def test_wheel_built_with_go_carries_the_coraza_engine(tmp_path: Path) -> None:
    go = need_tool("go", "install Go >= 1.25 (or run bash .ci/setup)")
    path = os.pathsep.join([str(Path(go).parent), os.environ.get("PATH", "")])
    wheel, _ = _wheel(_sources(tmp_path), tmp_path / "out", path)
    assert "-py3-none-linux" in wheel.name or "-py3-none-manylinux" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(ENGINE)
        head = z.read(ENGINE)[:4]
    assert info.file_size > 1 << 20 and head == b"\x7fELF"


def test_wheel_built_without_go_is_pure_and_says_what_to_do(tmp_path: Path) -> None:
    # PATH without any Go: only the directories of the tools pip needs here
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    keep = [d for d in keep if not (Path(d) / "go").exists()]
    wheel, log = _wheel(_sources(tmp_path), tmp_path / "out", os.pathsep.join(keep))
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        assert ENGINE not in z.namelist()
        assert "quicproxy/waf/coraza/main.go" in z.namelist() or any(
            n.startswith("quicproxy/waf/coraza/") and n.endswith(".go") for n in z.namelist()
        )
        # The detection rules both engines load by default (waf.extra_detection).
        assert "quicproxy/waf/rules/quicproxy-detection.conf" in z.namelist()
    assert "Go not found, installing without the Coraza WAF engine" in log
    assert "python -m quicproxy.waf.build" in log
