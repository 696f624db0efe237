"""Run quicproxy inside your own asyncio program and add a route at run time.

python examples/library_use.py            # serves on 127.0.0.1, ephemeral ports
python examples/library_use.py --check    # starts, makes one HTTP/3 request, exits
"""

from __future__ import annotations

import asyncio
import sys

import quicproxy
from quicproxy._client import h3_client


async def tiny_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A one-response-per-connection HTTP/1.1 backend, to have something to proxy to."""
    await reader.readuntil(b"\r\n\r\n")
    body = b"hello from the example backend\n"
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    writer.close()


async def main(check: bool) -> int:
    backend = await asyncio.start_server(tiny_backend, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]

    config = quicproxy.load_config(
        overrides={
            "listen": {"host": "127.0.0.1", "http_port": 0, "https_port": 0},
        }
    )
    async with quicproxy.Proxy(config) as proxy:
        # "/" stays on the built-in demo backend; /api goes to ours.
        proxy.add_route(
            quicproxy.Route(backends=[f"http://127.0.0.1:{backend_port}"], path_prefix="/api")
        )
        url = f"https://localhost:{proxy.https_port}"
        print(f"proxy up: {url}/ (demo) and {url}/api (example backend)", flush=True)
        if check:
            async with h3_client(url, insecure=True) as client:
                resp = await client.request("GET", "/api/hello")
            print(f"HTTP/3 {resp.status}: {resp.body.decode().strip()}")
            return 0 if resp.body == b"hello from the example backend\n" else 1
        await asyncio.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main("--check" in sys.argv)))
