"""Unit tests for the harness's arithmetic and parsing (no load, no timing)."""

from __future__ import annotations

import json

from bench import report
from bench.profile import top


def _runs() -> list[dict]:
    return [
        {
            "direct": {"rps_1k/h1": 1000.0},
            "caddy": {"rps_1k/h1": 500.0, "rps_1k/h3": 400.0},
            "qp-1w": {"rps_1k/h1": 250.0, "rps_1k/h3": 100.0, "lat_p50/h3": 2.0},
            "qp-waf-inline": {"lat_p50/h3": 3.5, "waf_engine_p50/h3": 1.25},
        },
        {
            "direct": {"rps_1k/h1": 1200.0},
            "caddy": {"rps_1k/h1": 600.0, "rps_1k/h3": 400.0},
            "qp-1w": {"rps_1k/h1": 300.0, "rps_1k/h3": 200.0, "lat_p50/h3": 2.0},
            "qp-waf-inline": {"lat_p50/h3": 2.5},
        },
        {
            "direct": {"rps_1k/h1": 1100.0},
            "caddy": {"rps_1k/h1": 550.0, "rps_1k/h3": 400.0},
            "qp-1w": {"rps_1k/h1": 275.0, "rps_1k/h3": 150.0, "lat_p50/h3": 2.0},
            "qp-waf-inline": {"lat_p50/h3": 3.0},
        },
    ]


NAMES = ["direct", "caddy", "qp-1w", "qp-waf-inline"]


def test_stats_median_and_spread() -> None:
    s = report.stats([90.0, 110.0, 100.0])
    assert s["median"] == 100.0
    assert (s["min"], s["max"], s["n"]) == (90.0, 110.0, 3)
    assert round(s["spread_pct"], 6) == 20.0


def test_ratios_to_caddy_and_direct() -> None:
    rows = {(r["figure"], r["target"]): r for r in report.summarise(_runs(), NAMES)}
    h1 = rows[("rps_1k/h1", "qp-1w")]
    assert h1["median"] == 275.0
    assert h1["vs_caddy"] == 0.5
    assert h1["vs_direct"] == 0.25
    h3 = rows[("rps_1k/h3", "qp-1w")]
    assert h3["vs_caddy"] == 150.0 / 400.0
    assert h3["vs_direct"] is None  # the backend is plain HTTP/1.1


def test_waf_added_latency_is_paired_per_run() -> None:
    rows = {(r["figure"], r["target"]): r for r in report.summarise(_runs(), NAMES)}
    waf = rows[("waf_p50/h3", "qp-waf-inline")]
    assert waf["values"] == [1.5, 0.5, 1.0]
    assert waf["median"] == 1.0
    # beyond the engine: only where the run measured the engine too (the first run here)
    beyond = rows[("waf_beyond_p50/h3", "qp-waf-inline")]
    assert beyond["values"] == [0.25]


def test_markdown_and_json(tmp_path) -> None:
    runs = _runs()
    rows = report.summarise(runs, NAMES)
    md = report.markdown(rows, NAMES, {"cores": "2"}, {"runs": 3})
    assert "| 1 KiB req/s, c=64, h3 |" in md
    assert report.NA_DIRECT in md
    assert "0.50×" in md
    path = tmp_path / "r.json"
    report.write_json(path, rows, runs, {"cores": "2"}, {"runs": 3}, [])
    doc = json.loads(path.read_text())
    assert {r["target"] for r in doc["figures"]} == set(NAMES)


def test_profile_top_parses_collapsed_stacks() -> None:
    raw = (
        "main (quicproxy/cli.py:3);handle (quicproxy/proxy.py:10);encode (h2/frame.py:5) 30\n"
        "main (quicproxy/cli.py:3);handle (quicproxy/proxy.py:12);encode (h2/frame.py:7) 10\n"
        "main (quicproxy/cli.py:3);parse (quicproxy/waf/x.py:1) 60\n"
    )
    total, selfs, incl = top(raw)
    assert total == 100
    assert selfs[0] == ("parse (quicproxy/waf/x.py)", 60)
    assert selfs[1] == ("encode (h2/frame.py)", 40)
    assert ("handle (quicproxy/proxy.py)", 40) in incl
    assert all(not f.startswith("main ") for f, _ in incl)  # shared entry frames dropped


def test_failed_figure_is_reported_not_dropped() -> None:
    runs = [{"caddy": {"rps_1k/h3": 400.0, "_failed": {"ul_10m/h3": "upload: 0 ok of 0"}}}]
    rows = report.summarise(runs, ["caddy"])
    failed = [r for r in rows if r["figure"] == "ul_10m/h3"]
    assert failed and failed[0]["median"] is None
    md = report.markdown(rows, ["caddy"], {}, {})
    assert "failed¹" in md and "upload: 0 ok of 0" in md
