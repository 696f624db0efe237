"""The built-in demo backend, answered in-process when no backend is configured."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator

from ._model import Body, Request, Response, decimal

__all__ = ["demo_response"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>quic-proxy-waf</title></head>
<body><h1>quic-proxy-waf is running</h1>
<p>This page came over <b id="protocol">{protocol}</b> from the built-in demo backend.</p>
<p>Give a backend with <code>--backend http://HOST:PORT</code>.</p>
<pre>{headers}</pre></body></html>
"""


async def _zeros(size: int) -> AsyncIterator[bytes]:
    chunk = b"\0" * 65536
    while size > 0:
        part = chunk[: min(size, len(chunk))]
        size -= len(part)
        yield part


async def demo_response(req: Request) -> Response:
    """`/` shows the protocol; `/echo` echoes the body; `/bytes/N` sends N bytes."""
    path = req.path
    if path == "/echo":
        return Response(200, [("content-type", "application/octet-stream")], req.body)
    async for _ in req.body:  # drain any body we do not use
        pass
    if path.startswith("/bytes/") and (size := decimal(path[7:])) is not None:
        size = min(size, 1 << 30)
        headers = [("content-type", "application/octet-stream"), ("content-length", str(size))]
        return Response(200, headers, Body.from_iter(_zeros(size)), size)
    if path == "/json":
        info = {"protocol": req.protocol, "method": req.method, "path": req.target}
        data = json.dumps(info).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        return Response(200, headers, Body.of(data), len(data))
    page = _PAGE.format(
        protocol=req.protocol,
        headers=html.escape("\n".join(f"{k}: {v}" for k, v in req.headers)),
    ).encode()
    headers = [("content-type", "text/html; charset=utf-8"), ("content-length", str(len(page)))]
    return Response(200, headers, Body.of(page), len(page))
