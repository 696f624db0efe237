"""Machine facts printed with every result: cores, CPU, memory, tool versions."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench.targets import CADDY_VERSION, IMAGE_VENV, caddy_version, find_caddy, proxy_python


def _cmd(*args: str) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def _grep(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(oha: str, qp: list[str] | None) -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "cpu": _grep("/proc/cpuinfo", "model name"),
        "memory": _grep("/proc/meminfo", "MemTotal"),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "kernel": platform.release(),
        "os": _os(),
        "python (quicproxy)": _interpreter(qp),
        "python (bench, clients)": f"{platform.python_version()} ({sys.executable})",
        "oha": _cmd(oha, "--version"),
        "caddy": _caddy(),
        "go (backend)": _cmd("go" if _has("go") else "/usr/local/go/bin/go", "version"),
        "aioquic": _pkg("aioquic"),
        "qh3": _pkg("qh3"),
        "quicproxy": (
            f"{_pkg('quic-proxy-waf')} @ {_cmd('git', '-C', str(repo), 'rev-parse', 'HEAD')[:10]}"
            if qp
            else "not available (no `quicproxy serve`): quicproxy targets skipped"
        ),
    }


def _interpreter(qp: list[str] | None) -> str:
    """Version and real path of the interpreter the quicproxy targets run on."""
    if not qp:
        return "-"
    py = proxy_python(qp)
    code = "import os, sys; print(sys.version.split()[0], os.path.realpath(sys.executable))"
    got = _cmd(py, "-c", code).split()
    if len(got) != 2:
        return f"unknown ({py})"
    version, real = got
    where = " (bench/install.sh's venv of it)" if str(IMAGE_VENV) in py else ""
    return f"{version}, {real}{where}"


def _caddy() -> str:
    try:
        exe = find_caddy()
    except RuntimeError as e:
        return str(e)
    got = caddy_version(exe)  # "v2.11.9 (/path/to/caddy)"
    if got.startswith(CADDY_VERSION + " "):
        return got + f", the pinned release (bench/install.sh: go install ...@{CADDY_VERSION})"
    return got + f", NOT the pinned {CADDY_VERSION} (bash bench/install.sh builds it)"


def _has(exe: str) -> bool:
    return any((Path(d) / exe).exists() for d in os.environ.get("PATH", "").split(":") if d)


def _os() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()
