"""Coraza's verdict channel: bodiless requests go to the library as messages over a
SOCK_SEQPACKET socket and their verdicts come back the same way (no foreign call on the
event loop). Real library, real CRS 4 rules, real sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quicproxy.waf import CorazaWaf, WafUnavailable, inline_waf
from quicproxy.waf._channel import REQUEST_LIMIT
from tests.conftest import require_engine

from .helpers import inline_config, make_request

SQLI = "/?id=1%27%20OR%20%271%27=%271"


@pytest.fixture
async def coraza() -> AsyncIterator[Any]:
    require_engine("coraza")
    waf = inline_waf(inline_config(engine="coraza"))
    assert isinstance(waf, CorazaWaf)
    yield waf
    await waf.aclose()
    assert waf.engine.handle is None, "rule set not freed: a goroutine still used it"


async def verdict(waf: Any, uri: str, headers: list[tuple[str, str]] | None = None) -> Any:
    tx = waf.transaction(make_request("GET", uri, headers or [], has_body=False))
    try:
        decision = await tx.headers()
        return decision if decision is not None else await tx.finish()
    finally:
        await tx.close()


async def test_bodiless_verdicts_come_through_the_channel(coraza: Any) -> None:
    blocked, clean = await asyncio.gather(verdict(coraza, SQLI), verdict(coraza, "/products"))
    assert not blocked.allowed and blocked.status == 403 and "942100" in blocked.rule_ids
    assert clean.allowed and clean.rule_ids == []
    channel = coraza.engine.channel()
    assert channel.waiting == 0
    # Through the channel, not the pool: the pool never ran a job.
    assert coraza.engine.executor._work_queue.qsize() == 0
    assert not coraza.engine.executor._threads


async def test_a_request_too_large_for_a_message_is_evaluated_in_the_pool(coraza: Any) -> None:
    # Headers over the message limit; the attack is in the last one.
    filler = [(f"x-filler-{i}", "a" * 1000) for i in range(REQUEST_LIMIT // 1000 + 8)]
    decision = await verdict(coraza, "/", [*filler, ("cookie", "uid=1' OR '1'='1")])
    assert not decision.allowed and "942100" in decision.rule_ids
    assert coraza.engine.executor._threads, "the pool did not evaluate it"


async def test_a_full_channel_spills_to_the_pool_and_every_verdict_is_right(coraza: Any) -> None:
    channel = coraza.engine.channel()
    channel._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel's minimum
    uris = [SQLI if i % 3 == 0 else f"/catalog/{i}" for i in range(300)]
    decisions = await asyncio.gather(*(verdict(coraza, uri) for uri in uris))
    for uri, decision in zip(uris, decisions, strict=True):
        assert decision.allowed == (uri != SQLI), uri
        if uri == SQLI:
            assert "942100" in decision.rule_ids
    assert coraza.engine.executor._threads, "nothing spilled: the test did not fill the channel"


@pytest.mark.parametrize(
    "message",
    [
        struct.pack("<Q", 7),  # an id and nothing else
        struct.pack("<QII", 8, 1, 2) + struct.pack("<I", 10**6) + b"short",  # length past the end
        struct.pack("<QII", 9, 1, 2) + b"\xff" * 3,  # a length cut in half
    ],
)
async def test_a_malformed_message_gets_the_failure_code_not_a_crash(
    coraza: Any, message: bytes
) -> None:
    # (An empty message would read as the end of the channel; the proxy sends none.)
    channel = coraza.engine.channel()
    (ident,) = struct.unpack_from("<Q", message)
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    channel._waiting[ident] = answer
    channel._sock.send(message)
    status, nanos, text = await asyncio.wait_for(answer, 10)
    assert (status, text) == (-1, "")
    # The library is still there and still right.
    assert "942100" in (await verdict(coraza, SQLI)).rule_ids


async def test_a_failed_verdict_is_waf_unavailable(coraza: Any) -> None:
    tx = coraza.transaction(make_request("GET", "/", has_body=False))
    channel = coraza.engine.channel()
    # The library answers a message it cannot read with -1; make this request's one so.
    broken: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    tx._verdict = broken
    channel._waiting[10**9] = broken
    channel._sock.send(struct.pack("<Q", 10**9))
    with pytest.raises(WafUnavailable):
        await tx.headers()
    await tx.close()


async def test_closing_fails_waiting_verdicts_and_frees_the_rules(coraza: Any) -> None:
    txs = [coraza.transaction(make_request("GET", SQLI, has_body=False)) for _ in range(50)]
    coraza.engine.channel().close()  # e.g. shutdown while requests wait
    results = await asyncio.gather(*(tx.headers() for tx in txs), return_exceptions=True)
    for tx in txs:
        await tx.close()
    # Each either got its verdict before the close or WafUnavailable: never a hang.
    for result in results:
        assert isinstance(result, WafUnavailable) or "942100" in result.rule_ids
    assert any(isinstance(r, WafUnavailable) for r in results)
    # A new channel opens for the next request.
    assert "942100" in (await verdict(coraza, SQLI)).rule_ids
