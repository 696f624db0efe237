"""Server CPU per request / per MiB: /proc parsing, process-tree sums and the division.
No load and no timing: a fake /proc, and fake oha runs with fixed CPU readings."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, workloads
from bench.targets import Target, cpu_per_unit, proc_tree, proc_tree_cpu_s
from bench.workloads import BIG, Row, Settings


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int, cut: int = 0, cst: int = 0):
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority nice threads ...
    return (
        f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 "
        f"{utime} {stime} {cut} {cst} 20 0 3 0 12345 1000000 200\n"
    )


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """100 (server, reaped children 3 ticks) -> 101 (worker, odd comm) -> 102; 200 unrelated."""
    procs = {
        100: _stat(100, "quicproxy", 1, 10, 5, 2, 1),  # 18 ticks
        101: _stat(101, "python3) (worker x", 100, 20, 10),  # 30: comm with ") (" and spaces
        102: _stat(102, "helper", 101, 1, 1),  # 2
        200: _stat(200, "other", 1, 1000, 1000),
        300: None,  # exited: directory without a readable stat
    }
    for pid, text in procs.items():
        (tmp_path / str(pid)).mkdir()
        if text:
            (tmp_path / str(pid) / "stat").write_text(text)
    (tmp_path / "self").mkdir()  # non-numeric entries are skipped
    return tmp_path


def test_tree_has_every_descendant_once(fake_proc: Path) -> None:
    assert sorted(proc_tree(100, fake_proc)) == [100, 101, 102]
    assert sorted(proc_tree([101, 100], fake_proc)) == [100, 101, 102]
    assert proc_tree(200, fake_proc) == [200]


def test_tree_cpu_sums_user_sys_and_reaped_children(fake_proc: Path) -> None:
    assert proc_tree_cpu_s(100, fake_proc, tick=100) == pytest.approx(0.50)
    assert proc_tree_cpu_s(101, fake_proc, tick=100) == pytest.approx(0.32)
    assert proc_tree_cpu_s([100, 200], fake_proc, tick=100) == pytest.approx(20.50)
    assert proc_tree_cpu_s(300, fake_proc, tick=100) == 0.0  # gone: counts nothing


def test_real_tree_includes_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in proc_tree(os.getpid())
        assert proc_tree_cpu_s(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_cpu_per_unit() -> None:
    assert cpu_per_unit(10.0, 10.5, 1000) == pytest.approx(500.0)  # µs per request
    assert cpu_per_unit(3.0, 5.0, 20) == pytest.approx(100_000.0)  # µs per MiB
    with pytest.raises(ValueError):
        cpu_per_unit(1.0, 2.0, 0)
    with pytest.raises(ValueError):
        cpu_per_unit(2.0, 1.0, 10)


class FakeOha:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def run(self, *args, **kw) -> list[Row]:
        return self.rows


def _target() -> Target:
    return Target("qp-1w", "quicproxy", server_pids=[4242], urls={"h3": "https://localhost:1"})


def _readings(monkeypatch, *values: float) -> list[list[int]]:
    seen: list[list[int]] = []
    it = iter(values)

    def fake(pids):
        seen.append(list(pids))
        return next(it)

    monkeypatch.setattr(workloads, "proc_tree_cpu_s", fake)
    return seen


def test_rps_counts_every_completed_request_for_cpu(monkeypatch) -> None:
    s = Settings(duration=2.0)
    inside = [Row(0.1, 0.01, 0.001, 1024, 200)] * 1000
    late = [Row(2.0, 0.01, 0.2, 1024, 200)] * 10  # ends after the window: CPU only
    seen = _readings(monkeypatch, 100.0, 100.505)
    got = workloads.rps_1k(FakeOha(inside + late), _target(), "h3", s)
    assert seen == [[4242], [4242]]  # before and after, on the server's tree
    assert got["rps_1k/h3"] == 500.0
    assert got["cpu_1k/h3"] == pytest.approx(0.505e6 / 1010)


def test_transfer_cpu_per_mib(monkeypatch) -> None:
    rows = [Row(i, 0.01, 0.5, BIG, 200) for i in range(3)]  # 3 x 10 MiB in 1.5 s
    _readings(monkeypatch, 7.0, 10.0)
    got = workloads.download(FakeOha(rows), _target(), "h3", Settings())
    assert got["dl_10m/h3"] == pytest.approx(20.0)
    assert got["cpu_dl_10m/h3"] == pytest.approx(3.0e6 / 30)


def test_no_server_process_means_no_cpu_row(monkeypatch) -> None:
    t = Target("x", "direct", urls={"h1": "http://localhost:1"})
    monkeypatch.setattr(workloads, "proc_tree_cpu_s", lambda pids: pytest.fail("metered"))
    got = workloads.rps_1k(FakeOha([Row(0.1, 0, 0.001, 1024, 200)] * 4), t, "h1", Settings())
    assert set(got) == {"rps_1k/h1"}
    assert not math.isnan(got["rps_1k/h1"])


def test_cpu_rows_in_the_report() -> None:
    runs = [{"caddy": {"cpu_1k/h3": 120.0}, "qp-1w": {"cpu_1k/h3": 600.0}}]
    rows = report.summarise(runs, ["caddy", "qp-1w"])
    md = report.markdown(rows, ["caddy", "qp-1w"], {}, {})
    assert "| server CPU per 1 KiB request, c=64, h3 | µs/req | 120 ±0% | 600 ±0% |" in md
    assert "5.00×" in md  # ratio to Caddy: lower is better for this row
