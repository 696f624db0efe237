"""The request model's body stream."""

from __future__ import annotations

from quicproxy._model import READ_JOIN, Body


async def test_a_read_takes_what_has_arrived_joined_and_credits_all_of_it():
    consumed: list[int] = []
    body = Body(on_consumed=consumed.append)
    for part in (b"a" * 1300, b"b" * 1300, b"c" * 5):
        body.feed(part)
    assert await body.read() == b"a" * 1300 + b"b" * 1300 + b"c" * 5
    assert consumed == [2605] and body.buffered == 0
    body.feed(b"late")
    body.end()
    assert await body.read() == b"late"
    assert await body.read() == b""


async def test_a_joined_read_stops_at_the_limit_and_keeps_the_order():
    body = Body()
    size = 1350
    count = READ_JOIN // size + 5
    parts = [bytes([i % 251]) * size for i in range(count)]
    for part in parts:
        body.feed(part)
    body.end()
    reads = [chunk async for chunk in body]
    assert b"".join(reads) == b"".join(parts)
    assert all(len(r) <= READ_JOIN for r in reads)
    assert len(reads[0]) == (READ_JOIN // size) * size and len(reads) == 2


async def test_a_chunk_larger_than_the_limit_is_not_split():
    body = Body()
    body.feed(b"x" * (READ_JOIN + 1))
    body.feed(b"y")
    assert len(await body.read()) == READ_JOIN + 1
    assert await body.read() == b"y"
