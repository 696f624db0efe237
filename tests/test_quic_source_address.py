"""On a host with several addresses, QUIC answers leave from the address the client
wrote to (a DaemonSet pod on the node's network is such a host)."""

from __future__ import annotations

import socket

from quicproxy import Proxy
from quicproxy._client import h3_client
from tests.helpers import free_port, proxy_config
from tests.hostile.probe import client_initial, in_thread


async def test_answers_come_from_the_address_the_client_wrote_to(certs, backend):
    https = free_port()
    listen = {"host": "", "http_port": 0, "https_port": https}  # every address
    proxy = Proxy(proxy_config(certs, backend, listen=listen))
    await proxy.start()
    try:
        assert proxy._quic.socket.pktinfo
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))  # the route back to us would pick 127.0.0.1
        sock.settimeout(3)
        sock.sendto(client_initial(https, "127.0.0.2"), ("127.0.0.2", https))
        _, source = await in_thread(sock.recvfrom, 65535)
        sock.close()
        assert source == ("127.0.0.2", https)
        async with h3_client(f"https://127.0.0.3:{https}/", insecure=True) as client:
            assert (await client.request("GET", "/other-address")).status == 200
    finally:
        await proxy.stop(grace=1)
