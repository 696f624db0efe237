"""Block rate and false-positive rate of each engine at paranoia level 1 on the corpus:
raw CRS (``extra_detection`` off, its recorded misses) and with our detection rules."""

from __future__ import annotations

from typing import Any

import pytest

from quicproxy._config import WafExclusion

from .corpus import ATTACKS, BENIGN, CORPUS_SETTINGS, EXPECTED_MISSES
from .helpers import evaluate


def corpus_waf(make_waf: Any, **extra: Any) -> Any:
    exclusions = [WafExclusion(**e) for e in CORPUS_SETTINGS["exclusions"]]
    return make_waf(exclusions=exclusions, **extra)


async def corpus_rates(waf: Any) -> tuple[list[str], list[str]]:
    missed = []
    for name, method, uri, headers, body in ATTACKS:
        if (await evaluate(waf, method, uri, headers, body)).allowed:
            missed.append(name)
    false_positives = []
    for name, method, uri, headers, body in BENIGN:
        decision = await evaluate(waf, method, uri, headers, body)
        if not decision.allowed:
            false_positives.append(f"{name} {decision.rule_ids}")
    return missed, false_positives


async def test_corpus_rates(make_waf: Any, waf_engine: str) -> None:
    waf = corpus_waf(make_waf, extra_detection=False)
    missed, false_positives = await corpus_rates(waf)
    blocked = len(ATTACKS) - len(missed)
    print(
        f"\nWAF corpus, {waf_engine} CRS {waf.engine.crs_release} PL1: blocked "
        f"{blocked}/{len(ATTACKS)} attacks ({blocked / len(ATTACKS):.1%}), false positives "
        f"{len(false_positives)}/{len(BENIGN)} ({len(false_positives) / len(BENIGN):.1%}); "
        f"missed: {missed}"
    )
    assert sorted(missed) == sorted(EXPECTED_MISSES[waf_engine])
    assert false_positives == []


async def test_extra_detection_closes_the_misses(make_waf: Any, waf_engine: str) -> None:
    # The shipped rules (default on) catch what raw CRS PL1 lets through on both
    # engines (the short pipe, Log4Shell in headers on CRS 3...), with no new false
    # positive on the ordinary traffic.
    missed, false_positives = await corpus_rates(corpus_waf(make_waf))
    assert missed == []
    assert false_positives == []


@pytest.mark.parametrize("waf_engine", ["coraza"], indirect=True)  # recorded for CRS 4
async def test_coraza_misses_are_caught_at_a_higher_paranoia_level(
    make_waf: Any, waf_engine: str
) -> None:
    # Each attack Coraza + CRS 4 lets through at PL1 has only a higher-level rule.
    for name, level in EXPECTED_MISSES["coraza"].items():
        paranoia, rule_id = int(level[2]), level.split("(")[1].rstrip(")")
        waf = corpus_waf(make_waf, paranoia_level=paranoia, extra_detection=False)
        case = next(c for c in ATTACKS if c[0] == name)
        decision = await evaluate(waf, *case[1:])
        assert not decision.allowed and rule_id in decision.rule_ids, (name, decision)
