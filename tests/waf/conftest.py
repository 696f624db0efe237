"""WAF fixtures: a real ModSecurity engine loaded with the installed OWASP CRS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from quicproxy.waf import InlineWaf

from .helpers import inline_config


@pytest.fixture(scope="session")
def waf() -> Iterator[InlineWaf]:
    """Default settings: engine On, paranoia level 1, threshold 5."""
    engine = InlineWaf(inline_config())
    yield engine
    engine.engine.close()


@pytest.fixture
def make_waf() -> Iterator[Any]:
    """Build engines with other settings; closed after the test."""
    made: list[InlineWaf] = []

    def make(**extra: Any) -> InlineWaf:
        engine = InlineWaf(inline_config(**extra))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.engine.close()
