"""Block rate and false-positive rate of the default settings on the corpus."""

from __future__ import annotations

from quicproxy.waf import InlineWaf

from .corpus import ATTACKS, BENIGN
from .helpers import evaluate


async def test_corpus_rates(waf: InlineWaf) -> None:
    missed = []
    for name, method, uri, headers, body in ATTACKS:
        if (await evaluate(waf, method, uri, headers, body)).allowed:
            missed.append(name)
    false_positives = []
    for name, method, uri, headers, body in BENIGN:
        decision = await evaluate(waf, method, uri, headers, body)
        if not decision.allowed:
            false_positives.append(f"{name} {decision.rule_ids}")
    block_rate = 1 - len(missed) / len(ATTACKS)
    fp_rate = len(false_positives) / len(BENIGN)
    print(
        f"\nWAF corpus: blocked {len(ATTACKS) - len(missed)}/{len(ATTACKS)} attacks "
        f"({block_rate:.1%}), false positives {len(false_positives)}/{len(BENIGN)} "
        f"({fp_rate:.1%}); missed: {missed}"
    )
    assert block_rate >= 0.95, missed
    assert false_positives == []
