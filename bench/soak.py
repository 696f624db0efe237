"""A bounded soak: many mixed connections making requests at a steady pace, and the
target's RSS sampled during the load and after it, quicproxy (1 worker) beside Caddy.

    python -m bench.soak [--quick] [--h1 N] [--h2 N] [--h3 N] [--seconds S] [--after S]
                         [--interval S] [--only caddy qp-1w]

Per target (started fresh, in front of the bench's Go backend, as ``python -m bench``
starts them): three client processes (``python -m bench.soak client h1|h2|h3 ...``), one
per protocol, open their connections (32 at a time; TCP ones from 16 loopback sources,
so quicproxy's per-address cap is not what is measured) and keep each one making a
``GET /1k`` every ``--interval`` seconds (first request at a random offset: a flat
load, not waves) for ``--seconds``, then close them all and exit. Default: 2,000
connections (700 h1 over TLS, 700 h2, 600 h3) for 60 s, one request every 2 s each
(~1,000 req/s); ``--quick``: 200 (70, 70, 60) for 20 s.

The target's process-tree VmRSS is sampled every 5 s from the clients' start until
``--after`` seconds (default 15) after the last client left; the series of every target
are printed side by side, then per target and protocol: connections opened, requests
completed, errors (failed requests and connections, non-2xx) and the latency p50/p99 of
the requests that started once every connection was up. The clients share the machine
with the target: keep other CPU use low while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from jh2 import hpack

from bench import targets
from bench.h3_upload import _Client
from bench.idle_tcp import PREFACE, SETTINGS, TIMEOUT, context, source

HERE = Path(__file__).resolve().parent
SAMPLE = 5.0
"Seconds between two RSS samples."
OPENING = 32
"Connections a client process opens at once."


# ------------------------------------------------------------------ client processes


def _h2_headers(name: str, stream_id: int) -> bytes:
    """HEADERS for GET /1k on ``stream_id`` with END_STREAM (literals, no Huffman)."""
    host, path = name.encode(), b"/1k"
    block = bytes([0x82, 0x87, 0x04, len(path)]) + path + bytes([0x01, len(host)]) + host
    return len(block).to_bytes(3, "big") + b"\x01\x05" + stream_id.to_bytes(4, "big") + block


_BIG_WINDOW = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + (1 << 30).to_bytes(4, "big")
"WINDOW_UPDATE on the connection: 1 GiB more (a minute of 1 KiB responses never needs more)."


class _H2:
    """One h2 connection, requests one at a time on stream 1, 3, 5, ..."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.stream = 1
        self.buf = b""
        self.hpack = hpack.Decoder()

    async def get(self, name: str) -> int:
        sid, self.stream = self.stream, self.stream + 2
        self.writer.write(_h2_headers(name, sid))
        status = 0
        while True:
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                size, kind, flags = int.from_bytes(self.buf[:3], "big"), self.buf[3], self.buf[4]
                stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                payload, self.buf = self.buf[9 : 9 + size], self.buf[9 + size :]
                if kind == 0x4 and not flags & 0x1:  # the server's SETTINGS: acknowledged
                    self.writer.write(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                elif kind == 0x6 and not flags & 0x1:  # PING: answered
                    self.writer.write(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)
                elif kind == 0x7 or (stream == sid and kind == 0x3):  # GOAWAY, RST_STREAM
                    raise ConnectionError("reset")
                elif kind == 0x1:  # every header block goes through the decoder (its table)
                    if flags & 0x8:  # PADDED
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & 0x20:  # PRIORITY
                        payload = payload[5:]
                    fields = dict(self.hpack.decode(payload, raw=True))
                    if stream == sid and b":status" in fields:
                        status = int(fields[b":status"])
                if stream == sid and kind in (0x0, 0x1) and flags & 0x1:
                    return status
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise ConnectionError("closed")
            self.buf += data


_CONTEXTS: dict[str, ssl.SSLContext] = {}


async def _open_tcp(host: str, port: int, proto: str, name: str, i: int) -> Any:
    if proto not in _CONTEXTS:  # one per process: making one loads the CA store (~25 ms)
        _CONTEXTS[proto] = context(proto)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=_CONTEXTS[proto], server_hostname=name, local_addr=source(host, i)
        ),
        TIMEOUT,
    )
    if proto == "h2":
        writer.write(PREFACE + SETTINGS + _BIG_WINDOW)
        return _H2(reader, writer)
    return reader, writer


async def _get_tcp(conn: Any, proto: str, name: str) -> int:
    if proto == "h2":
        return await conn.get(name)
    reader, writer = conn
    writer.write(f"GET /1k HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return int(head.split(b" ", 2)[1])


def _close_tcp(conn: Any) -> None:
    writer = conn.writer if isinstance(conn, _H2) else conn[1]
    writer.close()


async def _open_h3(host: str, port: int, name: str) -> Any:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        verify_mode=ssl.CERT_NONE,
        server_name=name,
        idle_timeout=120.0,
    )
    opening = connect(host, port, configuration=config, create_protocol=_Client)
    client = await asyncio.wait_for(opening.__aenter__(), TIMEOUT)
    client.opening = opening  # held: dropped, its generator would close the connection
    return client


async def _get_h3(client: Any, name: str, port: int) -> int:
    sid = client._quic.get_next_available_stream_id()
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    client.waiting[sid] = fut
    head = [(b":method", b"GET"), (b":scheme", b"https")]
    head += [(b":authority", f"{name}:{port}".encode()), (b":path", b"/1k")]
    client.h3.send_headers(sid, head, end_stream=True)
    client.transmit()
    return await asyncio.wait_for(fut, TIMEOUT)


async def client_run(
    proto: str, host: str, port: int, n: int, seconds: float, interval: float, name: str
) -> dict[str, Any]:
    """n connections of ``proto`` each making a GET every ``interval`` s for ``seconds``
    (reopened once failed); what it saw, as a dict."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(OPENING)
    started = loop.time()
    end = started + seconds
    up = [0]
    ready = loop.create_future()
    got: dict[str, Any] = {"proto": proto, "conns": 0, "conn_errors": 0, "requests": 0}
    got.update(errors=0, not_2xx=0)
    latencies: list[float] = []
    why: dict[str, int] = {}
    got["why"] = why
    statuses: dict[str, int] = {}
    got["statuses"] = statuses

    async def one(i: int) -> None:
        conn: Any = None
        counted = False
        while loop.time() < end:
            if conn is None:
                try:
                    async with gate:
                        if proto == "h3":
                            conn = await _open_h3(host, port, name)
                        else:
                            conn = await _open_tcp(host, port, proto, name, i)
                    got["conns"] += 1
                except Exception:
                    got["conn_errors"] += 1
                    await asyncio.sleep(1.0)
                    continue
                if not counted:
                    counted = True
                    up[0] += 1
                    if up[0] == n and not ready.done():
                        ready.set_result(loop.time())
                    await asyncio.sleep(random.uniform(0, interval))  # spread the pace
            t0 = loop.time()
            try:
                if proto == "h3":
                    status = await _get_h3(conn, name, port)
                else:
                    status = await _get_tcp(conn, proto, name)
            except Exception as exc:
                got["errors"] += 1
                why[type(exc).__name__] = why.get(type(exc).__name__, 0) + 1
                with contextlib.suppress(Exception):
                    conn.close() if proto == "h3" else _close_tcp(conn)
                conn = None
                continue
            got["requests"] += 1
            if not 200 <= status < 300:
                got["not_2xx"] += 1
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            if ready.done():
                latencies.append(loop.time() - t0)
            await asyncio.sleep(max(0.0, interval - (loop.time() - t0)))
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close() if proto == "h3" else _close_tcp(conn)

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(0.5)  # the closes leave
    latencies.sort()
    got["ready_s"] = round(ready.result() - started, 1) if ready.done() else None
    for q in (50, 99):
        at = latencies[min(len(latencies) - 1, len(latencies) * q // 100)] if latencies else 0
        got[f"p{q}_ms"] = round(at * 1000, 1)
    return got


def client_main(argv: list[str]) -> None:
    proto, host, port, n, seconds, interval, name = argv
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, int(n) + 256)), hard))
    got = asyncio.run(
        client_run(proto, host, int(port), int(n), float(seconds), float(interval), name)
    )
    print(json.dumps(got), flush=True)
    os._exit(0)  # aioquic's protocols would wait out their close


# ------------------------------------------------------------------ the run


def soak(t: targets.Target, counts: dict[str, int], a: argparse.Namespace, log: Any) -> dict:
    """One target under the load; its RSS series (MiB, every SAMPLE s) and the clients'."""
    port = t.urls["h1"].rsplit(":", 1)[1]
    series = [targets.proc_tree_rss_kib(t.pid) / 1024]
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "client", proto, targets.HOST, port]
            + [str(n), str(a.seconds), str(a.interval), targets.NAME],
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE.parent,
        )
        for proto, n in counts.items()
        if n
    ]
    started = time.monotonic()
    left_at = None
    try:
        while True:
            time.sleep(SAMPLE - (time.monotonic() - started) % SAMPLE)
            series.append(targets.proc_tree_rss_kib(t.pid) / 1024)
            if left_at is None and all(c.poll() is not None for c in clients):
                left_at = len(series) - 1
                log(f"  {t.name}: clients left after {time.monotonic() - started:.0f} s")
            if left_at is not None and (len(series) - 1 - left_at) * SAMPLE >= a.after:
                break
            if time.monotonic() - started > a.seconds + 120:
                raise RuntimeError("clients did not finish")
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    results = []
    for c in clients:
        out = (c.stdout.read() if c.stdout else "").strip().splitlines()
        results.append(json.loads(out[-1]) if out else {"proto": "?", "failed": True})
    return {"rss": series, "left_at": left_at, "clients": results}


def table(runs: dict[str, dict]) -> str:
    names = list(runs)
    lines = ["t (s) | " + " | ".join(f"{n} MiB" for n in names), "---|" + "---|" * len(names)]
    longest = max(len(r["rss"]) for r in runs.values())
    for i in range(longest):
        cells = []
        for n in names:
            r = runs[n]
            if i < len(r["rss"]):
                mark = " (clients left)" if i == r["left_at"] else ""
                cells.append(f"{r['rss'][i]:.0f}{mark}")
            else:
                cells.append("")
        lines.append(f"{i * SAMPLE:.0f} | " + " | ".join(cells))
    lines += [
        "",
        "target | proto | conns | conn errors | requests | errors | not 2xx | up at (s) | "
        "p50 ms | p99 ms | errors, statuses",
        "---|---|---|---|---|---|---|---|---|---|---",
    ]
    for n in names:
        for c in runs[n]["clients"]:
            keys = ("conns", "conn_errors", "requests", "errors", "not_2xx", "ready_s")
            row = [str(c.get(k, "?")) for k in (*keys, "p50_ms", "p99_ms")]
            kinds = {**c.get("why", {}), **c.get("statuses", {})}
            row.append(", ".join(f"{k}: {v}" for k, v in kinds.items()) or "-")
            lines.append(f"{n} | {c.get('proto')} | " + " | ".join(row))
    return "\n".join(lines)


ROWS = {
    "rss_base/h3": "RSS at start (MiB)",
    "rss_per_conn/h3": "RSS per idle h3 conn (KiB)",
    "rss_per_conn/h1": "RSS per idle h1 conn, TLS (KiB)",
    "rss_per_conn/h2": "RSS per idle h2 conn (KiB)",
    "rss_churn/h2": "RSS after the h2 churn (MiB)",
}


def memory_rows(
    lab: targets.Lab, t: targets.Target, quick: bool, fresh: bool, log: Any
) -> dict[str, float]:
    """The bench's memory rows (``workloads``: idle h3, idle h1/h2 held, h2 churn), in
    that order on one fresh process, as ``python -m bench`` runs them; with ``fresh``,
    each row on a process of its own (a row then reuses nothing the previous one freed)."""
    from bench import workloads

    s = workloads.Settings.quick() if quick else workloads.Settings()
    steps = [
        lambda: workloads.idle_memory(t, s),
        lambda: workloads.idle_tcp_memory(t, s, "h1"),
        lambda: workloads.idle_tcp_memory(t, s, "h2"),
        lambda: workloads.churn_memory(t, s),
    ]
    got: dict[str, float] = {}
    for i, step in enumerate(steps):
        if fresh and i:
            lab.stop(t)
            lab.start(t)
            time.sleep(2.0)
        got.update(step())
    log(f"  {t.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
    return got


def rows_table(rows: dict[str, dict[str, float]], quick: bool) -> str:
    names = list(rows)
    idle, churn = (100, 500) if quick else (1000, 10_000)
    lines = [
        f"row ({idle} idle conns, {churn:,} h2 conns churned) | " + " | ".join(names),
        "---|" * (len(names) + 1),
    ]
    for key, label in ROWS.items():
        cells = [f"{rows[n][key]:.0f}" if key in rows[n] else "failed" for n in names]
        lines.append(f"{label} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 connections for 20 s")
    p.add_argument("--h1", type=int, help="h1 (TLS) connections (default 700, quick 70)")
    p.add_argument("--h2", type=int, help="h2 connections (default 700, quick 70)")
    p.add_argument("--h3", type=int, help="h3 connections (default 600, quick 60)")
    p.add_argument("--seconds", type=float, help="seconds of load (default 60, quick 20)")
    p.add_argument("--after", type=float, default=15.0, help="seconds sampled after the load")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between requests")
    p.add_argument("--only", nargs="*", default=["qp-1w", "caddy"], help="targets, in order")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument(
        "--rows",
        action="store_true",
        help="run the bench's memory rows (idle h3, idle h1/h2, h2 churn) instead",
    )
    p.add_argument("--fresh", action="store_true", help="--rows: each row on a fresh process")
    a = p.parse_args(argv)
    scale = 10 if a.quick else 1
    counts = {
        "h1": a.h1 if a.h1 is not None else 700 // scale,
        "h2": a.h2 if a.h2 is not None else 700 // scale,
        "h3": a.h3 if a.h3 is not None else 600 // scale,
    }
    a.seconds = a.seconds or (20.0 if a.quick else 60.0)
    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    from bench.certs import make_cert

    cert, key = make_cert(work / "tls")
    lab = targets.Lab(work, cert, key, targets.build_backend(work / "backend"))
    runs: dict[str, dict] = {}
    try:
        plan = {t.name: t for t in lab.plan(1)}
        for name in a.only:
            t = plan[name]
            if a.rows:
                log(f"{name}: memory rows")
            else:
                log(f"{name}: {sum(counts.values())} connections {counts} for {a.seconds:.0f} s")
            try:
                lab.start(t)
                time.sleep(2.0)
                if a.rows:
                    runs[name] = memory_rows(lab, t, a.quick, a.fresh, log)
                else:
                    runs[name] = soak(t, counts, a, log)
            finally:
                lab.stop(t)
    finally:
        lab.close()
    stem = ("memory-rows-fresh" if a.fresh else "memory-rows") if a.rows else "soak"
    text = rows_table(runs, a.quick) if a.rows else table(runs)
    (a.out / f"{stem}.md").write_text(text + "\n")
    (a.out / f"{stem}.json").write_text(json.dumps(runs, indent=1))
    print("\n" + text, flush=True)
    log(f"wrote {a.out / (stem + '.md')}, {a.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
