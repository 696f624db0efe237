"""The heap trimmer (_memtrim.py): trims once enough connections closed, counted (TCP) or
seen going (QUIC: the number open falling), and not otherwise."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from quicproxy._memtrim import Trimmer, _malloc_trim


@pytest.mark.skipif(_malloc_trim() is None, reason="no malloc_trim in this C library")
async def test_trims_after_enough_closed_connections_only():
    open_now = [10]
    trimmer = Trimmer(lambda: open_now[0], interval=0.05, threshold=4)
    trimmer.start()
    try:
        await asyncio.sleep(0.2)
        assert trimmer.trims == 0  # nothing closed
        trimmer.closed(3)
        await asyncio.sleep(0.2)
        assert trimmer.trims == 0 and trimmer.pending == 3  # below the threshold
        trimmer.closed()
        await asyncio.sleep(0.2)
        assert trimmer.trims == 1 and trimmer.pending == 0
        open_now[0] = 2  # eight QUIC connections went
        await asyncio.sleep(0.2)
        assert trimmer.trims == 2
    finally:
        trimmer.stop()


def test_a_trim_collects_the_cycles_closed_connections_leave():
    """A closed QUIC connection is reference cycles: reference counting alone never frees
    it, the trim's collection does (whatever generation it reached)."""

    class Node:
        pass

    gc.disable()
    try:
        node = Node()
        node.me = node  # type: ignore[attr-defined]
        ref = weakref.ref(node)
        del node
        assert ref() is not None
        Trimmer(lambda: 0).trim()
        assert ref() is None
    finally:
        gc.enable()
