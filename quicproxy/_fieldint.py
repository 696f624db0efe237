"""The prefixed integer of HPACK and QPACK field blocks (RFC 7541 §5.1, RFC 9204 §4.1.1),
read in one place for both checks (``_hpack.py``, ``quic/_h3gate.py``)."""

from __future__ import annotations

__all__ = ["IntegerError", "prefix_int"]


class IntegerError(ValueError):
    """The block ends inside the integer, or the integer is larger than allowed."""


def prefix_int(data: bytes, pos: int, bits: int, max_shift: int = 56) -> tuple[int, int]:
    """The integer with a ``bits``-bit prefix at ``pos`` and the position after it. Its
    continuation bytes may carry at most ``max_shift`` bits (a long run of them would make
    an ever larger number: bounded work per block)."""
    if pos >= len(data):
        raise IntegerError("block ends before an integer")
    mask = (1 << bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise IntegerError("block ends inside an integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > max_shift:
            raise IntegerError("integer too large")
