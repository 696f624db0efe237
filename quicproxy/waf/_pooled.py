"""What both inline engines share: transactions evaluated in the engine's thread pool."""

from __future__ import annotations

import asyncio
from typing import Any

from ._types import WafDecision, WafRequest

__all__ = ["PooledWaf"]


class PooledWaf:
    """A ``Waf`` over an engine with an ``executor`` (a thread pool) and ``close()``;
    subclasses name their transaction class."""

    transaction_class: Any

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def transaction(self, request: WafRequest) -> Any:
        return self.transaction_class(self.engine, request)

    async def evaluate(self, request: WafRequest, body: bytes = b"") -> WafDecision:
        """Whole-request verdict in one pool call."""
        tx = self.transaction_class(self.engine, request)

        def run() -> WafDecision:
            try:
                return tx.evaluate(body)
            finally:
                tx._end(None)

        return await asyncio.wrap_future(self.engine.executor.submit(run))

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
