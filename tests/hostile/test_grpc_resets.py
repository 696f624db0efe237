"""gRPC streams reset in a loop count toward the rapid-reset accounting (CVE-2023-44487)
like any other stream: a gRPC stream is a request stream, held open by its client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import h2.config
import h2.connection

from tests.grpc_backend import grpc_backend
from tests.hostile.test_h2_abuse import ENHANCE_YOUR_CALM, open_h2, read_goaway


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def test_grpc_streams_reset_in_a_loop_close_the_connection(make_proxy, certs):
    with grpc_backend() as proc:
        proxy = await make_proxy(None, backend=f"h2c://127.0.0.1:{proc.port}")  # type: ignore[attr-defined]
        reader, writer = await open_h2(proxy, certs)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        head = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                (":path", "/test.Echo/Bidi"), ("content-type", "application/grpc"),
                ("te", "trailers")]  # fmt: skip
        for i in range(2000):
            sid = 1 + 2 * i
            conn.send_headers(sid, head)
            conn.send_data(sid, _grpc_frame(b"ping"))
            conn.reset_stream(sid)
        try:
            writer.write(conn.data_to_send())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        code, took = await read_goaway(reader, 10)
        writer.close()

        def unary() -> bytes:
            root = Path(certs[0]).read_bytes()
            with grpc.secure_channel(
                f"127.0.0.1:{proxy.https_port}",
                grpc.ssl_channel_credentials(root_certificates=root),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ) as ch:
                return ch.unary_unary("/test.Echo/Unary")(b"after", timeout=10)

        reply = await asyncio.to_thread(unary)
    assert code == ENHANCE_YOUR_CALM and took < 5
    assert reply == b"echo:after"  # another client is served
