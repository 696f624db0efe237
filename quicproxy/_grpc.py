"""gRPC as the proxy sees it: which requests are gRPC, their ``grpc-timeout``, and the
gRPC form of the proxy's own error answers.

gRPC rides on HTTP/2 (and HTTP/3) with trailers; the proxy forwards it as any other
request to an HTTP/2 backend (``h2c://``, or ``https://`` whose ALPN chose h2). Only two
things differ: an error the proxy itself makes is answered as gRPC expects (HTTP 200,
``content-type: application/grpc``, ``grpc-status`` and ``grpc-message`` in one
trailers-only HEADERS frame), and the request's ``grpc-timeout`` bounds the time the
proxy waits for the backend.
"""

from __future__ import annotations

import re

from ._model import Body, Headers, Request, Response, header_value

__all__ = ["is_grpc", "grpc_timeout", "grpc_error", "grpc_trailers", "GRPC_STATUS"]

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")

GRPC_STATUS = {
    403: 7,  # PERMISSION_DENIED (the WAF refused it)
    429: 8,  # RESOURCE_EXHAUSTED (rate limited)
    502: 14,  # UNAVAILABLE
    503: 14,
    504: 4,  # DEADLINE_EXCEEDED
}
"HTTP status of a proxy error to the gRPC status code it is answered with; else 13."


def is_grpc(req: Request) -> bool:
    """A gRPC request: ``content-type: application/grpc`` or ``application/grpc+...``."""
    ctype = (header_value(req.headers, "content-type") or "").lower()
    return ctype.startswith("application/grpc") and (len(ctype) == 16 or ctype[16] in "+;")


def grpc_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` value (at most 8 digits and a unit), else None."""
    if value is None:
        return None
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)]


def grpc_trailers(status: int, reason: str) -> Headers:
    """``grpc-status`` and ``grpc-message`` for the proxy's error ``status``."""
    code = GRPC_STATUS.get(status, 13)
    return [("grpc-status", str(code)), ("grpc-message", _percent(f"{status} {reason}"))]


def grpc_error(status: int, reason: str) -> Response:
    """The proxy's error ``status`` as a gRPC trailers-only response."""
    headers: Headers = [("content-type", "application/grpc"), *grpc_trailers(status, reason)]
    return Response(200, headers, Body.empty(), 0, generated=True)


def _percent(text: str) -> str:
    """grpc-message is percent-encoded outside printable ASCII (and '%' itself)."""
    return "".join(c if " " <= c <= "~" and c != "%" else f"%{ord(c):02X}" for c in text)
