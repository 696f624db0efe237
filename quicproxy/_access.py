"""Access log: one line per request on stdout, JSON (default) or common log format.

The handler fills one :class:`AccessRecord` per request as it goes (route,
upstream, WAF verdict) and :class:`AccessLog` writes it once the response is
sent. Lines are written by a background thread (:class:`LineWriter`), whole
lines in writes of at most PIPE_BUF bytes, so several workers (and stderr) sharing
stdout never interleave inside a line, and a reader of stdout that stalls never
stalls the event loop: the lines waiting are bounded, those beyond are dropped and
counted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ._forward import TrustedProxies
from ._metrics import metrics
from ._model import Request, header_value

__all__ = ["AccessRecord", "AccessLog", "LineWriter", "request_id", "PROTOCOL_NAMES"]

PROTOCOL_NAMES = {"HTTP/1.1": "h1", "HTTP/1.0": "h1", "HTTP/2": "h2", "HTTP/3": "h3"}
_ID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_UNPRINTABLE = re.compile(r'[^\x21-\x7e]|["\\]')


class _Ids:
    """New request ids: 128 random bits as 32 hex digits, cut from 4 KiB of os.urandom at
    a time (one system call per 256 ids instead of one each)."""

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def __call__(self) -> str:
        if self._at >= len(self._hex):
            self._hex, self._at = os.urandom(4096).hex(), 0
        self._at += 32
        return self._hex[self._at - 32 : self._at]


new_id = _Ids()


def request_id(req: Request, trusted: TrustedProxies) -> str:
    """X-Request-Id of a trusted proxy when it is sane, else a new one."""
    if req.client[0] in trusted:
        given = header_value(req.headers, "x-request-id")
        if given and _ID_OK.match(given):
            return given
    return new_id()


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
    "The upstream member that answered: host:port, or https://host:port."
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

    def as_json(self) -> str:
        """``as_dict()`` as one JSON line (ASCII, no spaces), built directly: a request's
        line is written on the event loop, so it is cheap."""
        stamp = _second(int(self.started))
        millis = int((self.started % 1) * 1000)
        up_ms = "null" if self.upstream_time is None else repr(round(self.upstream_time * 1000, 3))
        return (
            f'{{"time":"{stamp}.{millis:03d}Z","request_id":{_str(self.request_id)},'
            f'"client":{_str(self.client)},"protocol":{_str(self.protocol)},'
            f'"method":{_str(self.method)},"host":{_str(self.host)},"path":{_str(self.path)},'
            f'"status":{int(self.status)},"bytes_in":{int(self.bytes_in)},'
            f'"bytes_out":{int(self.bytes_out)},"duration_ms":{round(self.duration * 1000, 3)!r},'
            f'"upstream":{_opt(self.upstream)},"upstream_ms":{up_ms},'
            f'"route":{_opt(self.route)},"waf":{_str(self.waf)},"waf_rule":{_opt(self.waf_rule)}}}'
        )

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


_str = json.encoder.encode_basestring_ascii
"A JSON string literal, quoted and escaped (json's own C function)."


@functools.lru_cache(maxsize=4)
def _second(when: int) -> str:
    """'2026-11-26T10:00:00' for a Unix second (the few seconds in use are kept)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))


def _opt(text: str | None) -> str:
    return "null" if text is None else _str(text)


def _clean(text: str) -> str:
    """Text safe inside a log line: no spaces, quotes or control characters."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:2048]) or "-"


PIPE_BUF = 4096
"A write of at most this many bytes to a pipe is never interleaved with another's."


def _atomic_chunks(lines: list[bytes]) -> Iterator[bytes]:
    """Whole lines joined into writes of at most PIPE_BUF bytes (a longer line alone), so
    writers sharing the pipe (other workers, stderr) never cut into a line."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > PIPE_BUF:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


class LineWriter:
    """Lines to a file descriptor, written by a background thread in batches.

    Calling it never blocks on the descriptor: at most ``limit`` bytes wait, and a
    line that would go beyond is dropped and counted (``dropped``, and the
    ``on_drop`` callback) until the reader catches up. The thread is woken by the
    first line of a batch only and lets the batch gather for ``linger`` seconds, so
    a busy proxy pays a lock and an append per line, not a thread hand-over. A line
    reaches the descriptor at most ``linger`` after the request ended: 0.1 s, against
    0.01 s before, cut the thread's CPU by ~60 % at 3,000 requests/s (~7 µs per
    request).
    """

    def __init__(
        self,
        fd: int = 1,
        limit: int = 4 << 20,
        on_drop: Callable[[], None] | None = None,
        linger: float = 0.1,
        name: str = "access-log",
    ) -> None:
        self.fd = fd
        self.name = name
        self.limit = limit
        self.on_drop = on_drop
        self.linger = linger
        self.dropped = 0
        self._lines: list[bytes] = []
        self._size = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._waiting = False
        "The thread waits for a first line (and must be woken)."
        self._closing = False

    def __call__(self, line: str) -> bool:
        """Queue ``line``; False when it was dropped."""
        data = (line + "\n").encode("utf-8", "replace")
        with self._cond:
            if self._closing or self._size + len(data) > self.limit:
                self.dropped += 1
                dropped = True
            else:
                dropped = False
                self._lines.append(data)
                self._size += len(data)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
                if self._waiting:
                    self._waiting = False
                    self._cond.notify()
        if dropped and self.on_drop is not None:
            self.on_drop()
        return not dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closing:
                    self._waiting = True
                    self._cond.wait()
                self._waiting = False
                if not self._lines:
                    return
                if not self._closing:
                    self._cond.wait(self.linger)  # let the batch gather (close() ends it)
                lines, self._lines = self._lines, []
            try:
                for chunk in _atomic_chunks(lines):
                    while chunk:
                        chunk = chunk[os.write(self.fd, chunk) :]
            except OSError:
                pass  # stdout gone (closed pipe): the requests themselves are not affected
            with self._cond:
                self._size -= sum(map(len, lines))

    def close(self, timeout: float = 2.0) -> None:
        """Write what waits (bounded by ``timeout``), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def _dropped() -> None:
    with contextlib.suppress(Exception):
        metrics.access_log_dropped.inc()


class AccessLog:
    """Formats and writes access lines; ``sink`` can be replaced (tests, library use)."""

    def __init__(self, fmt: str, sink: Callable[[str], object] | None = None) -> None:
        self.format = fmt
        self.sink: Callable[[str], object] = (
            sink if sink is not None else LineWriter(on_drop=_dropped)
        )

    def close(self) -> None:
        """Write the lines still waiting (the default stdout writer)."""
        if isinstance(self.sink, LineWriter):
            self.sink.close()

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
            line = rec.as_json()
        try:
            self.sink(line)
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): the request itself is not affected
