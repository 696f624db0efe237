"""python -m bench [--quick] [--runs N] [--out DIR] [--only NAME ...] [--profile]"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from bench import facts, report, targets, workloads
from bench.certs import make_cert

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs, 1 repeat: under 2 minutes")
    p.add_argument("--runs", type=int, help="repeats of every figure (default 3, quick 1)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--duration", type=float, help="seconds per load run (default 8, quick 2)")
    p.add_argument("--rate", type=float, help="req/s for the latency test (default 100)")
    p.add_argument("--idle-conns", type=int, help="idle h3 connections (default 1000, quick 100)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N for qp-Nw")
    p.add_argument("--only", nargs="*", help="target names to run (e.g. caddy qp-1w)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile qp-1w under h3 load with py-spy; writes profile-top.md",
    )
    return p.parse_args(argv)


def _stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    # Also when started in the background (SIGINT ignored) or by timeout(1)/CI (SIGTERM).
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    s = workloads.Settings.quick() if a.quick else workloads.Settings()
    for field in ("duration", "rate", "idle_conns"):
        if getattr(a, field) is not None:
            setattr(s, field, getattr(a, field))
    runs = a.runs or (1 if a.quick else 3)
    out: Path = a.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    oha = workloads.Oha(workloads.find_oha(), work)
    cert, key = make_cert(work / "tls")
    log("building the Go backend")
    backend = targets.build_backend(work / "backend")
    lab = targets.Lab(work, cert, key, backend)
    try:
        machine = facts.machine(oha.exe, lab.qp)
        print("\n".join(f"  {k}: {v}" for k, v in machine.items()), flush=True)
        plan = lab.plan(a.workers)
        if a.only:
            plan = [t for t in plan if t.name in a.only]
        if not lab.qp:
            log("quicproxy serve not available: running direct and caddy only")
        results: list[dict[str, dict]] = []
        notes: list[str] = []
        for i in range(runs):
            results.append({})
            for t in plan:
                log(f"run {i + 1}/{runs}: {t.name}")
                try:
                    lab.start(t)
                    results[i][t.name] = workloads.run_target(oha, t, s, log)
                except Exception as e:  # noqa: BLE001 - a broken target must not end the run
                    log(f"  {t.name} FAILED: {e}")
                    notes.append(f"run {i + 1}: {t.name} failed: {str(e)[:200]}")
                finally:
                    lab.stop(t)
        if a.profile and lab.qp:
            from bench import profile

            log("profiling qp-1w under h3 load (py-spy)")
            try:
                profile.run(lab, oha, out, s, log)
            except Exception as e:  # noqa: BLE001 - the benchmark's own results still count
                log(f"  profile FAILED: {e}")
                notes.append(f"profile failed: {str(e)[:200]}")
    finally:
        lab.close()

    names = [t.name for t in plan]
    rows = report.summarise(results, names)
    settings = {"runs": runs, **dataclasses.asdict(s)}
    md = report.markdown(rows, names, machine, settings, notes)
    (out / "results.md").write_text(md)
    tlist = [
        {
            "name": t.name,
            "kind": t.kind,
            "workers": t.workers,
            "waf": t.waf,
            "engine": t.engine if t.waf != "off" else None,
            "note": t.note,
        }
        for t in plan
    ]
    report.write_json(out / "results.json", rows, results, machine, settings, tlist)
    png = report.plot(out / "results.png", rows, names)
    print("\n" + md, flush=True)
    log(
        f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (
            f", {out / 'results.png'}"
            if png
            else " (no PNG: pip install -r bench/requirements.txt)"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
