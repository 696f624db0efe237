"""--profile: py-spy on qp-1w under h3 load; top hotspots with their cost per request."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.targets import Lab, Target, proc_tree_cpu_s
from bench.workloads import Oha, Settings


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _frame(f: str) -> str:
    """'handle (quicproxy/x.py:12)' -> 'handle (quicproxy/x.py)'."""
    name, _, where = f.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def top(raw: str, n: int = 3) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy raw (collapsed) stacks: total samples, top self frames, top inclusive
    frames inside quicproxy (less the entry chain every sample shares, e.g. main)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += c
        self_c[frames[-1]] += c
        for f in {f for f in frames if "quicproxy" in f}:
            incl[f] += c
    if incl:  # drop the entry chain (<module>, main, ...): the frames every sample goes through
        root = max(incl.values())
        incl = Counter({f: c for f, c in incl.items() if c < root})
    return total, self_c.most_common(n), incl.most_common(n * 2)


def run(lab: Lab, oha: Oha, out: Path, s: Settings, log=print, seconds: float = 15.0) -> None:
    spy = find_py_spy()
    if spy is None:
        log("  py-spy not found: pip install -r bench/requirements.txt")
        return
    t = Target("qp-1w", "quicproxy", 1, "off")
    lab.start(t)
    raw_path = out / "profile-qp-1w-h3.txt"
    rows: list = []
    try:
        # oha in a thread (same CSV/SIGINT driver as the workloads), py-spy alongside it.
        load = threading.Thread(
            target=lambda: rows.extend(
                oha.run(
                    t.urls["h3"] + "/1k", "h3", conc=s.conc, rate=s.max_rate, seconds=seconds + 2
                )
            )
        )
        load.start()
        time.sleep(1.0)
        cpu0, t0 = proc_tree_cpu_s(t.cpu_pids), time.monotonic()
        subprocess.run(
            [
                spy,
                "record",
                "--pid",
                str(t.pid),
                "--subprocesses",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "250",
                "--duration",
                str(int(seconds)),
                "--output",
                str(raw_path),
            ],
            check=True,
            capture_output=True,
            timeout=seconds + 60,
        )
        cpu, wall = proc_tree_cpu_s(t.cpu_pids) - cpu0, time.monotonic() - t0
        load.join(timeout=seconds + 60)
    finally:
        lab.stop(t)
    rps = sum(1 for r in rows if 200 <= r.status < 300) / (seconds + 2)
    per_req_us = cpu / (rps * wall) * 1e6 if rps else 0.0
    total, selfs, incl = top(raw_path.read_text())
    lines = [
        f"# qp-1w h3 profile (py-spy, 1 KiB GET, c={s.conc})\n",
        f"proxy CPU per request ≈ {per_req_us:.0f} µs "
        f"({rps:.0f} req/s, {cpu / wall:.0%} of a core, {total} samples)\n",
        "## Top self time (where the CPU is actually spent)\n",
        "| # | frame | share | ≈ µs/request |",
        "|---|---|---:|---:|",
    ]
    for i, (f, c) in enumerate(selfs, 1):
        lines.append(f"| {i} | `{f}` | {c / total:.1%} | {c / total * per_req_us:.0f} |")
    lines += [
        "\n## Top inclusive time in quicproxy code\n",
        "| frame | share | ≈ µs/request |",
        "|---|---:|---:|",
    ]
    for f, c in incl:
        lines.append(f"| `{f}` | {c / total:.1%} | {c / total * per_req_us:.0f} |")
    lines.append(f"\nRaw collapsed stacks: {raw_path.name} (flamegraph.pl or speedscope.app).")
    (out / "profile-top.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
