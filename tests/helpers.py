"""Helpers for tests: ports, tools, clients for each protocol."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from bench.targets import free_ports
from quicproxy import Proxy, load_config
from quicproxy._client import H3Client, h3_client
from quicproxy._client import _Protocol as H3Protocol
from tests.backend import Backend


def free_port() -> int:
    """A loopback port free for TCP and for UDP: the https port serves both (h1/h2 and
    h3), and a TCP-only check can hand out a number an ephemeral UDP socket (any QUIC
    client's) holds, so the proxy cannot bind it. The bench's picker does exactly that."""
    return free_ports(1)[0]


def need_tool(name: str, install: str) -> str:
    """Path of tool ``name``; fails under CI, skips with the install hint elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI but missing: {install}")
    pytest.skip(f"{name} not installed: {install}")


def proxy_config(certs: tuple[str, str], origin: Backend | None, **extra: Any) -> Any:
    """A validated config on ephemeral loopback ports, overridden by ``extra`` sections."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "http_port": 0, "https_port": 0},
        "tls": {"cert": certs[0], "key": certs[1]},
        "shutdown_grace": 5,
    }
    if origin is not None:
        data["backend"] = origin.url
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return load_config(env={}, overrides=data)


def https_url(proxy: Proxy, path: str = "/") -> str:
    return f"https://localhost:{proxy.https_port}{path}"


def http_url(proxy: Proxy, path: str = "/") -> str:
    return f"http://127.0.0.1:{proxy.http_port}{path}"


def tcp_client(certs: tuple[str, str], http2: bool, **kw: Any) -> httpx.AsyncClient:
    """httpx client speaking only HTTP/2 (http2=True) or only HTTP/1.1 over TLS."""
    ctx = ssl.create_default_context(cafile=certs[0])
    return httpx.AsyncClient(verify=ctx, http2=http2, http1=not http2, timeout=30.0, **kw)


def h3(proxy: Proxy, certs: tuple[str, str]) -> Any:
    """aioquic HTTP/3 client context manager for ``proxy``."""
    return h3_client(https_url(proxy), cafile=certs[0])


async def fetch(
    proxy: Proxy,
    certs: tuple[str, str],
    proto: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request over ``proto`` ('h1', 'h2' or 'h3'); (status, headers, body)."""
    if proto == "h3":
        async with h3(proxy, certs) as client:
            r = await client.request(method, path, headers or [], body)
            return r.status, dict(r.headers), r.body
    async with tcp_client(certs, http2=proto == "h2") as client:
        resp = await client.request(method, https_url(proxy, path), content=body, headers=headers)
        expected = "HTTP/2" if proto == "h2" else "HTTP/1.1"
        assert resp.http_version == expected
        return resp.status_code, dict(resp.headers), resp.content


@asynccontextmanager
async def h3_from(local_ip: str, proxy: Proxy, certs: tuple[str, str]) -> AsyncIterator[Any]:
    """HTTP/3 client whose UDP socket is bound to ``local_ip`` (e.g. 127.0.0.2):
    a second client address on loopback (aioquic's connect always binds ::)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.server_name = "localhost"
    config.load_verify_locations(certs[0])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local_ip, 0))
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: H3Protocol(QuicConnection(configuration=config)), sock=sock
    )
    try:
        proto.connect(("127.0.0.1", proxy.https_port))
        await asyncio.wait_for(proto.wait_connected(), 10)
        yield H3Client(proto, f"localhost:{proxy.https_port}")
    finally:
        proto.close()
        await proto.wait_closed()
        transport.close()


def tcp_client_from(
    local_ip: str, certs: tuple[str, str], http2: bool, **kw: Any
) -> httpx.AsyncClient:
    """Like tcp_client, with connections from ``local_ip``."""
    ctx = ssl.create_default_context(cafile=certs[0])
    transport = httpx.AsyncHTTPTransport(
        verify=ctx, http2=http2, http1=not http2, local_address=local_ip
    )
    return httpx.AsyncClient(transport=transport, timeout=30.0, **kw)


async def fetch_from(
    local_ip: str, proxy: Proxy, certs: tuple[str, str], proto: str, path: str
) -> tuple[int, dict[str, str], bytes]:
    """One GET over ``proto`` from the loopback address ``local_ip``."""
    if proto == "h3":
        async with h3_from(local_ip, proxy, certs) as client:
            r = await client.request("GET", path)
            return r.status, dict(r.headers), r.body
    async with tcp_client_from(local_ip, certs, http2=proto == "h2") as client:
        resp = await client.get(https_url(proxy, path))
        return resp.status_code, dict(resp.headers), resp.content


def chromium_args(profile: Any, proxy: Proxy, quic: bool = True) -> list[str]:
    """Headless Chromium's command line for pages served by ``proxy`` (its certificate
    trusted by SPKI; QUIC forced on its origin when ``quic``); the URL goes last."""
    from quicproxy._tls import spki_sha256_b64

    chromium = need_tool("chromium", "apt-get install chromium (or run bash .ci/setup)")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={spki_sha256_b64(proxy.cert)}",
    ]
    if quic:
        args.append(f"--origin-to-force-quic-on=localhost:{proxy.https_port}")
    return args


async def run_chromium(args: list[str], seconds: float = 90) -> tuple[int, bytes, bytes]:
    """Run Chromium to its end (``--dump-dom``): (exit status, stdout, stderr). One that
    times out is killed: a browser must not outlive its test."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out, err
