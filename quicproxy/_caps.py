"""Per-client-address connection counting, shared by the TCP and QUIC listeners."""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["AddressCounter", "address_key"]


@functools.lru_cache(maxsize=4096)
def address_key(addr: str) -> str:
    """What one client is: its IPv4 address, or its IPv6 /64 (one host's usual share).

    IPv4-mapped IPv6 addresses count as the IPv4 address they carry. Each connection
    asks four times (its address's connection and handshake slots, taken and given
    back); the answers for the addresses seen last are kept (a few µs each otherwise)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressCounter:
    """Open connections per client address, at most ``limit`` each.

    Memory is bounded by the number of open connections: an address is
    forgotten when its last connection is released.

    >>> caps = AddressCounter(2)
    >>> caps.acquire("192.0.2.1"), caps.acquire("192.0.2.1"), caps.acquire("192.0.2.1")
    (True, True, False)
    >>> caps.release("192.0.2.1")
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self.refused = 0
        "Connections refused so far (for metrics and tests)."

    def acquire(self, addr: str) -> bool:
        """Count one more connection from ``addr``; False (not counted) when over the limit."""
        key = address_key(addr)
        count = self._open.get(key, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self._open[key] = count + 1
        return True

    def release(self, addr: str) -> None:
        """One connection from ``addr`` (acquired before) is gone."""
        key = address_key(addr)
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, addr: str) -> int:
        """Connections now counted for ``addr``."""
        return self._open.get(address_key(addr), 0)

    def __len__(self) -> int:
        """Addresses with at least one open connection."""
        return len(self._open)
