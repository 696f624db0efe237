"""HTTP/2 abuse: rapid reset (CVE-2023-44487), SETTINGS and PING floods, a silent client,
an idle connection. Each is closed quickly; the backend sees (almost) nothing; others are served."""

from __future__ import annotations

import asyncio
import struct
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest

from tests.helpers import fetch
from tests.hostile.probe import HealthProbe
from tests.hostile.raw import tls_context

ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


async def open_h2(proxy, certs):
    return await asyncio.open_connection(
        "localhost", proxy.https_port, ssl=tls_context(certs, "h2")
    )


async def read_goaway(reader: asyncio.StreamReader, seconds: float) -> tuple[int | None, float]:
    """Read raw frames until the server closes; (GOAWAY error code or None, seconds taken)."""
    code = None
    buf = b""
    started = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            while data := await reader.read(65536):
                buf += data
                while len(buf) >= 9:
                    size = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + size:
                        break
                    if buf[3] == 0x7:  # GOAWAY: last stream id, then the error code
                        code = int.from_bytes(buf[13:17], "big")
                    buf = buf[9 + size :]
    except (ConnectionError, OSError):
        pass
    return code, time.monotonic() - started


async def test_rapid_reset_closes_the_connection_and_spares_the_backend(make_proxy, backend, certs):
    proxy = await make_proxy(backend)
    reader, writer = await open_h2(proxy, certs)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/slow?s=1"),
    ]
    for i in range(10000):
        sid = 1 + 2 * i
        conn.send_headers(sid, head, end_stream=True)
        conn.reset_stream(sid)
    async with HealthProbe(proxy.http_port) as probe:
        try:
            writer.write(conn.data_to_send())
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server may close before it has read everything
        code, took = await read_goaway(reader, 10)
        status, _, _ = await fetch(proxy, certs, "h2", "GET", "/after")
    writer.close()
    await asyncio.sleep(0.3)
    slow = [r for r in backend.requests if r[1].startswith("/slow")]
    assert code == ENHANCE_YOUR_CALM and took < 5
    assert len(slow) <= 20, f"{len(slow)} reset requests reached the backend"
    assert backend.open_max <= 25
    assert status == 200 and probe.failures == [] and probe.slowest < 1.0
    print(f"rapid reset: {len(slow)} of 10000 reached the backend, closed in {took:.2f}s")


@pytest.mark.parametrize(
    "flood", [frame(0x4, 0, 0), frame(0x6, 0, 0, b"12345678")], ids=["settings", "ping"]
)
async def test_control_frame_floods_close_the_connection(make_proxy, backend, certs, flood):
    proxy = await make_proxy(backend)
    reader, writer = await open_h2(proxy, certs)
    started = time.process_time()
    async with HealthProbe(proxy.http_port) as probe:
        writer.write(PREFACE + frame(0x4, 0, 0))
        try:
            for _ in range(20):  # 200,000 frames, 10,000 at a time, acknowledgements unread
                writer.write(flood * 10000)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        code, took = await read_goaway(reader, 10)
        status, _, _ = await fetch(proxy, certs, "h2", "GET", "/after")
    writer.close()
    cpu = time.process_time() - started
    assert code == ENHANCE_YOUR_CALM and took < 5
    assert status == 200 and probe.slowest < 1.0
    assert cpu < 3.0, f"the flood cost {cpu:.1f}s of CPU"


async def test_a_client_that_never_sends_its_preface_is_closed(make_proxy, backend, certs):
    proxy = await make_proxy(backend, timeouts={"h2_preface": 1.0})
    reader, writer = await open_h2(proxy, certs)
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(65536), 5)  # our SETTINGS
    while data:
        data = await asyncio.wait_for(reader.read(65536), 5)
    took = time.monotonic() - started
    writer.close()
    assert 0.8 < took < 3.0


async def test_an_idle_h2_connection_is_closed(make_proxy, backend, certs):
    proxy = await make_proxy(backend, timeouts={"idle": 1.0})
    reader, writer = await open_h2(proxy, certs)
    writer.write(PREFACE + frame(0x4, 0, 0))
    code, took = await read_goaway(reader, 5)
    writer.close()
    assert 0.8 < took < 3.0


def _size_update(size: int) -> bytes:
    """A dynamic table size update (RFC 7541 6.3): 001xxxxx, an integer with a 5-bit prefix."""
    if size < 31:
        return bytes([0x20 | size])
    out, size = [0x3F], size - 31
    while size >= 128:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    return bytes(out + [size])


_GET = bytes([0x82, 0x87, 0x84])  # :method GET, :scheme https, :path / (static table)
_AUTHORITY = bytes([0x41, 9]) + b"localhost"  # :authority, literal with indexing


@pytest.mark.parametrize(
    "block",
    [
        _size_update(4097) + _GET + _AUTHORITY,
        _size_update(1 << 20) + _GET + _AUTHORITY,
        _GET + _size_update(100) + _AUTHORITY,
        _GET + _AUTHORITY + _size_update(0),
        _GET + bytes([0x41, 20]) + b"localhost",  # a string running past the block
        _GET + bytes([0xFF]),  # an index whose integer never ends
    ],
    ids=["above-setting", "far-above", "after-field", "at-end", "truncated-string", "open-int"],
)
async def test_a_bad_field_block_is_a_compression_error(make_proxy, backend, certs, block):
    """RFC 7541 4.2 / RFC 9113 4.3: a size update above SETTINGS_HEADER_TABLE_SIZE or
    after a field line, or a block that cannot be decoded, closes the connection with
    COMPRESSION_ERROR; nothing reaches the backend and the next client is served."""
    proxy = await make_proxy(backend)
    reader, writer = await open_h2(proxy, certs)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send() + frame(0x1, 0x5, 1, block))  # END_STREAM|END_HEADERS
    code, took = await read_goaway(reader, 5)
    writer.close()
    status, _, _ = await fetch(proxy, certs, "h2", "GET", "/after")
    assert code == h2.errors.ErrorCodes.COMPRESSION_ERROR and took < 3
    assert status == 200
    assert [r[1] for r in backend.requests] == ["/after"]


async def test_a_size_update_at_the_start_is_accepted(make_proxy, backend, certs):
    """The allowed form: updates (down, then back up to the setting) before the fields."""
    proxy = await make_proxy(backend)
    reader, writer = await open_h2(proxy, certs)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    block = _size_update(0) + _size_update(4096) + _GET + _AUTHORITY
    writer.write(conn.data_to_send() + frame(0x1, 0x5, 1, block))
    status = None
    buf = b""
    async with asyncio.timeout(5):
        while status is None and (data := await reader.read(65536)):
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                size = int.from_bytes(buf[:3], "big")
                if buf[3] == 0x1:  # HEADERS: the response's
                    status = dict(hpack.Decoder().decode(buf[9 : 9 + size]))[":status"]
                assert buf[3] != 0x7, "GOAWAY"
                buf = buf[9 + size :]
    writer.close()
    assert status == "200"
