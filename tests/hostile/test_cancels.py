"""A client cancel is normal traffic: browsers reset streams when a page is left or a video
is seeked. On every protocol a cancel mid-response ends the exchange quietly: no ERROR line,
no traceback, the upstream connection closed (not pooled mid-body), one access-log line
with status 499, ``quicproxy_client_cancels_total`` counts it, the connection keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from quicproxy._client import _Pending
from quicproxy._metrics import metrics
from tests.helpers import fetch, h3
from tests.hostile.raw import tls_context

H3_REQUEST_CANCELLED = 0x10C
BIG = "/bytes/8000000"  # 8 MB streamed by the backend: a cancel always lands mid-body
CANCELS = 300


def noisy(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records a cancel must never cause: WARNING or worse, or any with a traceback."""
    return [
        f"{r.name} {r.levelname} {r.getMessage()[:200]}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info or r.exc_text
    ]


def capture(proxy: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    proxy.handler.access.sink = lambda line: entries.append(json.loads(line))
    return entries


def in_use(proxy: Any) -> int:
    """Upstream connections open and not idle in the pool."""
    pool = proxy.handler.upstream
    return pool.total.used - sum(len(idle) for idle in pool._idle.values())


async def settled(proxy: Any, backend: Any, entries: list[dict[str, Any]], count: int) -> None:
    """Wait (bounded) until the proxy has logged ``count`` lines and let go of upstreams."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        idle = sum(len(idle) for idle in proxy.handler.upstream._idle.values())
        if len(entries) >= count and in_use(proxy) == 0 and backend.open_now <= idle:
            return
        await asyncio.sleep(0.05)


def assert_quiet_cancels(
    caplog: pytest.LogCaptureFixture,
    proxy: Any,
    backend: Any,
    entries: list[dict[str, Any]],
    protocol: str,
    count: int,
) -> None:
    cancelled = [e for e in entries if e["path"] == BIG]
    statuses = {e["status"] for e in cancelled}
    assert noisy(caplog) == []
    assert len(cancelled) == count and statuses == {499}, statuses
    assert all(0 < e["bytes_out"] < 8_000_000 for e in cancelled)
    assert metrics.value("quicproxy_client_cancels_total", protocol=protocol) == count
    assert in_use(proxy) == 0, "upstream connections still held"
    idle = sum(len(idle) for idle in proxy.handler.upstream._idle.values())
    assert backend.open_now <= idle, "cancelled upstream connections left open"


# ------------------------------------------------------------------ HTTP/3


def _head(method: str, path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path.encode()),
    ]


class _FirstBytes:
    """Stands in for the client's body hasher: resolves at the first response bytes."""

    def __init__(self) -> None:
        self.seen = asyncio.get_running_loop().create_future()

    def update(self, data: bytes) -> None:
        if data and not self.seen.done():
            self.seen.set_result(None)


async def h3_cancel(client: Any, how: str) -> None:
    """GET a large response on a new stream; at its first bytes, cancel it ``how``:
    'reset+stop' (RESET_STREAM and STOP_SENDING: the request side is left open, with
    ``content-length: 0`` so the proxy forwards it at once, or aioquic would not send a
    RESET_STREAM after its FIN was acknowledged) or 'stop' (STOP_SENDING alone after a
    complete GET: what a browser's cancel amounts to once its FIN was acknowledged)."""
    proto = client.proto
    quic = proto._quic
    sid = quic.get_next_available_stream_id()
    first = _FirstBytes()
    proto.pending[sid] = _Pending(asyncio.get_running_loop().create_future(), keep=False)
    proto.pending[sid].hasher = first
    head = _head("GET", BIG)
    if how == "reset+stop":
        head.append((b"content-length", b"0"))
    proto.h3.send_headers(sid, head, end_stream=how == "stop")
    proto.transmit()
    await asyncio.wait_for(first.seen, 10)
    proto.pending.pop(sid, None)
    if how == "reset+stop":
        quic.reset_stream(sid, H3_REQUEST_CANCELLED)
    quic.stop_stream(sid, H3_REQUEST_CANCELLED)
    proto.transmit()


@pytest.mark.parametrize("how", ["reset+stop", "stop"])
async def test_h3_cancels_mid_response_are_quiet(make_proxy, backend, certs, caplog, how):
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    count = CANCELS
    started = time.monotonic()
    async with h3(proxy, certs) as client:
        for _ in range(count // 10):
            await asyncio.gather(*(h3_cancel(client, how) for _ in range(10)))
        took = time.monotonic() - started
        after = await client.request("GET", "/after", timeout=10)
        closed = client.proto._quic._close_event
    await settled(proxy, backend, entries, count + 1)
    assert closed is None and after.status == 200  # the connection kept serving
    assert_quiet_cancels(caplog, proxy, backend, entries, "h3", count)
    print(f"h3 {how}: {count} cancels in {took:.2f}s, upstreams opened {backend.connections}")


async def test_h3_reset_during_the_upload_is_quiet(make_proxy, backend, certs, caplog):
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    async with h3(proxy, certs) as client:
        proto, quic = client.proto, client.proto._quic
        for i in range(20):
            sid = quic.get_next_available_stream_id()
            proto.h3.send_headers(sid, _head("POST", "/sha256"), end_stream=False)
            proto.h3.send_data(sid, b"x" * 100_000, end_stream=False)
            proto.transmit()
            for _ in range(100):  # until the upstream has the request
                if len(backend.requests) > i:
                    break
                await asyncio.sleep(0.01)
            quic.reset_stream(sid, H3_REQUEST_CANCELLED)  # RESET_STREAM alone
            proto.transmit()
            await asyncio.sleep(0.02)
        after = await client.request("GET", "/after", timeout=10)
    await settled(proxy, backend, entries, 21)
    uploads = [e for e in entries if e["path"] == "/sha256"]
    assert after.status == 200
    assert noisy(caplog) == []
    assert len(uploads) == 20 and {e["status"] for e in uploads} == {499}
    assert metrics.value("quicproxy_client_cancels_total", protocol="h3") == 20
    assert in_use(proxy) == 0 and backend.open_now <= 1


# ------------------------------------------------------------------ HTTP/2


async def test_h2_cancels_mid_response_are_quiet(make_proxy, backend, certs, caplog):
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    reader, writer = await asyncio.open_connection(
        "localhost", proxy.https_port, ssl=tls_context(certs, "h2")
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 30)
    head = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost")]
    started = time.monotonic()
    goaway = None
    after = 0

    async def until(sid: int, want: type) -> h2.events.Event:
        nonlocal goaway
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, f"connection closed (GOAWAY {goaway}) waiting on stream {sid}"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event.error_code
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, want) and event.stream_id == sid:
                    return event
            writer.write(conn.data_to_send())

    try:
        for i in range(CANCELS):
            sid = 1 + 2 * i
            conn.send_headers(sid, [*head, (":path", BIG)], end_stream=True)
            writer.write(conn.data_to_send())
            await until(sid, h2.events.DataReceived)
            conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            writer.write(conn.data_to_send())
        took = time.monotonic() - started
        sid = 1 + 2 * CANCELS
        conn.send_headers(sid, [*head, (":path", "/after")], end_stream=True)
        writer.write(conn.data_to_send())
        response = await until(sid, h2.events.ResponseReceived)
        after = int(dict(response.headers)[b":status"])
    finally:
        writer.transport.abort()
    await settled(proxy, backend, entries, CANCELS + 1)
    assert goaway is None and after == 200
    assert_quiet_cancels(caplog, proxy, backend, entries, "h2", CANCELS)
    print(f"h2: {CANCELS} cancels in {took:.2f}s, upstreams opened {backend.connections}")


# ------------------------------------------------------------------ HTTP/1.1


async def test_h1_client_closing_mid_response_is_quiet(make_proxy, backend, certs, caplog):
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    count = CANCELS
    request = f"GET {BIG} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    started = time.monotonic()
    for _ in range(count):
        reader, writer = await asyncio.open_connection(
            "localhost", proxy.https_port, ssl=tls_context(certs)
        )
        writer.write(request)
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) == 0:
            got += await asyncio.wait_for(reader.read(65536), 10)
        writer.transport.abort()  # gone mid-body (RST: the kernel had unread bytes)
    took = time.monotonic() - started
    status, _, _ = await fetch(proxy, certs, "h1", "GET", "/after")
    await settled(proxy, backend, entries, count + 1)
    assert status == 200
    assert_quiet_cancels(caplog, proxy, backend, entries, "h1", count)
    print(f"h1: {count} cancels in {took:.2f}s, upstreams opened {backend.connections}")


# ------------------------------------------------------------------ other ways to leave


async def open_h2(proxy: Any, certs: Any, rcvbuf: int | None = None) -> Any:
    """A raw h2 client connection; ``rcvbuf`` shrinks its receive buffer so a client that
    stops reading blocks the proxy's writes at once."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.https_port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=tls_context(certs, "h2"), server_hostname="localhost"
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return reader, writer, conn


def h2_get(conn: Any, sid: int, path: str) -> None:
    head = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost")]
    conn.send_headers(sid, [*head, (":path", path)], end_stream=True)


async def test_h2_goaway_from_the_client_ends_its_requests_quietly(
    make_proxy, backend, certs, caplog
):
    """jh2 sends nothing after the client's GOAWAY: a response in progress cannot be
    finished. It was an ERROR with a traceback (ProtocolError: SEND_HEADERS in state
    CLOSED) and an upstream connection never given back; now a quiet 499."""
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    for _ in range(10):
        reader, writer, conn = await open_h2(proxy, certs)
        h2_get(conn, 1, "/slow?s=0.3")
        writer.write(conn.data_to_send())
        await asyncio.sleep(0.1)  # the request is with the upstream
        conn.close_connection()  # GOAWAY NO_ERROR, as a client closing its session
        writer.write(conn.data_to_send())
        closed = await asyncio.wait_for(reader.read(1 << 20), 5)
        while closed:
            closed = await asyncio.wait_for(reader.read(1 << 20), 5)
        writer.close()
    await settled(proxy, backend, entries, 10)
    assert noisy(caplog) == []
    assert [e["status"] for e in entries] == [499] * 10
    assert metrics.value("quicproxy_client_cancels_total", protocol="h2") == 10
    assert in_use(proxy) == 0
    assert (await fetch(proxy, certs, "h2", "GET", "/after"))[0] == 200


async def test_leaving_while_a_response_head_waits_releases_the_upstream(
    make_proxy, backend, certs, caplog
):
    """The client stops reading, so the proxy's write of a second response's head waits;
    then the client drops the connection. That response's upstream body was never read:
    closing it left its connection open and its slot under the caps taken for good (an
    async generator closed before its first step never runs its ``finally``)."""
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    reader, writer, conn = await open_h2(proxy, certs, rcvbuf=16384)
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
    conn.increment_flow_control_window(1 << 30)
    try:
        h2_get(conn, 1, "/bytes/64000000")  # fills every buffer on the way: not read
        writer.write(conn.data_to_send())
        await asyncio.sleep(0.5)
        h2_get(conn, 3, "/small")
        writer.write(conn.data_to_send())
        for _ in range(100):  # until /small is answered upstream, its head stuck with us
            if len(backend.requests) == 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        held = in_use(proxy)
    finally:
        writer.transport.abort()
    await settled(proxy, backend, entries, 2)
    assert held == 2 and noisy(caplog) == []
    assert sorted((e["path"], e["status"]) for e in entries) == [
        ("/bytes/64000000", 499),
        ("/small", 499),
    ]
    assert in_use(proxy) == 0, "the unread response's upstream connection was kept"
    assert backend.open_now == 0


@pytest.mark.parametrize("proto", ["h2", "h3"])
async def test_the_client_closing_its_connection_mid_response_is_quiet(
    make_proxy, backend, certs, caplog, proto
):
    """h3 CONNECTION_CLOSE / h2 TCP reset while responses stream: one 499 each."""
    proxy = await make_proxy(backend)
    entries = capture(proxy)
    for _ in range(5):
        if proto == "h3":
            async with h3(proxy, certs) as client:
                await asyncio.gather(*(h3_first_bytes(client) for _ in range(4)))
                client.proto._quic.close(error_code=H3_REQUEST_CANCELLED)
                client.proto.transmit()
        else:
            reader, writer, conn = await open_h2(proxy, certs)
            conn.increment_flow_control_window(1 << 30)
            for sid in (1, 3, 5, 7):
                h2_get(conn, sid, BIG)
            writer.write(conn.data_to_send())
            seen: set[int] = set()
            while len(seen) < 4:
                for event in conn.receive_data(await asyncio.wait_for(reader.read(65536), 5)):
                    if isinstance(event, h2.events.DataReceived):
                        seen.add(event.stream_id)
            writer.transport.abort()
    await settled(proxy, backend, entries, 20)
    assert_quiet_cancels(caplog, proxy, backend, entries, proto, 20)


async def h3_first_bytes(client: Any) -> None:
    """GET a large response and wait for its first bytes (then leave it streaming)."""
    proto = client.proto
    sid = proto._quic.get_next_available_stream_id()
    first = _FirstBytes()
    proto.pending[sid] = _Pending(asyncio.get_running_loop().create_future(), keep=False)
    proto.pending[sid].hasher = first
    proto.h3.send_headers(sid, _head("GET", BIG), end_stream=True)
    proto.transmit()
    await asyncio.wait_for(first.seen, 10)


async def test_reset_while_the_waf_waits_for_the_body_is_quiet(
    make_proxy, backend, certs, caplog, waf_engine
):
    proxy = await make_proxy(backend, waf={"mode": "inline", "engine": waf_engine})
    entries = capture(proxy)
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    async with h3(proxy, certs) as client:
        proto, quic = client.proto, client.proto._quic
        for _ in range(5):
            sid = quic.get_next_available_stream_id()
            proto.h3.send_headers(sid, _head("POST", "/sha256") + form, end_stream=False)
            proto.h3.send_data(sid, b"a=" + b"x" * 50_000, end_stream=False)
            proto.transmit()
            await asyncio.sleep(0.2)  # under the WAF's body_limit: it waits for more
            quic.reset_stream(sid, H3_REQUEST_CANCELLED)
            quic.stop_stream(sid, H3_REQUEST_CANCELLED)
            proto.transmit()
        after = await client.request("GET", "/after", timeout=10)
    await settled(proxy, backend, entries, 6)
    assert after.status == 200 and noisy(caplog) == []
    assert [e["status"] for e in entries if e["path"] == "/sha256"] == [499] * 5
    assert [r[1] for r in backend.requests] == ["/after"]  # nothing unchecked went on
    assert metrics.value("quicproxy_client_cancels_total", protocol="h3") == 5


async def test_reset_while_the_upstream_connect_hangs_is_quiet(make_proxy, certs, caplog):
    """An upstream whose listen backlog is full: the proxy's connect hangs. Cancels then
    give the connection's place under the caps back at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    fillers = []
    for _ in range(8):  # the backlog is full; later SYNs are dropped, connects hang
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        proxy = await make_proxy(None, backend=f"http://127.0.0.1:{port}")
        entries = capture(proxy)
        pool = proxy.handler.upstream
        async with h3(proxy, certs) as client:
            proto, quic = client.proto, client.proto._quic
            sids: list[int] = []
            for _ in range(5):
                sid = quic.get_next_available_stream_id()
                sids.append(sid)
                proto.h3.send_headers(sid, _head("GET", "/x"), end_stream=True)
                proto.transmit()
            await asyncio.sleep(0.5)
            connecting = pool.total.used
            for sid in sids:
                quic.reset_stream(sid, H3_REQUEST_CANCELLED)
                quic.stop_stream(sid, H3_REQUEST_CANCELLED)
            proto.transmit()
            for _ in range(100):
                if len(entries) == 5:
                    break
                await asyncio.sleep(0.02)
    finally:
        for sock in [silent, *fillers]:
            sock.close()
    assert connecting == 5 and pool.total.used == 0
    assert noisy(caplog) == [] and [e["status"] for e in entries] == [499] * 5
    assert metrics.value("quicproxy_client_cancels_total", protocol="h3") == 5
