"""Quantiles of a window read off real prometheus_client histograms."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench import scrape


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    reg = CollectorRegistry()
    h = Histogram("x_seconds", "x", ["engine"], buckets=(0.001, 0.002, 0.004), registry=reg)
    return reg, h


def _read(reg: CollectorRegistry, engine: str = "a") -> scrape.Buckets:
    return scrape.parse(generate_latest(reg).decode(), "x_seconds", engine=engine)


def test_quantile_counts_only_the_window_and_interpolates():
    reg, h = _histogram()
    for _ in range(100):
        h.labels("a").observe(0.0035)  # before the window: must not count
    h.labels("b").observe(0.0001)  # other label: must not count
    before = _read(reg)
    for v in (0.0005, 0.0015, 0.0015, 0.0015):
        h.labels("a").observe(v)
    after = _read(reg)
    assert after[float("inf")] == 104
    # rank 2 of 4: the 1st of 3 in (0.001, 0.002] -> 0.001 + 0.001 * 1/3
    assert scrape.quantile(before, after, 0.5) == pytest.approx(0.001 + 0.001 / 3)
    assert scrape.quantile(before, after, 0.25) == pytest.approx(0.001)


def test_quantile_of_an_empty_window_fails():
    reg, h = _histogram()
    h.labels("a").observe(0.001)
    with pytest.raises(ValueError):
        scrape.quantile(_read(reg), _read(reg), 0.5)


def test_beyond_the_last_bound_is_the_last_bound():
    reg, h = _histogram()
    before = _read(reg)
    h.labels("a").observe(9.0)
    assert scrape.quantile(before, _read(reg), 0.5) == 0.004
