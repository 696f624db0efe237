"""Start while the ports are still held (the instance being replaced is draining)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from quicproxy import ConfigError, Proxy
from tests.helpers import fetch, free_port, proxy_config


def hold(port: int) -> list[socket.socket]:
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    return [tcp, udp]


async def test_a_busy_port_is_retried_for_bind_wait_seconds(certs, backend):
    https = free_port()
    listen = {"host": "127.0.0.1", "http_port": 0, "https_port": https, "bind_wait": 10}
    held = hold(https)
    proxy = Proxy(proxy_config(certs, backend, listen=listen))
    starting = asyncio.ensure_future(proxy.start())
    await asyncio.sleep(1.5)
    assert not starting.done()  # still waiting for the port
    for sock in held:
        sock.close()
    await asyncio.wait_for(starting, 5)
    try:
        assert proxy.https_port == https
        assert (await fetch(proxy, certs, "h3", "GET", "/ok"))[0] == 200
    finally:
        await proxy.stop(grace=1)


async def test_without_bind_wait_a_busy_port_fails_at_once(certs, backend):
    https = free_port()
    held = hold(https)
    listen = {"host": "127.0.0.1", "http_port": 0, "https_port": https}
    try:
        with pytest.raises(ConfigError, match="listen: cannot bind"):
            await asyncio.wait_for(Proxy(proxy_config(certs, backend, listen=listen)).start(), 3)
    finally:
        for sock in held:
            sock.close()
