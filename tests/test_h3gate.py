"""HTTP/3 request frames read before qh3 (``_h3gate``): the QPACK size scan against qh3's own
encoder and decoder, and frame reassembly whatever the chunking."""

from __future__ import annotations

import random

import pytest
from qh3._hazmat import QpackDecoder, QpackEncoder

from quicproxy.quic import _h3gate as gate


def encoded(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A field section from qh3's encoder, told the peer has no dynamic table."""
    encoder = QpackEncoder()
    encoder.apply_settings(max_table_capacity=0, dyn_table_capacity=0, blocked_streams=0)
    _, block = encoder.encode(0, headers)
    return block


def decoded_size(block: bytes) -> int:
    _, headers = QpackDecoder(0, 0).feed_header(0, block)
    return sum(len(n) + len(v) + gate.FIELD_OVERHEAD for n, v in headers)


def test_the_static_table_is_qpacks():
    decoder = QpackDecoder(0, 0)
    for index, (name, value) in enumerate(gate._STATIC):
        line = bytes([0xC0 | index]) if index < 63 else bytes([0xFF, index - 63])
        _, headers = decoder.feed_header(index * 4, b"\0\0" + line)
        assert (len(headers[0][0]), len(headers[0][1])) == (name, value), index


def test_the_scan_bounds_what_qh3_decodes():
    rng = random.Random(7)
    for _ in range(200):
        headers = [(b":method", b"GET"), (b":path", b"/" + rng.randbytes(8).hex().encode())]
        for _ in range(rng.randrange(0, 30)):
            name = rng.choice([b"cookie", b"accept", b"x-custom-" + str(rng.random()).encode()])
            value = bytes(rng.choice(b"abcxyz0123 -_/=;") for _ in range(rng.randrange(0, 300)))
            headers.append((name, value))
        block = encoded(headers)
        actual = decoded_size(block)
        scanned = gate.field_section_size(block)
        assert actual <= scanned <= actual * 8 // 5 + 64, (actual, scanned)


@pytest.mark.parametrize(
    "block",
    [
        b"\x02\x00\xd1",  # Required Insert Count 1
        b"\x00\x00\x80",  # indexed field line, dynamic
        b"\x00\x00\x10",  # indexed, post-base
        b"\x00\x00\x40\x01a",  # name reference, dynamic
        b"\x00\x00\x00\x01a",  # name reference, post-base
        b"\x00\x00\xff\x24",  # static index 99: past the table
        b"\x00\x00\x51\x05ab",  # value longer than the block
        b"\x00",  # no Delta Base
    ],
)
def test_what_needs_a_dynamic_table_or_is_malformed_is_refused(block):
    with pytest.raises(gate.QpackError):
        gate.field_section_size(block)


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0x40 | len(payload) >> 8, len(payload) & 0xFF]) + payload


def test_frames_come_out_whole_however_they_are_cut():
    head = frame(0x1, encoded([(b":method", b"POST"), (b"x-a", b"b" * 700)]))
    stream = head + frame(0x21, b"grease" * 50) + frame(0x0, b"body" * 100) + frame(0x0, b"")
    expected = head + frame(0x0, b"body" * 100) + frame(0x0, b"")
    rng = random.Random(3)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), 12))
        frames = gate.RequestFrames(65536, 4 * 65536, {})
        out = b""
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            out += frames.feed(0, stream[start:end], end == len(stream)) or b""
        assert out == expected and frames.held == 0


def test_oversize_and_budget():
    oversize: dict[int, bool] = {}
    frames = gate.RequestFrames(1024, 4096, oversize)
    # declared over the cap: an empty field section stands in, the payload is skipped
    assert frames.feed(0, frame(0x1, b"\0" * 2000)[:100], False) == gate.EMPTY_HEADERS
    assert oversize == {0: True} and frames.held == 0
    # decoded over the cap (static lines of 108 bytes), under four times: the same
    csp = bytes([0xFF, 85 - 63])  # static index 85, content-security-policy
    big = b"\x00\x00" + csp * 20
    assert frames.feed(4, frame(0x1, big), True) == gate.EMPTY_HEADERS and oversize[4] is True
    with pytest.raises(gate.FrameRefused) as bomb:
        frames.feed(8, frame(0x1, b"\x00\x00" + csp * 40), False)
    assert bomb.value.code == gate.H3_EXCESSIVE_LOAD and not bomb.value.stream
    # frames in progress: held up to the budget, the stream that would pass it refused
    for sid in (12, 16, 20, 24):
        assert frames.feed(sid, frame(0x1, b"\0" * 1000)[:1001], False) is None
    assert frames.held == 4 * 1001 and frames.waiting(12)
    with pytest.raises(gate.FrameRefused) as over:
        frames.feed(28, frame(0x1, b"\0" * 1000)[:1001], False)
    assert over.value.code == gate.H3_REQUEST_REJECTED and over.value.stream
    assert frames.held == 4 * 1001 and not frames.waiting(28)
    assert frames.feed(28, b"more", False) is None  # dropped
    for sid in (12, 16, 20, 24):
        frames.forget(sid)
    assert frames.held == 0


def test_a_stream_ending_early_or_mid_frame_is_refused():
    frames = gate.RequestFrames(65536, 4 * 65536, {})
    with pytest.raises(gate.FrameRefused) as empty:
        frames.feed(0, b"", True)
    assert empty.value.code == gate.H3_REQUEST_INCOMPLETE and empty.value.stream
    with pytest.raises(gate.FrameRefused) as cut:
        frames.feed(4, frame(0x1, b"\0\0\xd1")[:4], True)
    assert cut.value.code == gate.H3_FRAME_ERROR and not cut.value.stream
    with pytest.raises(gate.FrameRefused) as settings:
        frames.feed(8, frame(0x4, b""), False)
    assert settings.value.code == gate.H3_FRAME_UNEXPECTED
    assert not frames.knows(0) and not frames.knows(4) and frames.held == 0


def test_the_control_stream_is_read_frame_by_frame():
    settings = frame(0x4, b"\x01\x00\x07\x00")
    stream = b"\x00" + settings + frame(0x21, b"x" * 3000) + frame(0x7, b"\x00")
    rng = random.Random(4)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(stream)), 8))
        frames = gate.RequestFrames(65536, 4 * 65536, {})
        out = b""
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            out += frames.feed(2, stream[start:end], False) or b""
        assert out == b"\x00" + settings + frame(0x7, b"\x00") and frames.held == 0
    frames = gate.RequestFrames(65536, 4 * 65536, {})
    with pytest.raises(gate.FrameRefused) as big:
        frames.feed(2, b"\x00\x04\x80\x00\x40\x01" + b"\0" * 50, False)  # 16385 bytes
    assert big.value.code == gate.H3_EXCESSIVE_LOAD
    with pytest.raises(gate.FrameRefused) as headers:
        frames.feed(6, b"\x00" + frame(0x1, b"\0\0"), False)
    assert headers.value.code == gate.H3_FRAME_UNEXPECTED
    with pytest.raises(gate.FrameRefused) as push:
        frames.feed(10, b"\x01\x00", False)
    assert push.value.code == gate.H3_STREAM_CREATION_ERROR
    encoder = b"\x02" + b"\x20" * 100  # QPACK streams and unknown types pass as they are
    assert frames.feed(14, encoder[:1], False) + frames.feed(14, encoder[1:], False) == encoder
    assert frames.feed(18, b"\x40\x21grease", True) == b"\x40\x21grease"


def test_a_whole_short_request_passes_untouched():
    frames = gate.RequestFrames(65536, 4 * 65536, {})
    request = frame(0x1, encoded([(b":method", b"GET"), (b":path", b"/")]))
    assert frames.feed(0, request, True) is request
    assert not frames.knows(0) and frames.held == 0
