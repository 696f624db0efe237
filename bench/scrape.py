"""Histograms read off a target's /metrics, and quantiles of what they counted in a window.

The WAF's own figures come from inside the proxy (``quicproxy_waf_engine_seconds``: the
engine's evaluation; ``quicproxy_waf_wait_seconds``: what a bodiless request waited on the
WAF beyond it), so "what the WAF adds beyond the engine" is measured on the same requests
instead of as a difference between two noisy end-to-end runs.
"""

from __future__ import annotations

import re
import urllib.request

__all__ = ["buckets", "quantile"]

_SAMPLE = re.compile(r"^(\w+)_bucket\{(.*?)\} ([0-9.eE+-]+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Buckets = dict[float, float]
"Upper bound (seconds, inf last) -> cumulative count."


def parse(text: str, name: str, **labels: str) -> Buckets:
    """The cumulative buckets of histogram ``name`` whose labels include ``labels``."""
    out: Buckets = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(_LABEL.findall(m.group(2)))
        if all(got.get(k) == v for k, v in labels.items()) and "le" in got:
            out[float(got["le"])] = out.get(float(got["le"]), 0.0) + float(m.group(3))
    return dict(sorted(out.items()))


def buckets(url: str, name: str, **labels: str) -> Buckets:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse(r.read().decode(), name, **labels)


def quantile(before: Buckets, after: Buckets, q: float) -> float:
    """The q-quantile (0..1) of what was observed between two readings, interpolated
    linearly inside its bucket (as Prometheus' histogram_quantile). Raises ValueError
    when nothing was observed."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        raise ValueError("nothing observed in the window")
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            inside = cum - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cum
    return lower
