"""A hostile upstream: responses the proxy must not forward, through the running proxy
on every protocol; each is a 502 naming nothing internal, and the proxy goes on serving."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import fetch

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HOSTILE = {
    "/huge-head": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "/smuggle": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged",
    "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nok",
    "/upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "/not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "/control-byte": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    # "²" (latin-1 0xb2) passes str.isdigit() but not int()
    "/superscript-length": b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok",
}


@pytest.fixture
async def hostile_upstream():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                writer.write(HOSTILE.get(path, OK))
                await writer.drain()
                if path in HOSTILE:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.mark.parametrize("proto", ["h1", "h2", "h3"])
@pytest.mark.parametrize("path", sorted(HOSTILE))
async def test_untrustworthy_upstream_response_is_502_and_the_proxy_goes_on(
    make_proxy, certs, hostile_upstream, proto, path
):
    proxy = await make_proxy(None, backend=f"http://127.0.0.1:{hostile_upstream}")
    status, _, body = await fetch(proxy, certs, proto, "GET", path)
    assert (status, body) == (502, b"502 Bad Gateway\n")
    assert str(hostile_upstream).encode() not in body
    status, _, body = await fetch(proxy, certs, proto, "GET", "/next")
    assert (status, body) == (200, b"ok")
