"""The workloads. Each returns {figure_key: value}; oha is the load generator everywhere.

How oha is driven (same for every target and protocol): oha 1.16.0 on HTTP/3 waits for the
server to close each connection after its GOAWAY, i.e. for the QUIC idle timeout (30 s) before
it prints anything. So every run uses oha's rate-limited path (`-q`), which prints the results
it has on SIGINT, with `--output-format csv` (one row per completed request: start, connect
time, duration, bytes, status). The harness sends SIGINT after the measured window and counts
only requests that completed inside it. For the request-rate tests the rate cap (`max_rate`) is
far above what any target reaches here, so oha runs closed-loop at the given concurrency.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench import scrape
from bench.targets import HOST, NAME, Target, cpu_per_unit, proc_tree_cpu_s, proc_tree_rss_kib

OHA_VERSION = "1.16.0"
MIB = 1024 * 1024
BIG = 10 * MIB  # the "10 MB" body: backend /10m and the upload size


@dataclass
class Settings:
    duration: float = 8.0  # seconds per measurement window
    conc: int = 64  # connections for the 1 KiB request-rate test
    max_rate: float = 100_000.0  # oha -q cap for "as fast as possible" runs
    rate: float = 100.0  # requests/s for the latency test, below every target's saturation
    lat_conc: int = 16
    big_protos: tuple[str, ...] = ("h2", "h3")
    lat_protos: tuple[str, ...] = ("h1", "h2", "h3")
    burst: int = 64  # simultaneous new h3 connections in the handshake test
    bursts: int = 5  # handshake bursts per run; the figure is their median
    idle_conns: int = 1000
    churn_conns: int = 10_000  # TLS connections opened, used once and closed (memory after)
    churn_conc: int = 64
    warm: float = 1.0  # seconds of warm-up per protocol (and settle time after idle memory)
    aioquic_upload: bool = True  # the h3 upload row by aioquic's client (see upload_aioquic)
    ws_conns: int = 16  # WebSocket connections in the echo test

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            duration=2.0,
            big_protos=("h3",),
            lat_protos=("h3",),
            idle_conns=100,
            churn_conns=500,
            warm=0.5,
            aioquic_upload=False,
            bursts=2,
        )


@dataclass
class Figure:
    key: str  # "<workload>/<proto>"
    label: str
    unit: str
    better: str  # "higher" | "lower"


FIGURES = {
    f.key: f
    for f in [
        *(
            Figure(f"rps_1k/{p}", f"1 KiB req/s, c=64, {p}", "req/s", "higher")
            for p in ("h1", "h2", "h3")
        ),
        *(
            Figure(f"lat_{q}/{p}", f"latency {q} at fixed rate, {p}", "ms", "lower")
            for p in ("h1", "h2", "h3")
            for q in ("p50", "p99")
        ),
        *(
            Figure(f"{w}_10m/{p}", f"10 MiB {name}, 1 stream, {p}", "MiB/s", "higher")
            for w, name in (("dl", "download"), ("ul", "upload"))
            for p in ("h1", "h2", "h3")
        ),
        *(
            Figure(f"cpu_1k/{p}", f"server CPU per 1 KiB request, c=64, {p}", "µs/req", "lower")
            for p in ("h1", "h2", "h3")
        ),
        *(
            Figure(f"cpu_{w}_10m/{p}", f"server CPU per MiB, 10 MiB {name}, {p}", "µs/MiB", "lower")
            for w, name in (("dl", "download"), ("ul", "upload"))
            for p in ("h1", "h2", "h3")
        ),
        Figure("ul_10m_aq/h3", "10 MiB upload, 1 stream, h3, aioquic client", "MiB/s", "higher"),
        Figure("ws_echo/h1", "WebSocket echo, 1 KiB messages, c=16, h1", "msg/s", "higher"),
        Figure("ws_p50/h1", "WebSocket echo round trip p50, c=16, h1", "ms", "lower"),
        Figure("ws_p99/h1", "WebSocket echo round trip p99, c=16, h1", "ms", "lower"),
        Figure("cpu_ws/h1", "server CPU per WebSocket message echoed, h1", "µs/msg", "lower"),
        Figure(
            "grpc_unary/h2", "gRPC unary calls/s, 1 KiB, c=16, h2 (h2c backend)", "call/s", "higher"
        ),
        Figure("grpc_p50/h2", "gRPC unary latency p50, c=16, h2", "ms", "lower"),
        Figure("grpc_p99/h2", "gRPC unary latency p99, c=16, h2", "ms", "lower"),
        Figure("cpu_grpc/h2", "server CPU per gRPC unary call, h2", "µs/call", "lower"),
        Figure("failover/h2", "GET req/s, 3 backends, 1 killed, c=16, h2", "req/s", "higher"),
        Figure("failover_err/h2", "failed requests, 3 backends, 1 killed, h2", "req", "lower"),
        Figure("handshake/h3", "new h3 connections/s", "conn/s", "higher"),
        Figure("handshake_slow/h3", "new h3 connections slower than 0.5 s", "%", "lower"),
        Figure("rss_base/h3", "RSS at start", "MiB", "lower"),
        Figure("rss_idle/h3", "RSS with idle h3 conns", "MiB", "lower"),
        Figure("rss_per_conn/h3", "RSS per idle h3 conn", "KiB", "lower"),
        *(
            Figure(f"rss_per_conn/{p}", f"RSS per idle {p} conn (TLS)", "KiB", "lower")
            for p in ("h1", "h2")
        ),
        Figure(
            "rss_churn/h2", "RSS after 10,000 h2 conns opened, used once, closed", "MiB", "lower"
        ),
        *(
            Figure(f"waf_{q}/h3", f"latency the WAF adds, {q}, h3", "ms", "lower")
            for q in ("p50", "p99")
        ),
        Figure(
            "waf_engine_p50/h3",
            "WAF engine alone per evaluation, p50, same request and rate",
            "ms",
            "lower",
        ),
        Figure(
            "waf_beyond_p50/h3", "latency the WAF adds beyond the engine, p50, h3", "ms", "lower"
        ),
        Figure(
            "waf_in_engine_p50/h3",
            "WAF engine per evaluation inside the proxy, p50, latency test, h3",
            "ms",
            "lower",
        ),
        Figure(
            "waf_wait_p50/h3",
            "WAF wait beyond the engine inside the proxy, p50, latency test, h3",
            "ms",
            "lower",
        ),
    ]
}


class Row(NamedTuple):
    start: float  # seconds since oha started
    dialup: float  # DNS + connect (+ TLS/QUIC handshake) of the request's connection
    duration: float  # latency (corrected for coordinated omission with --latency-correction)
    nbytes: int
    status: int

    @property
    def end(self) -> float:
        return self.start + self.duration


def find_oha() -> str:
    for c in (os.environ.get("OHA"), shutil.which("oha"), str(Path.home() / ".cargo/bin/oha")):
        if c and Path(c).exists():
            return c
    raise RuntimeError(
        f"oha not found: cargo install --locked --features http3 oha --version {OHA_VERSION}"
    )


class Oha:
    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe, self.workdir = exe, workdir
        self.body = workdir / "upload-10m.bin"
        if not self.body.exists() or self.body.stat().st_size != BIG:
            self.body.write_bytes(os.urandom(BIG))

    def run(
        self,
        url: str,
        proto: str,
        *,
        conc: int,
        rate: float,
        seconds: float,
        n: int | None = None,
        correct: bool = False,
        upload: bool = False,
        grace: float = 0.5,
    ) -> list[Row]:
        """One oha process: `-z seconds` (or `-n n`), SIGINT at seconds + grace; its CSV rows."""
        version = {"h1": "1.1", "h2": "2", "h3": "3"}[proto]
        cmd = [self.exe, "--no-tui", "--output-format", "csv", "--insecure", "--ipv4"]
        cmd += ["--http-version", version, "-c", str(conc), "-q", str(rate), "-t", "30s"]
        cmd += ["-n", str(n)] if n else ["-z", f"{seconds}s"]
        if correct:
            cmd.append("--latency-correction")
        if upload:
            cmd += ["-m", "POST", "-D", str(self.body), "-T", "application/octet-stream"]
        with tempfile.TemporaryFile("w+", dir=self.workdir) as out:
            p = subprocess.Popen(cmd + [url], stdout=out, stderr=subprocess.PIPE, text=True)
            try:
                try:
                    p.wait(timeout=seconds + grace)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGINT)  # oha prints what it has and exits
                _, err = p.communicate(timeout=30)
            except BaseException:  # also when the harness itself is stopped
                p.kill()
                p.wait()
                raise
            if p.returncode != 0:
                raise RuntimeError(f"oha failed ({p.returncode}): {err.strip()[-300:]}")
            out.seek(0)
            return [
                Row(float(r[0]), float(r[2]), float(r[4]), int(r[5]), int(r[6]))
                for r in csv.reader(out)
                if r and r[0] != "request-start"
            ]


def _ok(rows: list[Row], what: str, window: float | None = None) -> list[Row]:
    """2xx rows (completed within the window, if given); fail on none or >1 % non-2xx."""
    if window is not None:
        rows = [r for r in rows if r.end <= window]
    good = [r for r in rows if 200 <= r.status < 300]
    if not rows:
        raise RuntimeError(f"{what}: no request completed (oha: errors only, or none in time)")
    if not good or len(rows) - len(good) > 0.01 * len(rows):
        codes = sorted({r.status for r in rows})
        raise RuntimeError(f"{what}: {len(good)} ok of {len(rows)} (statuses {codes})")
    return good


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def warmup(oha: Oha, t: Target, s: Settings) -> list[str]:
    """A short light load per protocol (up to 3 tries, e.g. while the target is still
    closing the idle-memory test's connections); returns the protocols that work."""
    good = []
    for proto, base in t.urls.items():
        err: Exception | None = None
        for _ in range(3):
            try:
                rows = oha.run(base + "/1k", proto, conc=4, rate=400, seconds=s.warm)
                _ok(rows, f"warmup {proto}")
                good.append(proto)
                break
            except Exception as e:  # noqa: BLE001 - retried, then reported
                err = e
        else:
            print(f"    ! {t.name} {proto}: {err}", flush=True)
    return good


class Metered(NamedTuple):
    rows: list[Row]
    cpu_before: float  # CPU seconds of the server's process trees before oha started
    cpu_after: float  # ... and after oha exited


def metered(t: Target, fn, *args, **kw) -> Metered:
    """Run one oha measurement between two readings of the server's CPU time (user + sys of
    its whole process tree: workers and threads included). The readings bracket the oha
    process, so every request it completed was served inside them."""
    pids = t.cpu_pids
    before = proc_tree_cpu_s(pids) if pids else float("nan")
    rows = fn(*args, **kw)
    after = proc_tree_cpu_s(pids) if pids else float("nan")
    return Metered(rows, before, after)


def _cpu(m: Metered, units: float, key: str) -> dict[str, float]:
    if m.cpu_before != m.cpu_before:  # nan: no server process to meter
        return {}
    return {key: cpu_per_unit(m.cpu_before, m.cpu_after, units)}


def rps_1k(oha: Oha, t: Target, proto: str, s: Settings) -> dict[str, float]:
    """Request rate (2xx completed inside the window / window) and server CPU µs per request
    (CPU over the whole oha run / every 2xx it completed, window or not: the CPU readings
    bracket the whole run, so numerator and denominator cover the same requests)."""
    m = metered(
        t,
        oha.run,
        t.urls[proto] + "/1k",
        proto,
        conc=s.conc,
        rate=s.max_rate,
        seconds=s.duration,
    )
    got = len(_ok(m.rows, "rps_1k", s.duration)) / s.duration
    if got > 0.8 * s.max_rate:
        print(f"    ! rps_1k/{proto} is near the oha rate cap {s.max_rate:.0f}", flush=True)
    done = sum(1 for r in m.rows if 200 <= r.status < 300)
    return {f"rps_1k/{proto}": got, **_cpu(m, done, f"cpu_1k/{proto}")}


def latency(oha: Oha, t: Target, proto: str, s: Settings) -> dict[str, float]:
    rows = oha.run(
        t.urls[proto] + "/1k",
        proto,
        conc=s.lat_conc,
        rate=s.rate,
        seconds=s.duration,
        correct=True,
    )
    lat = [r.duration * 1000 for r in _ok(rows, "latency", s.duration)]
    return {f"lat_p50/{proto}": _pct(lat, 50), f"lat_p99/{proto}": _pct(lat, 99)}


def _transfer(oha: Oha, t: Target, proto: str, s: Settings, up: bool) -> dict[str, float]:
    """One stream (c=1), back-to-back 10 MiB transfers for the window; every transfer that
    completes (the last may end up to 5 s late) counts with its own time: MiB / seconds.
    Server CPU per MiB: CPU over the whole oha run / MiB of the completed transfers."""
    path, w = ("/up", "ul") if up else ("/10m", "dl")
    m = metered(
        t,
        oha.run,
        t.urls[proto] + path,
        proto,
        conc=1,
        rate=s.max_rate,
        seconds=s.duration,
        upload=up,
        grace=5.0,
    )
    got = _ok(m.rows, "upload" if up else "download")
    if not up and any(r.nbytes != BIG for r in got):
        raise RuntimeError("download: short body")
    mib = len(got) * BIG / MIB
    return {
        f"{w}_10m/{proto}": mib / sum(r.duration for r in got),
        **_cpu(m, mib, f"cpu_{w}_10m/{proto}"),
    }


def download(oha: Oha, t: Target, proto: str, s: Settings) -> dict[str, float]:
    return _transfer(oha, t, proto, s, up=False)


def upload(oha: Oha, t: Target, proto: str, s: Settings) -> dict[str, float]:
    return _transfer(oha, t, proto, s, up=True)


def upload_aioquic(t: Target, s: Settings) -> dict[str, float]:
    """h3 upload with aioquic's client (bench/h3_upload.py, separate process), a second client
    beside oha (whose h3 uploads of 1 MB and more Caddy 2.6 reset; Caddy 2.11.9 takes them).
    The Python client tops out near 7 MiB/s here, so this row is client-bound for fast
    targets."""
    port = t.urls["h3"].rsplit(":", 1)[1]
    r = subprocess.run(
        [sys.executable, "-m", "bench.h3_upload", HOST, port, NAME, str(s.duration)],
        capture_output=True,
        text=True,
        timeout=s.duration + 90,
        cwd=Path(__file__).resolve().parent.parent,
    )
    done, spent = (r.stdout.split() + ["0", "0"])[:2] if r.returncode == 0 else ("0", "0")
    if int(done) == 0:
        raise RuntimeError(f"aioquic upload: none completed {r.stderr.strip()[-200:]}")
    return {"ul_10m_aq/h3": int(done) * BIG / float(spent) / MIB}


def _client_run(t: Target, s: Settings, module: str, *args: str) -> tuple[dict, float]:
    """Run a load client module in a child process (``python -m bench.MODULE ...``) between
    two readings of the target's CPU; its JSON line and the server CPU seconds it cost
    (nan when there is no server process to meter)."""
    pids = t.cpu_pids
    before = proc_tree_cpu_s(pids) if pids else float("nan")
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=s.duration + 60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    after = proc_tree_cpu_s(pids) if pids else float("nan")
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1]), after - before


def _per_unit(cpu_s: float, units: float, key: str) -> dict[str, float]:
    return {} if cpu_s != cpu_s else {key: cpu_per_unit(0.0, cpu_s, units)}


def ws_url(base: str) -> str:
    """The WebSocket echo URL of an http(s) base URL."""
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws"


def ws_echo(t: Target, s: Settings) -> dict[str, float]:
    """WebSocket echo through the target (h1 Upgrade; `direct`: the backend's own /ws):
    ``s.ws_conns`` connections, 1 KiB messages back to back for the window, by the
    `websockets` client in a child process. Server CPU per message: the target's CPU over
    the client's run / messages echoed (each is one message each way)."""
    url = ws_url(t.urls["h1"])
    got, cpu = _client_run(t, s, "ws_echo", url, str(s.ws_conns), str(s.duration))
    if not got["messages"]:
        raise RuntimeError("no WebSocket message echoed")
    return {
        "ws_echo/h1": got["messages"] / got["seconds"],
        "ws_p50/h1": got["p50_ms"],
        "ws_p99/h1": got["p99_ms"],
        **_per_unit(cpu, got["messages"], "cpu_ws/h1"),
    }


def failover(t: Target, s: Settings) -> dict[str, float]:
    """GETs of `/fo/1k` (a route of three backends) over h2 by 16 concurrent callers
    (httpx, child process) for the window; one backend is killed a third of the way in
    and started again after the run. Requests/s and the requests that failed: what the
    target's passive health checks and retries hide (Caddy: `lb_retries 2`, `max_fails 1`,
    `fail_duration 10s`, least_conn; quicproxy: its defaults)."""
    if t.pool is None or "h2" not in t.urls:
        return {}
    cmd = [sys.executable, "-m", "bench.failover", t.urls["h2"] + "/fo/1k", str(s.ws_conns)]
    proc = subprocess.Popen(
        [*cmd, str(s.duration)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        time.sleep(s.duration / 3)
        t.pool.kill(2)
        out, err = proc.communicate(timeout=s.duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        t.pool.restore(2)
    if proc.returncode != 0:
        raise RuntimeError((err.strip().splitlines() or ["no output"])[-1])
    got = json.loads(out.strip().splitlines()[-1])
    return {"failover/h2": got["ok"] / got["seconds"], "failover_err/h2": got["failed"]}


def grpc_unary(t: Target, s: Settings) -> dict[str, float]:
    """gRPC unary calls through the target over h2 (TLS), to the backend's h2c gRPC echo
    (`direct`: the backend itself over h2c): ``s.ws_conns`` concurrent callers on one
    channel, 1 KiB messages back to back for the window, by grpcio in a child process.
    Server CPU per call: the target's CPU over the client's run / calls completed."""
    base = t.urls.get("h2")
    host_port = t.urls["h1"].split("://", 1)[1]
    target = f"https://{base.split('://', 1)[1]}" if base else f"h2c://{host_port}"
    got, cpu = _client_run(t, s, "grpc_unary", target, str(s.ws_conns), str(s.duration))
    if not got["calls"]:
        raise RuntimeError("no gRPC call completed")
    return {
        "grpc_unary/h2": got["calls"] / got["seconds"],
        "grpc_p50/h2": got["p50_ms"],
        "grpc_p99/h2": got["p99_ms"],
        **_per_unit(cpu, got["calls"], "cpu_grpc/h2"),
    }


def handshake(oha: Oha, t: Target, s: Settings) -> dict[str, float]:
    """New h3 connections/s: the median of `s.bursts` bursts (one burst's figure swung
    ±50 % between runs on a shared 2-core machine)."""
    rates, slow = [], []
    for i in range(s.bursts):
        if i:
            time.sleep(0.5)  # the previous burst's connections close
        got = _burst(oha, t, s)
        rates.append(got["handshake/h3"])
        slow.append(got["handshake_slow/h3"])
    return {"handshake/h3": statistics.median(rates), "handshake_slow/h3": statistics.median(slow)}


def _burst(oha: Oha, t: Target, s: Settings) -> dict[str, float]:
    """oha ignores --disable-keepalive on h3, so: `-n K -c K` to /slow
    (the backend holds each request 1 s): the K connections start at once and each carries
    exactly one request, so each row's dialup time is when its handshake finished.
    Rate = K/2 / time until half of them were up. A lost Initial costs a ~1 s PTO, so the
    share of connections slower than 0.5 s is reported beside it."""
    rows = oha.run(
        t.urls["h3"] + "/slow", "h3", conc=s.burst, rate=s.max_rate, seconds=3.0, n=s.burst
    )
    got = _ok(rows, "handshake")
    conns = sorted({r.dialup for r in got})  # one distinct dialup time per connection
    half = s.burst // 2
    if len(conns) < half:
        raise RuntimeError(f"handshake: {len(conns)}/{s.burst} connections in time")
    slow = s.burst - sum(1 for c in conns if c <= 0.5)
    return {"handshake/h3": half / conns[half - 1], "handshake_slow/h3": 100 * slow / s.burst}


def idle_memory(t: Target, s: Settings) -> dict[str, float]:
    """RSS of the target's process tree before and with N idle h3 connections (aioquic client
    in a separate process)."""
    base = proc_tree_rss_kib(t.pid)
    port = t.urls["h3"].rsplit(":", 1)[1]
    client = subprocess.Popen(
        [sys.executable, "-m", "bench.idle_h3", HOST, port, str(s.idle_conns), "300", NAME],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert client.stdout and client.stdin
        line = client.stdout.readline().split()  # "READY ok failed"; bounded by the hold time
        if len(line) != 3 or line[0] != "READY":
            raise RuntimeError("idle h3 client did not report READY")
        ok = int(line[1])
        if ok < 0.99 * s.idle_conns:
            raise RuntimeError(f"only {ok}/{s.idle_conns} idle h3 connections opened")
        time.sleep(1.0)
        idle = proc_tree_rss_kib(t.pid)
        client.stdin.close()
        client.wait(timeout=30)
        time.sleep(2 * s.warm)  # let the target finish closing them before the next workload
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return {
        "rss_base/h3": base / 1024,
        "rss_idle/h3": idle / 1024,
        "rss_per_conn/h3": (idle - base) / ok,
    }


def _tcp_client(t: Target, *args: str) -> subprocess.Popen:
    port = t.urls["h2"].rsplit(":", 1)[1]
    mode, proto, *rest = args
    return subprocess.Popen(
        [sys.executable, "-m", "bench.idle_tcp", mode, HOST, port, proto, *rest, NAME],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _report(client: subprocess.Popen, word: str, wanted: int, what: str) -> int:
    """The count of connections a client reports ("WORD ok failed"), at least 99 % of them."""
    assert client.stdout is not None
    line = client.stdout.readline().split()
    if len(line) != 3 or line[0] != word:
        raise RuntimeError(f"{what} client did not report {word}")
    ok = int(line[1])
    if ok < 0.99 * wanted:
        raise RuntimeError(f"only {ok}/{wanted} {what} connections")
    return ok


def idle_tcp_memory(t: Target, s: Settings, proto: str) -> dict[str, float]:
    """RSS per idle TLS connection (h1: after the handshake; h2: after the preface and
    SETTINGS), N of them held by ``bench/idle_tcp.py`` in a separate process; VmRSS of the
    target's process tree with them less before them."""
    base = proc_tree_rss_kib(t.pid)
    client = _tcp_client(t, "hold", proto, str(s.idle_conns), "300")
    try:
        ok = _report(client, "READY", s.idle_conns, f"idle {proto}")
        time.sleep(1.0)
        idle = proc_tree_rss_kib(t.pid)
        assert client.stdin is not None
        client.stdin.close()
        client.wait(timeout=30)
        time.sleep(2 * s.warm)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return {f"rss_per_conn/{proto}": (idle - base) / ok}


def churn_memory(t: Target, s: Settings) -> dict[str, float]:
    """VmRSS of the target's process tree (MiB) once ``churn_conns`` h2 connections were
    opened, made one request each and closed (64 at a time), and 5 s passed: memory a
    server keeps from connections that are gone."""
    client = _tcp_client(t, "churn", "h2", str(s.churn_conns), str(s.churn_conc))
    try:
        _report(client, "DONE", s.churn_conns, "churned h2")
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    time.sleep(5.0)
    return {"rss_churn/h2": proc_tree_rss_kib(t.pid) / 1024}


def waf_inside(t: Target, keys: dict[str, str], fn, *args) -> dict[str, float]:
    """``fn(*args)``'s figures plus, for an inline WAF target, the p50 (ms) of the proxy's
    own WAF histograms over the same window: ``keys`` maps histogram name to figure key."""
    if t.waf != "inline" or not t.metrics_url:
        return fn(*args)
    before = {h: scrape.buckets(t.metrics_url, h, engine=t.engine) for h in keys}
    got = fn(*args)
    for h, key in keys.items():
        after = scrape.buckets(t.metrics_url, h, engine=t.engine)
        got[key] = scrape.quantile(before[h], after, 0.5) * 1000
    return got


WAIT = "quicproxy_waf_wait_seconds"
ENGINE = "quicproxy_waf_engine_seconds"


def waf_engine(t: Target, s: Settings) -> dict[str, float]:
    """The target's WAF engine alone on the latency test's request at its rate, in a child
    process on the interpreter the proxy runs on."""
    rounds = max(100, int(s.rate * s.duration))
    out = subprocess.run(
        [t.python or sys.executable, "-m", "bench.waf_engine", t.engine, str(rounds), str(s.rate)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"waf_engine_p50/h3": got["wall_p50_ms"]}


def run_target(oha: Oha, t: Target, s: Settings, log=print) -> dict:
    """Every workload that applies to this target; memory first, on a fresh process.
    Returns {figure_key: value, "_failed": {figure_key: reason}}."""
    res: dict = {"_failed": {}}

    def step(name: str, keys: list[str], fn, *args) -> None:
        t0 = time.monotonic()
        try:
            got = fn(*args)
        except Exception as e:  # noqa: BLE001 - one failed figure must not end the run
            log(f"    {name:<14} FAILED: {str(e)[:200]}")
            res["_failed"].update({k: str(e)[:200] for k in keys})
            return
        res.update(got)
        shown = ", ".join(f"{k.split('/')[0]}={v:.1f}" for k, v in got.items())
        log(f"    {name:<14} {shown}  ({time.monotonic() - t0:.0f}s)")

    full = t.waf == "off"  # WAF targets: request rate and latency only
    if full and "h3" in t.urls:
        keys = ["rss_base/h3", "rss_idle/h3", "rss_per_conn/h3"]
        step("idle h3 mem", keys, idle_memory, t, s)
    if full and "h2" in t.urls and t.urls["h2"].startswith("https:"):
        for p in ("h1", "h2"):
            step(f"idle {p} mem", [f"rss_per_conn/{p}"], idle_tcp_memory, t, s, p)
        step("churn h2 mem", ["rss_churn/h2"], churn_memory, t, s)
    protos = warmup(oha, t, s)
    for p in t.urls:
        if p not in protos:
            res["_failed"][f"rps_1k/{p}"] = "warmup failed"
    for p in protos:
        step(f"rps 1k {p}", [f"rps_1k/{p}", f"cpu_1k/{p}"], rps_1k, oha, t, p, s)
    if t.waf != "off" and t.kind == "quicproxy":
        step("waf engine", ["waf_engine_p50/h3"], waf_engine, t, s)
    for p in protos:
        if p in s.lat_protos or t.kind == "direct":
            keys = [f"lat_p50/{p}", f"lat_p99/{p}"]
            if p == "h3" and t.waf == "inline" and t.kind == "quicproxy":
                inside = {WAIT: "waf_wait_p50/h3", ENGINE: "waf_in_engine_p50/h3"}
                step(
                    f"latency {p}",
                    [*keys, *inside.values()],
                    waf_inside,
                    t,
                    inside,
                    latency,
                    oha,
                    t,
                    p,
                    s,
                )
            else:
                step(f"latency {p}", keys, latency, oha, t, p, s)
    if full:
        step("ws echo h1", ["ws_echo/h1", "ws_p50/h1", "ws_p99/h1", "cpu_ws/h1"], ws_echo, t, s)
        keys = ["grpc_unary/h2", "grpc_p50/h2", "grpc_p99/h2", "cpu_grpc/h2"]
        step("grpc unary h2", keys, grpc_unary, t, s)
        step("failover h2", ["failover/h2", "failover_err/h2"], failover, t, s)
        for p in protos:
            if p in s.big_protos or t.kind == "direct":
                step(f"download {p}", [f"dl_10m/{p}", f"cpu_dl_10m/{p}"], download, oha, t, p, s)
                step(f"upload {p}", [f"ul_10m/{p}", f"cpu_ul_10m/{p}"], upload, oha, t, p, s)
        if "h3" in protos:
            if s.aioquic_upload:
                step("upload h3 aq", ["ul_10m_aq/h3"], upload_aioquic, t, s)
            step("handshake h3", ["handshake/h3", "handshake_slow/h3"], handshake, oha, t, s)
    return res
