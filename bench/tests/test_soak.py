"""The soak's report (bench/soak.py): the RSS series side by side and the clients' rows,
and the memory rows' table. No load and no timing: fixed results."""

from __future__ import annotations

from bench import soak


def test_series_side_by_side_mark_when_the_clients_left_and_keep_every_sample():
    runs = {
        "qp-1w": {
            "rss": [50.0, 140.2, 150.0, 102.4],
            "left_at": 2,
            "clients": [
                {"proto": "h1", "conns": 700, "conn_errors": 0, "requests": 17851, "errors": 0}
                | {"not_2xx": 87, "ready_s": 7.2, "p50_ms": 309.4, "p99_ms": 5785.5}
                | {"why": {}, "statuses": {"503": 87}}
            ],
        },
        "caddy": {"rss": [52.0, 217.0], "left_at": 1, "clients": []},
    }
    lines = soak.table(runs).splitlines()
    assert lines[0] == "t (s) | qp-1w MiB | caddy MiB"
    assert lines[2] == "0 | 50 | 52"
    assert lines[3] == "5 | 140 | 217 (clients left)"
    assert lines[4] == "10 | 150 (clients left) | "
    assert lines[5] == "15 | 102 | "
    assert "qp-1w | h1 | 700 | 0 | 17851 | 0 | 87 | 7.2 | 309.4 | 5785.5 | 503: 87" in lines


def test_memory_rows_table_says_failed_for_a_missing_row():
    rows = {"qp-1w": {"rss_per_conn/h3": 47.6}, "caddy": {"rss_per_conn/h3": 80.4}}
    text = soak.rows_table(rows, quick=False)
    assert "RSS per idle h3 conn (KiB) | 48 | 80" in text
    assert "RSS per idle h1 conn, TLS (KiB) | failed | failed" in text
    assert text.startswith("row (1000 idle conns, 10,000 h2 conns churned)")
