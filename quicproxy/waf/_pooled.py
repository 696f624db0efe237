"""What both inline engines share: transactions evaluated in the engine's thread pool,
and the body limit of their rule set (``body_limit``, lower on a route with its own)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import BodyTooLarge
from ._types import WafDecision, WafRequest

__all__ = ["PooledWaf", "PooledTransaction", "stamp"]

T = TypeVar("T")


def stamp(decision: WafDecision, engine: Any) -> WafDecision:
    """``decision`` with the engine's name and the levels of the policy it evaluated."""
    config = engine.config
    decision.engine = engine.name
    decision.paranoia_level = config.paranoia_level
    decision.detection_paranoia_level = max(
        config.detection_paranoia_level or 0, config.paranoia_level
    )
    decision.anomaly_threshold = config.anomaly_threshold
    return decision


class PooledTransaction:
    """The life of one transaction whose engine calls run in the engine's pool
    (implements ``WafTransaction``). Subclasses supply the engine calls:
    ``_start`` (connection, URI, headers), ``_take`` (a body chunk, on the loop),
    ``_finish_body``, ``_decision``, ``_release`` and ``_open``."""

    def __init__(self, engine: Any, request: WafRequest) -> None:
        self._engine = engine
        self._request = request
        self._blocked: int | None = None
        self._started = False
        self._finished = False
        self._closed = False
        self._pending: concurrent.futures.Future[Any] | None = None
        self._fed = 0
        "Body bytes handed to the engine."
        self.engine_seconds = 0.0

    # -- engine calls, by the subclass -------------------------------------------------

    def _start(self) -> None:
        raise NotImplementedError

    def _take(self, data: bytes) -> None:
        raise NotImplementedError

    def _finish_body(self) -> None:
        raise NotImplementedError

    def _decision(self) -> WafDecision:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    @property
    def _open(self) -> bool:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------

    async def _run(self, func: Callable[[], T]) -> T:
        self._pending = self._engine.executor.submit(self._timed, func)
        return await asyncio.wrap_future(self._pending)

    def _timed(self, func: Callable[[], T]) -> T:
        """In the pool: run ``func`` and add its duration to ``engine_seconds``."""
        start = time.perf_counter()
        try:
            return func()
        finally:
            self.engine_seconds += time.perf_counter() - start

    def _start_and_finish(self) -> None:
        self._start()
        if self._blocked is None:
            self._finish_body()
        self._finished = True

    def _end(self, previous: concurrent.futures.Future[Any] | None) -> None:
        if previous is not None:
            concurrent.futures.wait([previous])
        if self._open:
            self._release()

    def begin(self) -> None:
        """Start evaluating a bodiless request now (every phase in one pool call);
        ``headers()`` then awaits it."""
        if self._request.has_body or self._pending is not None:
            return
        with contextlib.suppress(RuntimeError):  # engine closed: headers() reports it
            self._pending = self._engine.executor.submit(self._timed, self._start_and_finish)

    async def headers(self) -> WafDecision | None:
        self._started = True
        if self._pending is not None:  # begun
            await asyncio.wrap_future(self._pending)
        elif self._request.has_body:
            await self._run(self._start)
        else:  # nothing to wait for: every phase in one pool call
            await self._run(self._start_and_finish)
        return None if self._blocked is None else self._decision()

    async def body_chunk(self, data: bytes) -> None:
        """Hand a body chunk to the engine, up to the rule set's ``body_limit``: past it,
        BodyTooLarge (413) with ``over_limit: reject``, else the rest is not inspected.
        (The caller feeds at most the global limit; a route's own may be lower.)"""
        if not self._started:
            await self.headers()
        config = self._engine.config
        room = config.body_limit - self._fed
        if len(data) > room:
            if config.over_limit == "reject":
                raise BodyTooLarge(
                    f"request body over the WAF inspection limit ({config.body_limit} bytes)"
                )
            data = data[: max(room, 0)]
        self._fed += len(data)
        if self._blocked is None and data:
            self._take(data)

    async def finish(self) -> WafDecision:
        if not self._started:
            await self.headers()
        if self._blocked is None and self._open and not self._finished:
            await self._run(self._finish_body)
        return self._decision()

    async def close(self) -> None:
        """Queue the logging phase and the release in the pool; the caller does not wait.

        The queued job first waits for any call still running (e.g. after a
        cancelled ``finish()``), so the engine's transaction is never freed under it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._engine.executor.submit(self._end, self._pending)
        except RuntimeError:  # engine already closed: nothing left to release into
            pass


class PooledWaf:
    """A ``Waf`` over an engine with an ``executor`` (a thread pool) and ``close()``;
    subclasses name their transaction class."""

    transaction_class: Any

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def transaction(self, request: WafRequest) -> Any:
        """A transaction; a bodiless request's evaluation has already started."""
        tx = self.transaction_class(self.engine, request)
        tx.begin()
        return tx

    def evaluate_here(self, request: WafRequest, body: bytes = b"") -> WafDecision:
        """Whole-request verdict in the calling thread: the engine's own cost, no pool."""
        tx = self.transaction_class(self.engine, request)
        try:
            return tx.evaluate(body)
        finally:
            tx._end(None)

    async def evaluate(self, request: WafRequest, body: bytes = b"") -> WafDecision:
        """Whole-request verdict in one pool call."""
        run = self.evaluate_here
        return await asyncio.wrap_future(self.engine.executor.submit(run, request, body))

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
