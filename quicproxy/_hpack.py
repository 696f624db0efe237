"""HPACK strictness in front of jh2's decoder (Rust): a field block's structure is
checked before it is decoded.

RFC 7541 4.2 allows a dynamic table size update only at the start of a field block
and never above the SETTINGS_HEADER_TABLE_SIZE we sent; jh2's decoder accepts one
anywhere in the block. A truncated block makes that decoder panic (a Rust backtrace
on stderr) rather than fail. The walk here reads the representations' prefixes and
string lengths only (no Huffman decoding) and raises :class:`CompressionError`, which
jh2 turns into a GOAWAY with COMPRESSION_ERROR (RFC 9113 4.3); so does any other
decoding error of the block.
"""

from __future__ import annotations

from typing import Any

import jh2.connection
import jh2.exceptions
from jh2.errors import ErrorCodes

from ._fieldint import IntegerError, prefix_int

__all__ = ["CompressionError", "StrictDecoder", "check_block"]


_OVERSIZED: type[Exception] = jh2.connection.OversizedHeaderListError


class CompressionError(jh2.exceptions.ProtocolError):
    """A field block that cannot be decoded: a connection error of type COMPRESSION_ERROR."""

    error_code = ErrorCodes.COMPRESSION_ERROR


def _integer(block: bytes, at: int, prefix: int) -> tuple[int, int]:
    """The integer with an N-bit prefix at ``at`` (RFC 7541 5.1) and the offset after it."""
    try:
        return prefix_int(block, at, prefix, max_shift=28)
    except IntegerError as exc:
        raise CompressionError(f"field block: {exc}") from None


def _string(block: bytes, at: int) -> int:
    """The offset after the string literal at ``at``."""
    if at >= len(block):
        raise CompressionError("field block ends before a string")
    length, at = _integer(block, at, 7)
    at += length
    if at > len(block):
        raise CompressionError("field block ends inside a string")
    return at


def check_block(block: bytes, max_table_size: int) -> None:
    """Raise :class:`CompressionError` unless every representation in ``block`` is whole
    and table size updates come first and stay within ``max_table_size``."""
    at = 0
    end = len(block)
    while at < end and block[at] & 0xE0 == 0x20:
        size, at = _integer(block, at, 5)
        if size > max_table_size:
            raise CompressionError(
                f"dynamic table size update to {size}, above our {max_table_size}"
            )
    while at < end:
        first = block[at]
        if first & 0x80:  # indexed field line
            _, at = _integer(block, at, 7)
            continue
        if first & 0xE0 == 0x20:
            raise CompressionError("dynamic table size update after a field line")
        # literal: with incremental indexing (6-bit index), else without/never (4-bit)
        index, at = _integer(block, at, 6 if first & 0x40 else 4)
        if index == 0:
            at = _string(block, at)
        at = _string(block, at)


class StrictDecoder:
    """jh2's decoder behind :func:`check_block`; every decoding failure is a
    :class:`CompressionError` (an oversized header list stays jh2's own error)."""

    def __init__(self, decoder: Any, max_table_size: int) -> None:
        self._decoder = decoder
        self._max_table_size = max_table_size
        "SETTINGS_HEADER_TABLE_SIZE: kept here, the Rust decoder does not read it back."
        decoder.max_allowed_table_size = max_table_size

    @property
    def header_table_size(self) -> int:
        return int(self._decoder.header_table_size)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._decoder.header_table_size = value

    @property
    def max_allowed_table_size(self) -> int:
        return self._max_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._max_table_size = value
        self._decoder.max_allowed_table_size = value

    @property
    def max_header_list_size(self) -> int:
        return int(self._decoder.max_header_list_size)

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self._decoder.max_header_list_size = value

    def decode(self, data: bytes, raw: bool | None = None) -> Any:
        check_block(data, self._max_table_size)
        try:
            return self._decoder.decode(data, raw=raw)
        except _OVERSIZED:
            raise
        except Exception as exc:  # HPACKError and the like: the block is bad
            raise CompressionError(f"cannot decode a field block: {exc}") from None
        except BaseException as exc:
            # the Rust decoder's panic (pyo3's PanicException is a BaseException);
            # its text is not passed on: jh2 reads "index out of bounds" in it
            if type(exc).__name__ != "PanicException":
                raise
            raise CompressionError("cannot decode a field block") from None
