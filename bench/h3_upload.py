"""10 MiB HTTP/3 uploads with aioquic's client, for where oha cannot do them (Caddy 2.6).

    python -m bench.h3_upload HOST PORT SERVER_NAME SECONDS

One connection, back-to-back POSTs of 10 MiB to /up for SECONDS (the last one may finish
later); prints "<completed> <seconds spent in them>" or "0 0" if none completed.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset

BODY = b"x" * (10 * 1024 * 1024)


class _Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiting: dict[int, asyncio.Future[int]] = {}
        self.status: dict[int, int] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and event.stream_id in self.waiting:
            self.waiting.pop(event.stream_id).set_exception(RuntimeError("stream reset"))
        for ev in self.h3.handle_event(event):
            self._h3_event(ev)

    def _h3_event(self, ev: H3Event) -> None:
        if isinstance(ev, HeadersReceived):
            self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
        if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended:
            fut = self.waiting.pop(ev.stream_id, None)
            if fut and not fut.done():
                fut.set_result(self.status.get(ev.stream_id, 0))

    async def post(self, authority: str) -> int:
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", b"/up"),
            (b"content-length", str(len(BODY)).encode()),
        ]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[sid] = fut
        self.h3.send_headers(sid, headers)
        self.h3.send_data(sid, BODY, end_stream=True)
        self.transmit()
        return await fut


async def main(host: str, port: int, name: str, seconds: float) -> None:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE, server_name=name
    )
    done, spent = 0, 0.0
    async with connect(host, port, configuration=config, create_protocol=_Client) as client:
        assert isinstance(client, _Client)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            status = await asyncio.wait_for(client.post(f"{name}:{port}"), 60)
            if not 200 <= status < 300:
                raise SystemExit(f"status {status}")
            done, spent = done + 1, spent + time.monotonic() - t0
    print(done, spent, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
