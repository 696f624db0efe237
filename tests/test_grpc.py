"""gRPC through the proxy: a real grpcio server (its own process, tests/grpc_backend.py)
as an ``h2c://`` backend; a real grpcio client over TLS (h2), and an aioquic HTTP/3
client speaking gRPC's framing. The four call kinds, 10,000 messages on one
bidirectional stream, deadlines (the client's and the proxy's grpc-timeout), a backend
killed mid-stream, trailing metadata, and the proxy's own errors in gRPC's form."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset

from quicproxy._grpc import grpc_timeout, is_grpc
from quicproxy._model import Request
from tests.grpc_backend import grpc_backend


def test_grpc_timeout_and_content_type_parsing():
    assert grpc_timeout("300m") == pytest.approx(0.3)
    assert grpc_timeout("2H") == 7200 and grpc_timeout("99999999n") == pytest.approx(0.1, 1e-3)
    for bad in ("123456789S", "1x", "", "-1S", "1 S", None):
        assert grpc_timeout(bad) is None

    def req(ctype: str) -> Request:
        return Request(
            "POST", "https", "a", "/", [("content-type", ctype)], "HTTP/2", ("", 0), ("", 0)
        )

    assert is_grpc(req("application/grpc")) and is_grpc(req("Application/gRPC+proto"))
    assert is_grpc(req("application/grpc;charset=utf-8"))
    assert not is_grpc(req("application/grpcx")) and not is_grpc(req("application/json"))


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    with grpc_backend() as proc:
        yield proc.port  # type: ignore[attr-defined]


@pytest.fixture
async def grpc_proxy(make_proxy, backend_port):
    return await make_proxy(None, backend=f"h2c://127.0.0.1:{backend_port}")


def channel(proxy: Any, certs: tuple[str, str], agent: str | None = None) -> grpc.Channel:
    root = Path(certs[0]).read_bytes()
    options: list[tuple[str, str]] = [("grpc.ssl_target_name_override", "localhost")]
    if agent:
        options.append(("grpc.primary_user_agent", agent))
    return grpc.secure_channel(
        f"127.0.0.1:{proxy.https_port}",
        grpc.ssl_channel_credentials(root_certificates=root),
        options=options,
    )


def _call_kinds(proxy: Any, certs: tuple[str, str]) -> dict[str, Any]:
    with channel(proxy, certs) as ch:
        unary = ch.unary_unary("/test.Echo/Unary")
        reply, call = unary.with_call(b"hi", timeout=10)
        server_stream = list(ch.unary_stream("/test.Echo/ServerStream")(b"100", timeout=10))
        counted = ch.stream_unary("/test.Echo/ClientStream")(iter([b"x" * 10] * 100), timeout=10)
        bidi = list(ch.stream_stream("/test.Echo/Bidi")(iter([b"a", b"bb", b"ccc"]), timeout=10))
        return {
            "unary": reply,
            "trailers": dict(call.trailing_metadata()),
            "server_stream": server_stream,
            "client_stream": counted,
            "bidi": bidi,
        }


async def test_the_four_call_kinds_over_h2(grpc_proxy, certs):
    got = await asyncio.to_thread(_call_kinds, grpc_proxy, certs)
    assert got["unary"] == b"echo:hi"
    assert got["trailers"]["x-trailer"] == "unary-done"  # custom trailing metadata intact
    assert got["server_stream"] == [b"%d" % i for i in range(100)]
    assert got["client_stream"] == b"100 1000"
    assert got["bidi"] == [b"a", b"bb", b"ccc"]


async def test_backend_status_passes_through(grpc_proxy, certs):
    """The backend's own trailers-only answer (unknown method) reaches the client as is."""

    def unknown() -> grpc.RpcError:
        with channel(grpc_proxy, certs) as ch, pytest.raises(grpc.RpcError) as failure:
            ch.unary_unary("/test.Echo/Nope")(b"x", timeout=10)
        return failure.value

    assert (await asyncio.to_thread(unknown)).code() == grpc.StatusCode.UNIMPLEMENTED


def _bidi_many(proxy: Any, certs: tuple[str, str], count: int) -> tuple[int, dict[str, str], float]:
    with channel(proxy, certs) as ch:
        bidi = ch.stream_stream("/test.Echo/Bidi")
        started = time.monotonic()
        call = bidi((b"m%05d" % i + b"." * 90 for i in range(count)), timeout=60)
        received = 0
        for i, message in enumerate(call):
            assert message.startswith(b"m%05d" % i)
            received += 1
        return received, dict(call.trailing_metadata()), time.monotonic() - started


async def test_ten_thousand_messages_on_one_bidi_stream_h2(grpc_proxy, certs):
    received, trailers, took = await asyncio.to_thread(_bidi_many, grpc_proxy, certs, 10_000)
    assert received == 10_000 and trailers["x-count"] == "10000"
    print(f"grpc bidi over h2: 10000 messages in {took:.2f}s ({10_000 / took:.0f} msg/s)")


def _sleep(proxy: Any, certs: tuple[str, str], seconds: str, timeout: float) -> grpc.RpcError:
    with channel(proxy, certs) as ch, pytest.raises(grpc.RpcError) as failure:
        ch.unary_unary("/test.Echo/Sleep")(seconds.encode(), timeout=timeout)
    return failure.value


async def test_client_deadline_is_deadline_exceeded(grpc_proxy, certs):
    error = await asyncio.to_thread(_sleep, grpc_proxy, certs, "3", 0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def messages(data: bytes) -> list[bytes]:
    out = []
    while len(data) >= 5:
        size = int.from_bytes(data[1:5], "big")
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


def _raw_h2_grpc(proxy: Any, certs: tuple[str, str], path: str, body: bytes, extra: list) -> dict:
    """One gRPC call written by hand with the h2 library: what exactly comes back."""
    ctx = ssl.create_default_context(cafile=certs[0])
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
    out: dict[str, Any] = {"headers": {}, "data": b"", "trailers": {}, "frames": []}
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="latin-1"))
        conn.initiate_connection()
        head = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                (":path", path), ("content-type", "application/grpc"), ("te", "trailers"),
                *extra]  # fmt: skip
        conn.send_headers(1, head)
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            for ev in conn.receive_data(chunk):
                out["frames"].append(type(ev).__name__)
                if isinstance(ev, h2.events.ResponseReceived):
                    out["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    out["data"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, h2.events.TrailersReceived):
                    out["trailers"] = dict(ev.headers)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return out
            sock.sendall(conn.data_to_send())


async def test_proxy_honours_grpc_timeout(grpc_proxy, certs):
    """No client-side deadline here: the proxy's own, from grpc-timeout, answers."""
    started = time.monotonic()
    out = await asyncio.to_thread(
        _raw_h2_grpc, grpc_proxy, certs, "/test.Echo/Sleep", frame(b"3"), [("grpc-timeout", "300m")]
    )
    took = time.monotonic() - started
    assert out["headers"][":status"] == "200"
    assert out["headers"]["content-type"] == "application/grpc"
    assert out["headers"]["grpc-status"] == "4"  # DEADLINE_EXCEEDED, trailers-only
    stream = [f for f in out["frames"] if f in ("ResponseReceived", "DataReceived", "StreamEnded")]
    assert stream == ["ResponseReceived", "StreamEnded"]  # one HEADERS frame, END_STREAM
    assert took < 2.5


async def test_grpc_timeout_mid_stream_ends_with_deadline_exceeded_trailers(grpc_proxy, certs):
    out = await asyncio.to_thread(
        _raw_h2_grpc,
        grpc_proxy,
        certs,
        "/test.Echo/ServerStream",
        frame(b"100:0.1"),
        [("grpc-timeout", "600m")],
    )
    assert out["headers"][":status"] == "200" and "grpc-status" not in out["headers"]
    assert 0 < len(messages(out["data"])) < 100
    assert out["trailers"]["grpc-status"] == "4"  # the stream ends cleanly, with the status


async def test_backend_killed_mid_stream_is_unavailable(make_proxy, certs):
    with grpc_backend() as proc:
        proxy = await make_proxy(None, backend=f"h2c://127.0.0.1:{proc.port}")  # type: ignore[attr-defined]

        def call() -> tuple[list[bytes], grpc.RpcError]:
            got = []
            with channel(proxy, certs) as ch, pytest.raises(grpc.RpcError) as failure:
                for message in ch.unary_stream("/test.Echo/ServerStream")(b"1000:0.05", timeout=20):
                    got.append(message)
                    if len(got) == 3:
                        proc.kill()
            return got, failure.value

        got, error = await asyncio.to_thread(call)
    assert got[:3] == [b"0", b"1", b"2"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_unreachable_backend_is_unavailable_not_a_text_body(make_proxy, certs):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proxy = await make_proxy(None, backend=f"h2c://127.0.0.1:{port}")
    out = await asyncio.to_thread(_raw_h2_grpc, proxy, certs, "/test.Echo/Unary", frame(b"x"), [])
    assert out["headers"][":status"] == "200" and out["data"] == b""
    assert out["headers"]["grpc-status"] == "14" and "502" in out["headers"]["grpc-message"]
    assert "127.0.0.1" not in out["headers"]["grpc-message"]

    def unary() -> grpc.RpcError:
        with channel(proxy, certs) as ch, pytest.raises(grpc.RpcError) as failure:
            ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
        return failure.value

    assert (await asyncio.to_thread(unary)).code() == grpc.StatusCode.UNAVAILABLE


async def test_rate_limited_is_resource_exhausted(make_proxy, backend_port, certs):
    proxy = await make_proxy(
        None,
        backend=f"h2c://127.0.0.1:{backend_port}",
        rate_limit={"enabled": True, "rate": 0.01, "burst": 1},
    )

    def twice() -> grpc.RpcError:
        with channel(proxy, certs) as ch:
            unary = ch.unary_unary("/test.Echo/Unary")
            assert unary(b"1", timeout=10) == b"echo:1"
            with pytest.raises(grpc.RpcError) as failure:
                unary(b"2", timeout=10)
            return failure.value

    assert (await asyncio.to_thread(twice)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_grpc_through_the_waf(make_proxy, backend_port, certs):
    """The WAF knows application/grpc (no 920420) and feeds it no body: a bidi stream
    is not held waiting for body bytes that only come after answers."""
    pytest.importorskip("quicproxy.waf._binding")
    from tests.conftest import require_engine

    require_engine("modsecurity")
    proxy = await make_proxy(
        None,
        backend=f"h2c://127.0.0.1:{backend_port}",
        waf={"mode": "inline", "engine": "modsecurity"},
    )

    def calls() -> tuple[bytes, list[bytes], grpc.RpcError]:
        with channel(proxy, certs) as ch:
            reply = ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
            replies = []
            bidi = ch.stream_stream("/test.Echo/Bidi")

            def one_at_a_time() -> Iterator[bytes]:
                for i in range(3):
                    yield b"ping%d" % i
                    while len(replies) <= i:  # the next only after the answer
                        time.sleep(0.01)

            for message in bidi(one_at_a_time(), timeout=10):
                replies.append(message)
        with channel(proxy, certs, agent="sqlmap/1.7") as ch:  # a scanner: CRS 913100
            with pytest.raises(grpc.RpcError) as failure:
                ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
            return reply, replies, failure.value

    reply, replies, blocked = await asyncio.to_thread(calls)
    assert reply == b"echo:hi" and replies == [b"ping0", b"ping1", b"ping2"]
    assert blocked.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- HTTP/3


class _H3Grpc(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic)
        self.events: dict[int, asyncio.Queue[Any]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset) and event.stream_id in self.events:
            self.events[event.stream_id].put_nowait(event)
        for ev in self.h3.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)) and ev.stream_id in self.events:
                self.events[ev.stream_id].put_nowait(ev)


async def h3_call(
    proto: _H3Grpc, authority: str, path: str, requests: AsyncIterator[bytes]
) -> tuple[dict[str, str], list[bytes], dict[str, str]]:
    """One gRPC call over HTTP/3: messages sent as they come, answers read meanwhile."""
    sid = proto._quic.get_next_available_stream_id()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    proto.events[sid] = queue
    head = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", authority.encode()),
            (b":path", path.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")]  # fmt: skip
    proto.h3.send_headers(sid, head)
    proto.transmit()

    async def send() -> None:
        async for message in requests:
            proto.h3.send_data(sid, frame(message), end_stream=False)
            proto.transmit()
        proto.h3.send_data(sid, b"", end_stream=True)
        proto.transmit()

    sender = asyncio.ensure_future(send())
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    data = b""
    try:
        while True:
            ev = await asyncio.wait_for(queue.get(), 30)
            if isinstance(ev, StreamReset):
                raise ConnectionError(f"stream reset ({ev.error_code})")
            if isinstance(ev, HeadersReceived):
                fields = {k.decode(): v.decode() for k, v in ev.headers}
                if headers:
                    trailers = fields
                else:
                    headers = fields
            else:
                data += ev.data
            if ev.stream_ended:
                break
    finally:
        sender.cancel()
    return headers, messages(data), trailers


@contextlib.asynccontextmanager
async def h3_grpc(proxy: Any, certs: tuple[str, str]) -> AsyncIterator[_H3Grpc]:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(certs[0])
    async with connect(
        "127.0.0.1", proxy.https_port, configuration=config, create_protocol=_H3Grpc
    ) as proto:
        yield proto  # type: ignore[misc]


async def _items(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_unary_over_h3(grpc_proxy, certs):
    async with h3_grpc(grpc_proxy, certs) as proto:
        headers, got, trailers = await h3_call(
            proto, "localhost", "/test.Echo/Unary", _items([b"over-h3"])
        )
    assert headers[":status"] == "200" and headers["content-type"] == "application/grpc"
    assert got == [b"echo:over-h3"]
    assert trailers["grpc-status"] == "0" and trailers["x-trailer"] == "unary-done"


async def test_ten_thousand_messages_on_one_bidi_stream_h3(grpc_proxy, certs):
    count = 10_000

    async def paced() -> AsyncIterator[bytes]:
        for i in range(count):
            yield b"m%05d" % i + b"." * 90
            if i % 100 == 99:
                await asyncio.sleep(0)  # let acknowledgements and answers in

    async with h3_grpc(grpc_proxy, certs) as proto:
        started = time.monotonic()
        headers, got, trailers = await h3_call(proto, "localhost", "/test.Echo/Bidi", paced())
        took = time.monotonic() - started
    assert headers[":status"] == "200"
    assert len(got) == count and got[-1].startswith(b"m09999")
    assert trailers["grpc-status"] == "0" and trailers["x-count"] == str(count)
    print(f"grpc bidi over h3: {count} messages in {took:.2f}s ({count / took:.0f} msg/s)")


async def test_h3_grpc_error_is_trailers_only(make_proxy, certs):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proxy = await make_proxy(None, backend=f"h2c://127.0.0.1:{port}")
    async with h3_grpc(proxy, certs) as proto:
        headers, got, trailers = await h3_call(
            proto, "localhost", "/test.Echo/Unary", _items([b"x"])
        )
    assert headers[":status"] == "200" and headers["grpc-status"] == "14"
    assert got == [] and trailers == {}
