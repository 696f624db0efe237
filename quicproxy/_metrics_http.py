"""The metrics listener: GET /metrics (and /_gwhealthz) on a port of its own.

Bound apart from the public plain-HTTP port (``metrics.port``), so a cluster
can scrape it without exposing it on the host port. One request per
connection; anything else gets 404 or 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from ._metrics import CONTENT_TYPE, metrics
from ._sockets import bind_socket

__all__ = ["start_metrics_listener"]

log = logging.getLogger("quicproxy")
_HEAD_LIMIT = 8192
_TIMEOUT = 10.0


def _reply(status: str, ctype: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            data = _reply("400 Bad Request", "text/plain", b"bad request\n")
        else:
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                data = _reply("405 Method Not Allowed", "text/plain", b"use GET\n")
            elif target == b"/metrics":
                data = _reply("200 OK", CONTENT_TYPE, metrics.render())
            elif target == b"/_gwhealthz":
                data = _reply("200 OK", "text/plain", b"OK")
            else:
                data = _reply("404 Not Found", "text/plain", b"only /metrics here\n")
            if method == b"HEAD":
                data = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        writer.write(data)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    except Exception:
        log.exception("metrics listener failed")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def start_metrics_listener(host: str, port: int, reuse_port: bool) -> asyncio.Server:
    """Listen on ``host``:``port`` (0 picks a free port)."""
    sock = bind_socket(host, port, socket.SOCK_STREAM, reuse_port)
    return await asyncio.start_server(_serve, sock=sock, limit=_HEAD_LIMIT)
