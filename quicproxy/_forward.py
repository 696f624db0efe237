"""Header rewriting between client and upstream: hop-by-hop removal, X-Forwarded-*."""

from __future__ import annotations

import ipaddress

from ._model import Headers, Request

__all__ = [
    "HOP_BY_HOP",
    "strip_hop_by_hop",
    "TrustedProxies",
    "upstream_headers",
    "real_client",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)
_FORWARDED = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded"}
)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop hop-by-hop headers and any header the Connection header names."""
    named = {
        token.strip().lower()
        for key, value in headers
        if key == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


class TrustedProxies:
    """A set of networks, ``addr in nets``: the peers whose X-Forwarded-* headers are
    believed, and the rate limiter's allow-list."""

    def __init__(self, nets: list[str]) -> None:
        self._nets = [ipaddress.ip_network(n, strict=False) for n in nets]

    def __contains__(self, addr: str) -> bool:
        if not self._nets:
            return False
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._nets)


def real_client(req: Request, trusted: TrustedProxies) -> str:
    """The client's address: the peer, or when the peer is a trusted proxy the
    right-most X-Forwarded-For entry that is not itself a trusted proxy."""
    peer = req.client[0]
    if peer not in trusted:
        return peer
    hops = [h.strip() for k, v in req.headers if k == "x-forwarded-for" for h in v.split(",")]
    for hop in reversed(hops):
        try:
            addr = str(ipaddress.ip_address(hop.split("%", 1)[0]))
        except ValueError:
            return peer  # a garbled list: trust nothing left of it
        if addr not in trusted:
            return addr
    return hops[0] if hops else peer


def upstream_headers(req: Request, trusted: TrustedProxies) -> Headers:
    """Headers to send upstream: Host kept, hop-by-hop removed, X-Forwarded-* set."""
    peer = req.client[0]
    kept = strip_hop_by_hop(req.headers)
    out: Headers = [("host", req.authority)]
    if peer in trusted:
        previous = [v for k, v in kept if k == "x-forwarded-for"]
        xff = ", ".join(previous + [peer])
        proto = next((v for k, v in kept if k == "x-forwarded-proto"), req.scheme)
        fhost = next((v for k, v in kept if k == "x-forwarded-host"), req.authority)
        real = next((v for k, v in kept if k == "x-real-ip"), peer)
        out += [(k, v) for k, v in kept if k == "forwarded"]
    else:
        xff, proto, fhost, real = peer, req.scheme, req.authority, peer
    out += [(k, v) for k, v in kept if k not in _FORWARDED and k != "host"]
    out += [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", proto),
        ("x-forwarded-host", fhost),
        ("x-real-ip", real),
    ]
    return out
