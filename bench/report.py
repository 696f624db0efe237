"""Summarise repeated runs: median and spread per figure, ratios, markdown, JSON, PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.workloads import FIGURES

NA_DIRECT = "n/a: backend is plain HTTP/1.1"


def stats(values: list[float]) -> dict:
    """Median, min, max and spread = (max - min) / median, in percent."""
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / abs(med) * 100 if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread_pct": spread, "n": len(values)}


def waf_added(runs: list[dict[str, dict[str, float]]]) -> None:
    """Add waf_p50/p99 per run: WAF target latency minus qp-1w latency in the same run; and
    waf_beyond_p50: that minus the engine's own time for the same request."""
    for run in runs:
        base = run.get("qp-1w", {})
        for name in ("qp-waf-inline", "qp-waf-coraza", "qp-waf-service"):
            got = run.get(name)
            for q in ("p50", "p99"):
                key = f"lat_{q}/h3"
                if got is not None and key in got and key in base:
                    got[f"waf_{q}/h3"] = got[key] - base[key]
            if got is not None and "waf_p50/h3" in got and "waf_engine_p50/h3" in got:
                got["waf_beyond_p50/h3"] = got["waf_p50/h3"] - got["waf_engine_p50/h3"]


def summarise(runs: list[dict[str, dict]], targets: list[str]) -> list[dict]:
    """One row per (figure, target) with values over runs, stats and ratios. A figure that
    failed in every run gets a row with median None and the reason."""
    waf_added(runs)
    rows: list[dict] = []
    for key, fig in FIGURES.items():
        meds: dict[str, float] = {}
        mine: list[dict] = []
        for t in targets:
            vals = [r[t][key] for r in runs if key in r.get(t, {})]
            failed = [r[t]["_failed"][key] for r in runs if key in r.get(t, {}).get("_failed", {})]
            base = {
                "figure": key,
                "label": fig.label,
                "unit": fig.unit,
                "better": fig.better,
                "target": t,
                "values": vals,
            }
            if vals:
                mine.append({**base, **stats(vals)})
                meds[t] = mine[-1]["median"]
                if failed:
                    mine[-1]["failed_runs"] = failed
            elif failed:
                mine.append({**base, "median": None, "n": 0, "failed": failed[0]})
        for row in mine:
            row["vs_caddy"] = _ratio(row["median"], meds.get("caddy"))
            row["vs_direct"] = _ratio(row["median"], meds.get("direct"))
            if row["vs_direct"] is None and not key.endswith("/h1"):
                row["vs_direct_note"] = NA_DIRECT
        rows += mine
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def markdown(
    rows: list[dict],
    targets: list[str],
    machine: dict,
    settings: dict,
    notes: list[str] | None = None,
) -> str:
    keys = [k for k in FIGURES if any(r["figure"] == k for r in rows)]
    cell = {(r["figure"], r["target"]): r for r in rows}
    head = "| figure | unit | " + " | ".join(targets) + " |\n"
    sep = "|---|---|" + "---:|" * len(targets) + "\n"

    def table(fn, only: str | None = None) -> str:
        out = head + sep
        for k in keys:
            if only and cell.get((k, only), {}).get("median") is None:
                continue
            cells = [fn(cell.get((k, t))) for t in targets]
            out += f"| {FIGURES[k].label} | {FIGURES[k].unit} | " + " | ".join(cells) + " |\n"
        return out

    def med(r) -> str:
        if r and r["median"] is None:
            return "failed¹"
        return f"{_fmt(r['median'])} ±{r['spread_pct']:.0f}%" if r else "–"

    def ratio(field):
        def f(r) -> str:
            return f"{r[field]:.2f}×" if r and r[field] is not None else "–"

        return f

    facts = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    fails = "".join(
        f"- ¹ {r['target']} {r['figure']}: {r['failed']}\n" for r in rows if r["median"] is None
    )
    fails += "".join(f"- {n}\n" for n in notes or [])
    sets = ", ".join(f"{k}={v}" for k, v in settings.items())
    n = max((r["n"] for r in rows), default=0)
    return (
        "# quicproxy benchmark\n\n## Machine\n" + facts + "\n\n"
        f"Settings: {sets}\n\n"
        f"## Medians over {n} runs (±spread = (max−min)/median)\n\n"
        + table(med)
        + "\nhigher is better for req/s, MiB/s, conn/s; lower for ms, MiB, KiB, µs/req, µs/MiB.\n"
        "Server CPU: user + sys of the target's whole process tree (workers, threads; the "
        "backend's for direct) over the oha run, per completed request or MiB.\n"
        "`–`: not measured for that target (direct is plain HTTP/1.1 only; WAF targets run "
        "request rate and latency only).\n" + fails + "\n"
        "## Ratio to Caddy (target median / Caddy median)\n\n"
        + table(ratio("vs_caddy"), only="caddy")
        + "\n## Ratio to the direct backend (target median / direct median)\n\n"
        + table(ratio("vs_direct"), only="direct")
        + f"\nh2 and h3 rows have no direct figure ({NA_DIRECT}).\n"
    )


def write_json(
    path: Path, rows: list[dict], runs: list, machine: dict, settings: dict, targets: list[dict]
) -> None:
    doc = {
        "machine": machine,
        "settings": settings,
        "targets": targets,
        "figures": rows,
        "runs": runs,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot(path: Path, rows: list[dict], targets: list[str]) -> bool:
    """Bar charts per figure (bars = medians, whiskers = min..max). False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["median"] is not None]
    # a chart per figure that at least two targets have (one-target rows are in the table)
    keys = [k for k in FIGURES if sum(r["figure"] == k for r in rows) >= 2]
    if not keys:
        return False
    cols = 4
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes.flat, keys, strict=False):
        got = [
            (i, r)
            for i, t in enumerate(targets)
            for r in rows
            if r["figure"] == k and r["target"] == t
        ]
        xs = [i for i, _ in got]
        meds = [r["median"] for _, r in got]
        err = [[r["median"] - r["min"] for _, r in got], [r["max"] - r["median"] for _, r in got]]
        ax.bar(xs, meds, yerr=err, capsize=3, color=[colors[i % len(colors)] for i in xs])
        if min(meds) > 0 and max(meds) / min(meds) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(targets)), targets, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{FIGURES[k].label} ({FIGURES[k].unit})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
