"""Start and stop the backend and each target (Caddy, quicproxy variants) on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Clients use this name (resolved to HOST, oha runs with --ipv4): SNI and Host are a name, as in
# production; a numeric Host header trips CRS rule 920350 and would log on every WAF request.
NAME = "localhost"
HERE = Path(__file__).resolve().parent
PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The peer: pinned Caddy release, built by bench/install.sh with `go install` into CADDY_BIN.
CADDY_VERSION = "v2.11.9"
CADDY_BIN = HERE / ".tools" / "bin" / "caddy"
# quicproxy runs on the interpreter the container image ships (Debian bookworm's python3):
# bench/install.sh makes this venv of it, with the project installed editable.
IMAGE_VENV = HERE / ".tools" / "image-python"


@dataclass
class Target:
    """One thing under load. `urls[proto]` is the base URL for that protocol."""

    name: str
    kind: str  # "direct" | "caddy" | "quicproxy"
    workers: int = 1
    waf: str = "off"
    engine: str = "modsecurity"  # WAF engine when waf is not "off": "modsecurity" | "coraza"
    urls: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    note: str = ""
    python: str = ""  # quicproxy targets: the interpreter the proxy runs on
    server_pids: list[int] = field(default_factory=list)  # set when a server is not in procs
    metrics_url: str = ""  # quicproxy's /metrics (plain HTTP port)
    pool: BackendPool | None = None  # proxies: the three backends of the failover row

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def cpu_pids(self) -> list[int]:
        """Roots of the process trees whose CPU counts as the server's: every process the
        target started (the proxy and its workers; the WAF service for qp-waf-service), or
        the backend itself for `direct`."""
        return [p.pid for p in self.procs] + self.server_pids

    @property
    def protocols(self) -> tuple[str, ...]:
        return tuple(self.urls)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on TCP and UDP both (https listeners use the same number for
    QUIC). All n are held while picking, so one call never returns the same port twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(50 * n):
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            held.append(s)
            port = s.getsockname()[1]
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.bind((HOST, port))
            except OSError:
                u.close()
                continue
            held.append(u)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < n:
        raise RuntimeError("no free ports")
    return ports


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group we started, then SIGKILL what is left after 5 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def wait_http(url: str, procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Poll url until it answers 200; fail early if a process died."""
    ctx = ssl._create_unverified_context()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode} (see logs)")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s: {last}")


def wait_tcp(port: int, procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Poll until something accepts TCP connections on HOST:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{procs[0].args[0]} exited early (see logs)")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout:.0f}s")


def _stat_fields(text: str) -> list[str]:
    """The fields of a /proc/<pid>/stat line after `comm` (which may hold spaces and ')'):
    index 0 is field 3 (state), 1 is ppid, 11..14 are utime, stime, cutime, cstime."""
    return text.rsplit(")", 1)[1].split()


def _children(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields((proc / entry / "stat").read_text())[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def proc_tree(pids: list[int] | int, proc: Path = PROC) -> list[int]:
    """pids and all their descendants (worker processes), each once."""
    children = _children(proc)
    seen: list[int] = []
    todo = [pids] if isinstance(pids, int) else list(pids)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def proc_tree_rss_kib(pid: int, proc: Path = PROC) -> int:
    """VmRSS of pid plus all its descendants (worker processes), in KiB."""
    total = 0
    for p in proc_tree(pid, proc):
        try:
            with open(proc / str(p) / "status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def proc_tree_cpu_s(pids: list[int] | int, proc: Path = PROC, tick: int = CLK_TCK) -> float:
    """CPU seconds (user + sys, every thread) used so far by pids and all their descendants,
    plus what their exited-and-reaped children used (cutime + cstime), so a worker that exits
    between two readings moves from one term to the other instead of vanishing."""
    ticks = 0
    for p in proc_tree(pids, proc):
        try:
            f = _stat_fields((proc / str(p) / "stat").read_text())
            ticks += sum(int(x) for x in f[11:15])
        except (OSError, IndexError, ValueError):
            pass  # exited between the listing and the read
    return ticks / tick


def cpu_per_unit(before_s: float, after_s: float, units: float, scale: float = 1e6) -> float:
    """CPU used between two readings per unit of work (per request, per MiB), in µs by
    default. Fails on no work done or a clock going backwards (a wrong process tree)."""
    if units <= 0:
        raise ValueError("no completed work to divide the CPU time by")
    if after_s < before_s:
        raise ValueError(f"CPU time went backwards ({before_s} -> {after_s}): wrong process?")
    return (after_s - before_s) * scale / units


def find_caddy() -> str:
    """$CADDY, else the pinned build bench/install.sh makes (bench/.tools/bin/caddy), else
    whatever `caddy` is on PATH (say which in the results: see caddy_version)."""
    for c in (os.environ.get("CADDY"), str(CADDY_BIN), shutil.which("caddy")):
        if c and Path(c).exists():
            return c
    raise RuntimeError(f"caddy not found: bash bench/install.sh builds Caddy {CADDY_VERSION}")


def caddy_version(exe: str) -> str:
    """The Caddy module version inside the binary. A `go install ...@vX` build prints
    "unknown" for `caddy version`, but its Go build info names the module version."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    try:
        r = subprocess.run([go, "version", "-m", exe], capture_output=True, text=True, timeout=30)
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) >= 3 and f[0] in ("mod", "dep") and f[1] == "github.com/caddyserver/caddy/v2":
                return f"{f[2]} ({exe})"
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        r = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30)
        return f"{(r.stdout.split() or ['?'])[0]} ({exe})"
    except (OSError, subprocess.TimeoutExpired):
        return f"unknown ({exe})"


def quicproxy_cmd() -> list[str] | None:
    """How to run `quicproxy`, or None if its `serve` command is not there yet.

    `QUICPROXY=/path/to/quicproxy` if set; else the one in IMAGE_VENV (the container
    image's interpreter, built by bench/install.sh); else the one beside this Python;
    else `quicproxy` on PATH."""
    if os.environ.get("QUICPROXY"):
        found: list[str] = [os.environ["QUICPROXY"]]
    else:
        found = [
            str(exe)
            for exe in (IMAGE_VENV / "bin" / "quicproxy", Path(sys.executable).parent / "quicproxy")
            if exe.exists()
        ]
        found += [w] if (w := shutil.which("quicproxy")) else []
    for exe in found:
        try:
            r = subprocess.run([exe, "serve", "--help"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return [exe]
    return None


def proxy_python(qp: list[str] | None) -> str:
    """The interpreter `quicproxy` runs on: the venv's python beside it, else this one."""
    if qp:
        beside = Path(qp[0]).parent / "python"
        if beside.exists():
            return str(beside)
    return sys.executable


class BackendPool:
    """Three more backends behind one route (`/fo/`) for the failover row: one of them is
    killed during the load and started again after it."""

    def __init__(self, backend_bin: Path, logs: Path) -> None:
        self.bin, self.logs = backend_bin, logs
        self.ports = free_ports(3)
        self.procs = [self._spawn(i) for i in range(3)]
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_http(f"http://{HOST}:{port}/_gwhealthz", [proc])

    def _spawn(self, i: int) -> subprocess.Popen:
        cmd = [str(self.bin), "-addr", f"{HOST}:{self.ports[i]}"]
        return _spawn(cmd, self.logs / f"pool-{i}.log")

    @property
    def addrs(self) -> list[str]:
        return [f"{HOST}:{port}" for port in self.ports]

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def restore(self, i: int) -> None:
        if self.procs[i].poll() is not None:
            self.procs[i] = self._spawn(i)
            wait_http(f"http://{HOST}:{self.ports[i]}/_gwhealthz", [self.procs[i]])

    def close(self) -> None:
        stop(self.procs)


class Lab:
    """The shared pieces: certificate, backend, logs. Targets are started one at a time."""

    def __init__(self, workdir: Path, cert: Path, key: Path, backend_bin: Path) -> None:
        self.workdir, self.cert, self.key = workdir, cert, key
        self.logs = workdir / "logs"
        (self.backend_port,) = free_ports(1)
        self.backend_url = f"http://{HOST}:{self.backend_port}"
        self.backend = _spawn(
            [str(backend_bin), "-addr", f"{HOST}:{self.backend_port}"], self.logs / "backend.log"
        )
        wait_http(self.backend_url + "/_gwhealthz", [self.backend])
        self.pool = BackendPool(backend_bin, self.logs)
        self.qp = quicproxy_cmd()

    def close(self) -> None:
        self.pool.close()
        stop([self.backend])

    def plan(self, workers: int) -> list[Target]:
        """Every target, in run order; quicproxy ones only when `quicproxy serve` exists."""
        ts = [
            Target("direct", "direct", note="plain HTTP backend: h1 only"),
            Target("caddy", "caddy", workers=0, note="Caddy reverse_proxy, Go, all cores"),
        ]
        if self.qp:
            ts += [
                Target("qp-1w", "quicproxy", 1, "off"),
                Target(f"qp-{workers}w", "quicproxy", workers, "off"),
                Target("qp-waf-inline", "quicproxy", 1, "inline", note="ModSecurity + CRS 3"),
                Target("qp-waf-coraza", "quicproxy", 1, "inline", "coraza", note="Coraza + CRS 4"),
                Target(
                    "waf-peer",
                    "wafpeer",
                    0,
                    "inline",
                    "coraza",
                    note="Go: Coraza's http middleware + httputil + quic-go http3, same CRS 4",
                ),
                Target("qp-waf-service", "quicproxy", 1, "service", note="ModSecurity + CRS 3"),
            ]
        return ts

    def start(self, t: Target) -> None:
        if t.kind == "direct":
            t.urls = {"h1": f"http://{NAME}:{self.backend_port}"}
            t.server_pids = [self.backend.pid]
            return
        port, http_port, waf_port = free_ports(3)
        base = f"https://{NAME}:{port}"
        t.pool = self.pool
        if t.kind == "caddy":
            t.procs = [self._caddy(port, http_port)]
            wait_http(base + "/_gwhealthz", t.procs)
        elif t.kind == "wafpeer":
            t.procs = [self._wafpeer(port)]
            wait_http(base + "/_gwhealthz", t.procs)
        else:
            t.python = proxy_python(self.qp)
            t.procs = self._quicproxy(t, port, http_port, waf_port)
            wait_http(base + "/_gwhealthz", t.procs)
            t.metrics_url = f"http://{HOST}:{http_port}/metrics"
        t.urls = {"h1": base, "h2": base, "h3": base}

    def stop(self, t: Target) -> None:
        stop(list(reversed(t.procs)))
        t.procs = []

    def _caddy(self, port: int, http_port: int) -> subprocess.Popen:
        # Caddy's defaults reach out unless told not to; everything here stays on loopback:
        # admin off (no :2019 listener), auto_https off (the certificate is loaded by hand: no
        # ACME, no internal CA, no HTTP->HTTPS redirect server), skip_install_trust (never
        # touch the system trust store), ocsp_stapling off (no OCSP responder lookups),
        # persist_config off, and the site binds 127.0.0.1 only.
        conf = self.workdir / "Caddyfile"
        conf.write_text(
            "{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n"
            "\tskip_install_trust\n\tocsp_stapling off\n\tgrace_period 1s\n"
            f"\thttp_port {http_port}\n\thttps_port {port}\n\tdefault_sni localhost\n"
            "\tservers {\n\t\tprotocols h1 h2 h3\n\t}\n}\n"
            f"https://{HOST}:{port}, https://localhost:{port} {{\n\tbind {HOST}\n"
            f"\ttls {self.cert} {self.key}\n"
            f"\treverse_proxy /bench.Echo/* h2c://{HOST}:{self.backend_port}\n"
            # the failover row: passive health checks and retries, as quicproxy's defaults
            f"\treverse_proxy /fo/* {' '.join(self.pool.addrs)} {{\n"
            "\t\tlb_policy least_conn\n\t\tlb_retries 2\n"
            "\t\tfail_duration 10s\n\t\tmax_fails 1\n\t}\n"
            f"\treverse_proxy {HOST}:{self.backend_port}\n}}\n"
        )
        env = {
            "XDG_CONFIG_HOME": str(self.workdir / "xdg"),
            "XDG_DATA_HOME": str(self.workdir / "xdg"),
        }
        cmd = [find_caddy(), "run", "--config", str(conf), "--adapter", "caddyfile"]
        return _spawn(cmd, self.logs / "caddy.log", env)

    def _wafpeer(self, port: int) -> subprocess.Popen:
        """The Go WAF peer on ``port`` with the rule set quicproxy's Coraza engine loads
        (its own coraza_directives, run on the proxy's interpreter, default settings)."""
        exe = build_wafpeer(self.workdir / "wafpeer")
        directives = self.workdir / "wafpeer-directives.conf"
        code = (
            "from quicproxy._config import WafConfig\n"
            "from quicproxy.waf._coraza import _version_tuple, coraza_directives, load\n"
            "cfg = WafConfig(mode='inline', engine='coraza')\n"
            "crs = _version_tuple(load(cfg.library).crs_version)\n"
            "print(coraza_directives(cfg, crs))\n"
        )
        text = subprocess.run(
            [proxy_python(self.qp), "-c", code], capture_output=True, text=True, check=True
        ).stdout
        directives.write_text(text)
        cmd = [str(exe), "-addr", f"{HOST}:{port}", "-backend", self.backend_url]
        cmd += ["-cert", str(self.cert), "-key", str(self.key), "-directives", str(directives)]
        return _spawn(cmd, self.logs / "wafpeer.log")

    def _quicproxy(
        self, t: Target, port: int, http_port: int, waf_port: int
    ) -> list[subprocess.Popen]:
        assert self.qp
        procs: list[subprocess.Popen] = []
        routes = self.workdir / "qp-routes.yaml"  # the gRPC row's backend speaks h2c
        pool = ", ".join(f"http://{a}" for a in self.pool.addrs)
        routes.write_text(
            f"routes:\n  - {{path_prefix: /bench.Echo/, backends: [h2c://{HOST}:{self.backend_port}]}}\n"
            f"  - {{path_prefix: /fo/, backends: [{pool}]}}\n"
        )
        cmd = self.qp + [
            "serve",
            "--config",
            str(routes),
            "--backend",
            self.backend_url,
            "--host",
            HOST,
            "--http-port",
            str(http_port),
            "--https-port",
            str(port),
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--workers",
            str(t.workers),
            "--waf",
            t.waf,
            "--waf-engine",
            t.engine,
            "--log-level",
            "warning",
        ]
        if t.waf == "service":
            waf = _spawn(
                self.qp
                + ["waf", "serve", "--host", HOST, "--port", str(waf_port)]
                + ["--waf-engine", t.engine],
                self.logs / f"{t.name}-waf.log",
            )
            wait_tcp(waf_port, [waf])
            cmd += ["--waf-url", f"http://{HOST}:{waf_port}"]
            procs.append(_spawn(cmd, self.logs / f"{t.name}.log"))
            procs.append(waf)  # procs[0] is the proxy: its tree is what RSS measures
        else:
            procs.append(_spawn(cmd, self.logs / f"{t.name}.log"))
        return procs


def build_backend(out: Path) -> Path:
    """Compile bench/backend/main.go (stdlib only) with the local Go toolchain."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        raise RuntimeError("Go toolchain not found: the bare backend is built with `go build`")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = HERE / "backend" / "main.go"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(
            [go, "build", "-o", str(out), str(src)],
            check=True,
            timeout=300,
            env={**os.environ, "GO111MODULE": "off", "CGO_ENABLED": "0"},
        )
    return out


def build_wafpeer(out: Path) -> Path:
    """Compile bench/wafpeer (Coraza + quic-go, modules pinned in its go.sum)."""
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        raise RuntimeError("Go toolchain not found: the WAF peer is built with `go build`")
    src = HERE / "wafpeer"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if not out.exists() or out.stat().st_mtime < newest:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([go, "build", "-o", str(out), "."], check=True, timeout=900, cwd=src)
    return out
