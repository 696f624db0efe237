"""Pseudo-header handling shared by the HTTP/2 and HTTP/3 adapters."""

from __future__ import annotations

from ._errors import BadRequest
from ._forward import strip_hop_by_hop
from ._model import Body, Headers, Request, decimal
from .upstream._tunnel import WEBSOCKET

__all__ = ["request_from_pseudo", "response_headers", "trailer_fields"]


def request_from_pseudo(
    raw: Headers,
    protocol: str,
    client: tuple[str, int],
    server: tuple[str, int],
    body: Body,
) -> Request:
    """Build a Request from an h2/h3 header list; BadRequest (a ValueError) if malformed.

    Semantics (CONNECT, target form, authority syntax, header bytes and count)
    are judged by the handler through ``_target.check_request``, as for h1, so
    every protocol answers them with the same status. CONNECT has no :scheme or
    :path (RFC 9113 8.5) and goes through to be refused there with 501. Extended
    CONNECT with ``:protocol: websocket`` (RFC 8441, RFC 9220) becomes a GET whose
    ``upgrade`` is 'websocket', as an HTTP/1.1 handshake does; another ``:protocol``
    stays a CONNECT (501)."""
    pseudo: dict[str, str] = {}
    headers: Headers = []
    cookies: list[str] = []
    for name, value in raw:
        if name.startswith(":"):
            if name in pseudo or headers:
                raise BadRequest(f"misplaced or repeated pseudo-header {name}")
            pseudo[name] = value
        elif name != name.lower():
            raise BadRequest(f"upper-case header name {name!r}")
        elif name == "cookie":
            cookies.append(value)  # split crumbs are joined again (RFC 9113 8.2.3)
        else:
            headers.append((name, value))
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    method = pseudo.get(":method")
    if not method:
        raise BadRequest("missing :method")
    protocol_token = pseudo.get(":protocol")
    upgrade = None
    if protocol_token is not None:
        if method != "CONNECT":
            raise BadRequest(":protocol on a request that is not CONNECT")
        if not pseudo.get(":scheme") or not pseudo.get(":path"):
            raise BadRequest("extended CONNECT without :scheme or :path")
        if protocol_token.lower() == WEBSOCKET:
            method, upgrade = "GET", WEBSOCKET
    for required in (":scheme", ":path"):
        if not pseudo.get(required) and method != "CONNECT":
            raise BadRequest(f"missing {required}")
    host = next((v for k, v in headers if k == "host"), None)
    authority = pseudo.get(":authority") or host
    if not authority:
        raise BadRequest("missing :authority")
    declared = next((v for k, v in headers if k == "content-length"), None)
    length = None if declared is None else decimal(declared)
    if declared is not None and length is None:
        raise BadRequest("bad content-length")
    return Request(
        method=method,
        scheme=pseudo.get(":scheme", "https"),
        authority=authority,
        target=pseudo.get(":path", ""),
        headers=[(k, v) for k, v in headers if k != "host"],
        protocol=protocol,
        client=client,
        server=server,
        body=body,
        content_length=length,
        upgrade=upgrade,
    )


def response_headers(status: int, headers: Headers) -> list[tuple[bytes, bytes]]:
    """The response's field list for h2 and h3, encoded: ``:status`` first, names in lower
    case, values without surrounding whitespace, connection-specific fields dropped
    (RFC 9113 8.2, RFC 9114 4.2). The only normalisation they get on either protocol."""
    fields = strip_hop_by_hop([(k.lower(), v.strip(" \t")) for k, v in headers])
    return [(b":status", b"%d" % status)] + [
        (k.encode("latin-1"), v.encode("latin-1")) for k, v in fields
    ]


def trailer_fields(trailers: Headers) -> list[tuple[bytes, bytes]]:
    """Trailer fields for h2 and h3, normalised as response fields, without pseudo-headers."""
    return response_headers(0, [(k, v) for k, v in trailers if not k.startswith(":")])[1:]
