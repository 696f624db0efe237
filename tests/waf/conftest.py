"""WAF fixtures: each real engine (Coraza + CRS 4, ModSecurity + Debian CRS) with its CRS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from quicproxy.waf import CorazaWaf, InlineWaf, inline_waf

from .helpers import inline_config


@pytest.fixture(scope="session")
def waf(waf_engine: str) -> Iterator[CorazaWaf | InlineWaf]:
    """Default settings: rule engine On, paranoia level 1, threshold 5."""
    engine = inline_waf(inline_config(engine=waf_engine))
    yield engine
    engine.engine.close()


@pytest.fixture
def make_waf(waf_engine: str) -> Iterator[Any]:
    """Build engines with other settings; closed after the test."""
    made: list[CorazaWaf | InlineWaf] = []

    def make(**extra: Any) -> CorazaWaf | InlineWaf:
        engine = inline_waf(inline_config(**{"engine": waf_engine, **extra}))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.engine.close()
