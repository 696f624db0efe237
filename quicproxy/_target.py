"""Request target and host validation: HTTP semantics checked once at the edge.

Every protocol ends in :func:`check_request` (called by the handler before
anything else looks at a request), so h1, h2 and h3 refuse the same requests
with the same status:

- CONNECT gets 501: this is a reverse proxy, not a tunnel.
- The target is origin-form (``/path?query``); ``*`` only with OPTIONS, which
  the proxy answers itself (:func:`options_response`) and never forwards.
- The authority (Host or :authority) is a host name or IP literal with an
  optional numeric port. Host names are stricter than RFC 3986 reg-name:
  letters, digits and ``-._~`` only (no percent-encoding, sub-delims or
  userinfo), so nothing else can end up in a redirect or a routing decision.
- Method and header names are tokens; header values are visible ASCII, space,
  tab and UTF-8 text (obs-text, RFC 9110 §5.5: ``Café`` is common in the wild and
  passed on byte for byte); control bytes and bytes over 0x7F that are not UTF-8
  get 400 on every protocol alike (HTTP/3's QPACK decoder refuses them too), so
  every value can be written upstream as it came.
- At most ``max_fields`` header fields (431).

HTTP/1.1 has an absolute form (``GET http://host/path``); :func:`origin_form`
turns it into origin-form and checks it names the same host as Host.
"""

from __future__ import annotations

import ipaddress
import re

from ._errors import BadRequest, HeadersTooLarge, MethodNotSupported
from ._model import Headers, Request, Response

__all__ = ["check_request", "check_authority", "origin_form", "options_response"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_REG_NAME = re.compile(r"[A-Za-z0-9._~-]{1,253}")
_PORT = re.compile(r"[0-9]{1,5}")
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def split_authority(authority: str) -> tuple[str, int | None]:
    """(host, port) of a valid authority, host lower-case; BadRequest otherwise."""
    shown = repr(authority[:100])
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        try:
            if "%" in host:
                raise ValueError("zone identifiers have no place in a URI authority")
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadRequest(f"bad IP literal in authority {shown}") from None
        host = f"[{host}]"
        if not bracket or (rest and not rest.startswith(":")):
            raise BadRequest(f"bad authority {shown}")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = authority.partition(":")
        if not _REG_NAME.fullmatch(host):
            raise BadRequest(f"bad host in authority {shown}")
        port = port_text if colon else None
    if port is None:
        return host.lower(), None
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise BadRequest(f"bad port in authority {shown}")
    return host.lower(), int(port)


def check_authority(authority: str) -> str:
    """``authority`` if it is ``host`` or ``host:port`` (RFC 3986, stricter); else BadRequest."""
    split_authority(authority)
    return authority


def origin_form(method: str, target: str, host: str | None) -> tuple[str, str | None]:
    """(origin-form target, authority) for an HTTP/1.1 request target.

    Absolute-form gives its path and its authority, which must name the same
    host and port as the Host header; other forms come back unchanged (and are
    judged by :func:`check_request`)."""
    lower = target[:8].lower()
    if not (lower.startswith("http://") or lower.startswith("https://")):
        return target, host
    scheme, rest = target.split("://", 1)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    default = 443 if scheme.lower() == "https" else 80
    name, port = split_authority(authority)
    if host is not None:
        other, other_port = split_authority(host)
        if (name, port or default) != (other, other_port or default):
            raise BadRequest(f"absolute target for {authority!r} but Host is {host!r}")
    return path, authority


def check_fields(headers: Headers, max_fields: int) -> None:
    """Header count (431), names (tokens) and values (visible ASCII, UTF-8) (400)."""
    if len(headers) > max_fields:
        raise HeadersTooLarge(f"{len(headers)} header fields, over the limit of {max_fields}")
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise BadRequest(f"bad header name {name[:100]!r}")
        if not _VALUE.fullmatch(value) or not (value.isascii() or _utf8(value)):
            raise BadRequest(f"bad byte in the value of header {name!r}")


def _utf8(value: str) -> bool:
    """A value's bytes (decoded as latin-1) are UTF-8 text."""
    try:
        value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True


def check_request(req: Request, max_fields: int) -> None:
    """Refuse what no protocol may forward (see the module docstring)."""
    if not _TOKEN.fullmatch(req.method):
        raise BadRequest(f"bad method {req.method[:100]!r}")
    if req.method == "CONNECT":
        raise MethodNotSupported("CONNECT is not supported (this is not a forward proxy)")
    if req.target == "*":
        if req.method != "OPTIONS":
            raise BadRequest(f"target * with {req.method}")
    elif not _TARGET.fullmatch(req.target):
        raise BadRequest(f"target {req.target[:100]!r} is not origin-form (/path?query)")
    check_authority(req.authority)
    check_fields(req.headers, max_fields - 1)  # Host / :authority is a field too


def options_response() -> Response:
    """The proxy's own answer to ``OPTIONS *``."""
    return Response(200, [("allow", _ALLOW), ("content-length", "0")], content_length=0)
