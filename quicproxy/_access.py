"""Access log: one line per request on stdout, JSON (default) or common log format.

The handler fills one :class:`AccessRecord` per request as it goes (route,
upstream, WAF verdict) and :class:`AccessLog` writes it once the response is
sent. Lines go out with one ``write`` each, so several workers sharing stdout
never interleave inside a line.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ._forward import TrustedProxies
from ._model import Request, header_value

__all__ = ["AccessRecord", "AccessLog", "request_id", "PROTOCOL_NAMES"]

PROTOCOL_NAMES = {"HTTP/1.1": "h1", "HTTP/1.0": "h1", "HTTP/2": "h2", "HTTP/3": "h3"}
_ID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_UNPRINTABLE = re.compile(r'[^\x21-\x7e]|["\\]')


def request_id(req: Request, trusted: TrustedProxies) -> str:
    """X-Request-Id of a trusted proxy when it is sane, else a new one."""
    if req.client[0] in trusted:
        given = header_value(req.headers, "x-request-id")
        if given and _ID_OK.match(given):
            return given
    return uuid.uuid4().hex


@dataclass
class AccessRecord:
    """What one request did; filled while it is handled."""

    request_id: str
    client: str
    protocol: str
    method: str
    host: str
    path: str
    started: float
    "time.time() when the request arrived."
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    upstream: str | None = None
    "host:port of the upstream member that answered."
    upstream_time: float | None = None
    "Seconds until the upstream's response headers."
    route: str | None = None
    waf: str = "off"
    "off, allow, detect, block, unavailable or fail_open."
    waf_rule: str | None = None
    rate_limited: bool = False

    def as_dict(self) -> dict[str, object]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started))
        millis = int((self.started % 1) * 1000)
        return {
            "time": f"{stamp}.{millis:03d}Z",
            "request_id": self.request_id,
            "client": self.client,
            "protocol": self.protocol,
            "method": self.method,
            "host": self.host,
            "path": self.path,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.duration * 1000, 3),
            "upstream": self.upstream,
            "upstream_ms": None
            if self.upstream_time is None
            else round(self.upstream_time * 1000, 3),
            "route": self.route,
            "waf": self.waf,
            "waf_rule": self.waf_rule,
        }

    def as_common(self) -> str:
        """Common log format, then the extra fields as key=value."""
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(self.started))
        line = (
            f'{_clean(self.client)} - - [{when}] "{_clean(self.method)} {_clean(self.path)} '
            f'{self.protocol}" {self.status} {self.bytes_out}'
        )
        extra = {
            "host": self.host,
            "rid": self.request_id,
            "in": self.bytes_in,
            "dur_ms": round(self.duration * 1000, 3),
            "upstream": self.upstream or "-",
            "up_ms": "-" if self.upstream_time is None else round(self.upstream_time * 1000, 3),
            "route": self.route or "-",
            "waf": self.waf,
            "rule": self.waf_rule or "-",
        }
        return line + "".join(f" {k}={_clean(str(v))}" for k, v in extra.items())


def _clean(text: str) -> str:
    """Text safe inside a log line: no spaces, quotes or control characters."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:2048]) or "-"


def _stdout(line: str) -> None:
    data = (line + "\n").encode("utf-8", "replace")
    while data:
        data = data[os.write(1, data) :]


class AccessLog:
    """Formats and writes access lines; ``sink`` can be replaced (tests, library use)."""

    def __init__(self, fmt: str, sink: Callable[[str], None] = _stdout) -> None:
        self.format = fmt
        self.sink = sink

    def start(self, req: Request, client: str, rid: str) -> AccessRecord:
        return AccessRecord(
            request_id=rid,
            client=client,
            protocol=PROTOCOL_NAMES.get(req.protocol, req.protocol),
            method=req.method,
            host=req.host,
            path=req.path,
            started=time.time(),
        )

    def write(self, rec: AccessRecord) -> None:
        if self.format == "off":
            return
        if self.format == "common":
            line = rec.as_common()
        else:
            line = json.dumps(rec.as_dict(), ensure_ascii=True, separators=(",", ":"))
        try:
            self.sink(line)
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): the request itself is not affected
