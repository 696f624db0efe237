"""Header rewriting between client and upstream: hop-by-hop removal, X-Forwarded-*,
and the framing fields, which are the proxy's.

Framing is decided per hop: a request goes upstream with exactly one framing field the
upstream pool computes (Content-Length or chunked, ``upstream._h1``), never the client's
beside it; a response leaves with the one Content-Length :func:`response_fields`
stands for, or none (h1 then chunks or closes, h2/h3 end the stream). Hop-by-hop fields
(Connection and the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade,
Transfer-Encoding, ...) stop here both ways; TE goes too, "trailers" included: trailers
are not carried through.
"""

from __future__ import annotations

import ipaddress

from ._h1wire import length_of
from ._model import Headers, Request, header_value

__all__ = [
    "HOP_BY_HOP",
    "strip_hop_by_hop",
    "TrustedProxies",
    "upstream_headers",
    "real_client",
    "FRAMING",
    "without_framing",
    "response_fields",
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
FRAMING = frozenset({"content-length", "transfer-encoding"})
"Fields that frame a message on HTTP/1.1: the sender of each hop writes its own."
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


def without_framing(headers: Headers) -> Headers:
    """``headers`` without Content-Length and Transfer-Encoding."""
    return [(k, v) for k, v in headers if k not in FRAMING]


def response_fields(method: str, status: int, headers: Headers, length: int | None) -> Headers:
    """A response's fields as the proxy sends them, on any protocol: hop-by-hop fields
    dropped, and one Content-Length that agrees with what follows, or none:

    - none on 1xx and 204 (RFC 9110 8.6: never sent there) and on 304 (a MAY there, and
      an h2/h3 client may hold it against the empty DATA);
    - on an answer to HEAD, the upstream's value when it is a number (the length a GET
      would have), as one field: no body follows on any protocol;
    - otherwise ``length``, the body's length when known (the upstream's framing, checked
      as the body is read), else none.
    """
    fields = [(k, v) for k, v in strip_hop_by_hop(headers) if k != "content-length"]
    if status < 200 or status in (204, 304):
        return fields
    declared = length_of(header_value(headers, "content-length"))
    value = declared if method == "HEAD" else length if length is not None else declared
    if value is not None:
        fields.append(("content-length", str(value)))
    return fields


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
