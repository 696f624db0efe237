"""Probes for the conformance checks: HTTP/1.1 (plain and TLS) and HTTP/3 (aioquic).

Self-contained (stdlib + aioquic) so the same file runs in the test process and, piped
as `python3 -c SOURCE JSON` exec'd inside a pod of the image under test:

    python3 _probe.py '[{"proto": "h3", "host": "10.0.0.1", "port": 443, "path": "/"}]'

prints one JSON result per request.  The HTTP/3 client performs a real QUIC handshake
(ALPN h3) and reports the negotiated ALPN, so a check can tell QUIC actually worked.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import cast

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamReset


@dataclass
class H3Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    alpn: str | None
    tls_version: str = "TLSv1.3"
    extra: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.alpn: str | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._headers: dict[int, list[tuple[str, str]]] = {}
        self._body: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.alpn = event.alpn_protocol
        if isinstance(event, StreamReset) and event.stream_id in self._waiters:
            fut = self._waiters.pop(event.stream_id)
            if not fut.done():
                fut.set_exception(ConnectionError(f"stream reset (error {event.error_code})"))
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        sid = getattr(event, "stream_id", None)
        if sid is None or sid not in self._waiters:
            return
        if isinstance(event, HeadersReceived):
            self._headers.setdefault(sid, []).extend(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            )
        elif isinstance(event, DataReceived):
            self._body.setdefault(sid, bytearray()).extend(event.data)
        if getattr(event, "stream_ended", False):
            fut = self._waiters.pop(sid)
            if not fut.done():
                fut.set_result(None)

    async def request(
        self, method: str, authority: str, path: str, headers: dict[str, str], body: bytes
    ) -> H3Response:
        sid = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[sid] = fut
        hdrs = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"quicproxy-conformance/1"),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.h3.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        await fut
        raw = self._headers.get(sid, [])
        status = int(dict(raw).get(":status", "0"))
        return H3Response(
            status=status,
            headers=[(k, v) for k, v in raw if not k.startswith(":")],
            body=bytes(self._body.get(sid, b"")),
            alpn=self.alpn,
        )


async def h3_request(
    host: str,
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    authority: str | None = None,
    server_name: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> H3Response:
    """One HTTP/3 request over a fresh QUIC connection to host:port (UDP)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    config.server_name = server_name or "quicproxy.test"
    config.idle_timeout = timeout
    async with asyncio.timeout(timeout):
        async with connect(
            host, port, configuration=config, create_protocol=_Client, wait_connected=True
        ) as proto:
            client = cast(_Client, proto)
            return await client.request(
                method, authority or f"{config.server_name}:{port}", path, headers or {}, body
            )


def h3_get(host: str, port: int, path: str = "/", **kw: object) -> H3Response:
    """Blocking wrapper around h3_request."""
    return asyncio.run(h3_request(host, port, path, **kw))  # type: ignore[arg-type]


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    alpn: str | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def http_request(
    host: str,
    port: int,
    path: str = "/",
    *,
    tls: bool = False,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> HttpResponse:
    """One HTTP/1.1 request (TLS without verification when tls=True)."""
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        alpn = None
        if tls and isinstance(conn.sock, ssl.SSLSocket):
            alpn = conn.sock.selected_alpn_protocol()
        return HttpResponse(r.status, list(r.getheaders()), data, alpn)
    finally:
        conn.close()


def request(spec: dict[str, object]) -> HttpResponse | H3Response:
    """spec: proto (http|https|h3), host, port, path, method, headers, body."""
    proto = str(spec.get("proto", "http"))
    host, port = str(spec["host"]), int(spec["port"])  # type: ignore[call-overload]
    path = str(spec.get("path", "/"))
    kw = {
        "method": str(spec.get("method", "GET")),
        "headers": spec.get("headers") or {},
        "body": str(spec.get("body", "")).encode(),
        "timeout": float(spec.get("timeout", 10)),
    }  # type: ignore[arg-type]
    if proto == "h3":
        return h3_get(host, port, path, **kw)
    return http_request(host, port, path, tls=proto == "https", **kw)  # type: ignore[arg-type]


def request_retry(spec: dict[str, object], deadline: float = 30.0) -> HttpResponse | H3Response:
    """request(), retried on connection errors until deadline seconds have passed."""
    end = time.monotonic() + deadline
    while True:
        try:
            return request(spec)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException):
            if time.monotonic() > end:
                raise
            time.sleep(1)


def main() -> None:
    out = []
    for spec in json.loads(sys.argv[1]):
        try:
            r = request_retry(spec, float(spec.get("retry", 0)))
            out.append(
                {
                    "ok": True,
                    "status": r.status,
                    "headers": r.headers,
                    "body": r.body.decode("utf-8", "replace")[:4000],
                    "alpn": r.alpn,
                }
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            out.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
