"""HTTP/3 request streams as they arrive, judged before the HTTP/3 library reads them.

qh3 holds a frame other than DATA until it is complete (copying its whole buffer again on
every chunk) and decodes any header block, whatever it expands to. In front of it, for
each request stream, :class:`RequestFrames` reads the frame headers (RFC 9114 §7.1) and:

- passes DATA frames through as they come;
- holds a HEADERS frame here until it is complete (one copy) and hands it on whole;
  every HEADERS frame being received on the connection holds at most ``budget`` bytes
  together: the stream that would pass it is refused (H3_REQUEST_REJECTED);
- measures a complete field section without decoding it (:func:`field_section_size`):
  over ``cap`` bytes decoded (or a frame declared longer than ``cap``, whose payload is
  then skipped as it arrives, never held) and qh3 gets an empty field section instead,
  its stream listed in ``oversize`` (the request is answered 431, like h2); over four
  times ``cap`` (what h2 refuses with ENHANCE_YOUR_CALM) closes the connection
  (H3_EXCESSIVE_LOAD); a reference to the dynamic table, which the proxy announces
  with a capacity of 0, closes it with QPACK_DECOMPRESSION_FAILED (RFC 9204 §2.2.3);
- skips unknown and reserved frame types as they arrive (RFC 9114 §9) and closes the
  connection on the types a request stream may not carry (H3_FRAME_UNEXPECTED) and on
  a frame cut short by the end of the stream (H3_FRAME_ERROR); a stream that ends
  before its request head is refused (H3_REQUEST_INCOMPLETE).

The client's unidirectional streams go through it too: on its control stream, frames of
the known types are held until complete (``CONTROL_CAP`` bytes at most, else
H3_EXCESSIVE_LOAD), unknown ones skipped as they arrive, the request-stream types refused
(H3_FRAME_UNEXPECTED); a push stream from a client is H3_STREAM_CREATION_ERROR; the QPACK
streams and unknown stream types pass as they are (qh3 reads them as they come).

Pure protocol (RFC 9114, RFC 9204): nothing here knows the HTTP/3 library.
"""

from __future__ import annotations

from .._fieldint import IntegerError, prefix_int

__all__ = [
    "FrameRefused",
    "QpackError",
    "RequestFrames",
    "field_section_size",
    "H3_EXCESSIVE_LOAD",
    "H3_FRAME_ERROR",
    "H3_FRAME_UNEXPECTED",
    "H3_STREAM_CREATION_ERROR",
    "H3_REQUEST_INCOMPLETE",
    "H3_REQUEST_REJECTED",
    "QPACK_DECOMPRESSION_FAILED",
]

H3_STREAM_CREATION_ERROR = 0x103
H3_FRAME_UNEXPECTED = 0x105
H3_FRAME_ERROR = 0x106
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_INCOMPLETE = 0x10D
QPACK_DECOMPRESSION_FAILED = 0x200

_DATA, _HEADERS = 0x0, 0x1
_UNEXPECTED = frozenset({0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0x9, 0xD})
"""Frame types a client's request stream may not carry: CANCEL_PUSH, SETTINGS, PUSH_PROMISE,
GOAWAY, MAX_PUSH_ID and HTTP/2's reserved PRIORITY, PING, WINDOW_UPDATE, CONTINUATION."""

_CONTROL_TYPES = frozenset({0x3, 0x4, 0x7, 0xD})
"CANCEL_PUSH, SETTINGS, GOAWAY, MAX_PUSH_ID: the frames a control stream carries."
_NOT_ON_CONTROL = frozenset({0x0, 0x1, 0x2, 0x5, 0x6, 0x8, 0x9})
_CONTROL, _PASS = 1, 2
CONTROL_CAP = 16384
"Longest control frame accepted (a SETTINGS frame is a few dozen bytes)."

EMPTY_HEADERS = b"\x01\x02\x00\x00"
"A HEADERS frame with an empty field section: stands in for an oversize one."

FIELD_OVERHEAD = 32
"Each field counts its name, its value and 32 bytes (RFC 9114 §4.2.2, as HPACK)."

_STATIC = (  # (name length, value length) of the QPACK static table (RFC 9204 Appendix A)
    (10, 0), (5, 1), (3, 1), (19, 0), (14, 1), (6, 0), (4, 0), (4, 0), (17, 0), (13, 0),
    (13, 0), (4, 0), (8, 0), (7, 0), (10, 0), (7, 7), (7, 6), (7, 3), (7, 4), (7, 7), (7, 4),
    (7, 3), (7, 4), (7, 5), (7, 3), (7, 3), (7, 3), (7, 3), (7, 3), (6, 3), (6, 23), (15, 17),
    (13, 5), (28, 13), (28, 12), (27, 1), (13, 9), (13, 15), (13, 14), (13, 8), (13, 8),
    (13, 24), (16, 2), (16, 4), (12, 23), (12, 22), (12, 16), (12, 33), (12, 9), (12, 10),
    (12, 9), (12, 8), (12, 24), (12, 10), (12, 24), (5, 8), (25, 16), (25, 35), (25, 44),
    (4, 15), (4, 6), (22, 7), (16, 13), (7, 3), (7, 3), (7, 3), (7, 3), (7, 3), (7, 3), (7, 3),
    (7, 3), (7, 3), (15, 0), (32, 5), (32, 4), (28, 1), (28, 3), (28, 18), (28, 7), (29, 14),
    (30, 12), (29, 3), (29, 4), (7, 5), (13, 0), (23, 53), (10, 1), (9, 0), (9, 0), (8, 0),
    (6, 0), (7, 8), (6, 0), (19, 1), (25, 1), (10, 0), (15, 0), (15, 4), (15, 10),
)  # fmt: skip
_LARGEST_LINE = max(n + v for n, v in _STATIC) + FIELD_OVERHEAD
"""The most one byte of a field section can decode to (a one-byte static reference): a block
no longer than ``cap`` / this cannot pass ``cap`` and needs no scan."""


class QpackError(ValueError):
    """A field section that is not valid without a dynamic table."""


class FrameRefused(Exception):
    """Refused input: the connection is closed with ``code``, or only the stream is reset
    (``stream``)."""

    def __init__(self, code: int, reason: str, stream: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.stream = stream


def _string(data: bytes, pos: int, bits: int) -> tuple[int, int]:
    """A string literal with its Huffman flag just above a ``bits``-bit length: (the most
    bytes it decodes to, position after it). Huffman codes are 5 bits at least."""
    huffman = data[pos] & (1 << bits)
    length, pos = prefix_int(data, pos, bits)
    end = pos + length
    if end > len(data):
        raise QpackError("string past the end of the field section")
    return (length * 8 // 5 if huffman else length), end


def field_section_size(block: bytes, stop: int | None = None) -> int:
    """The decoded size of a QPACK field section, read without decoding it: every field's
    name and value and 32 bytes, the longest a Huffman string can decode to.

    The proxy's decoder has no dynamic table: a Required Insert Count other than 0 or a
    reference to the dynamic table raises :class:`QpackError`, as does a malformed or
    truncated section. Stops counting once past ``stop``."""
    try:
        required, pos = prefix_int(block, 0, 8)
        if required:
            raise QpackError("Required Insert Count is not 0 (no dynamic table)")
        _, pos = prefix_int(block, pos, 7)  # Delta Base: nothing to refer to
        size, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field line
                if not first & 0x40:
                    raise QpackError("reference to the dynamic table")
                index, pos = prefix_int(block, pos, 6)
                name, value = _STATIC[index]
            elif first & 0x40:  # literal with name reference
                if not first & 0x10:
                    raise QpackError("name reference to the dynamic table")
                index, pos = prefix_int(block, pos, 4)
                name = _STATIC[index][0]
                value, pos = _string(block, pos, 7)
            elif first & 0x20:  # literal with literal name
                name, pos = _string(block, pos, 3)
                value, pos = _string(block, pos, 7)
            else:  # indexed field line or name reference, post-base: the dynamic table
                raise QpackError("post-base reference to the dynamic table")
            size += name + value + FIELD_OVERHEAD
            if stop is not None and size > stop:
                return size
        return size
    except IntegerError as exc:
        raise QpackError(str(exc)) from None
    except IndexError:
        raise QpackError("truncated or out-of-range field line") from None


def _frame_header(data: bytes, count: int = 2) -> tuple[int, ...] | None:
    """(type, length, header size) of a frame header at the start of ``data``, None when
    ``data`` ends inside it (two QUIC variable-length integers: 16 bytes at most);
    with ``count`` 1, (a stream type, its size)."""
    pos, out = 0, []
    for _ in range(count):
        if pos >= len(data):
            return None
        size = 1 << (data[pos] >> 6)
        if pos + size > len(data):
            return None
        value = data[pos] & 0x3F
        for byte in data[pos + 1 : pos + size]:
            value = (value << 8) | byte
        out.append(value)
        pos += size
    return (*out, pos)


class _Stream:
    __slots__ = ("held", "start", "need", "passing", "skipping", "heads", "dropped", "kind")

    def __init__(self) -> None:
        self.held = bytearray()
        "A partial frame header, or the HEADERS frame being received."
        self.start = 0
        "Size of the held HEADERS frame's header (its field section follows)."
        self.need = 0
        "Size of the HEADERS frame being received, header included (0: none)."
        self.passing = 0
        "DATA payload bytes still to pass through."
        self.skipping = 0
        "Payload bytes still to skip (an unknown frame type, an oversize HEADERS)."
        self.heads = 0
        "HEADERS frames seen: 0 while the request head is awaited."
        self.dropped = False
        "Refused: whatever else arrives is dropped."
        self.kind = 0
        "A unidirectional stream's kind once its type is read: ``_CONTROL``, ``_PASS``."


class RequestFrames:
    """The request streams of one connection, read frame by frame (see the module)."""

    def __init__(self, cap: int, budget: int, oversize: dict[int, bool]) -> None:
        self.cap = cap
        self.budget = budget
        self.held = 0
        "Bytes held over all streams: HEADERS frames being received."
        self.oversize = oversize
        """Streams whose next HEADERS frame handed on stands for an oversize one, and
        whether that was the request head (else trailers)."""
        self._streams: dict[int, _Stream] = {}

    def feed(self, sid: int, data: bytes, ended: bool) -> bytes | None:
        """What the HTTP/3 layer gets of these bytes of request stream ``sid`` (None:
        nothing at all); raises :class:`FrameRefused`."""
        st = self._streams.get(sid)
        if st is None:
            if ended and not sid & 0x2 and self._small_request(data):
                return data  # the common case: one chunk, one short HEADERS frame, FIN
            st = self._streams[sid] = _Stream()
        if st.dropped:
            if ended:
                del self._streams[sid]
            return None
        try:
            if sid & 0x2:
                out = self._unidirectional(sid, st, data)
            else:
                out = self._frames(sid, st, data)
                if ended:
                    self._end(st)
        except FrameRefused:
            self.drop(sid)
            if ended:
                del self._streams[sid]
            raise
        if ended:
            del self._streams[sid]
        elif not out:
            return None
        return out

    def _small_request(self, data: bytes) -> bool:
        """True when ``data`` is exactly one HEADERS frame too short to pass the cap."""
        if len(data) < 3 or data[0] != _HEADERS:
            return False
        second = data[1]
        if second < 0x40:
            length, size = second, 2
        elif second < 0x80:
            length, size = ((second & 0x3F) << 8) | data[2], 3
        else:
            return False
        return 0 < length and size + length == len(data) and length * _LARGEST_LINE <= self.cap

    def knows(self, sid: int) -> bool:
        """True while stream ``sid`` is being read (it has begun and not ended)."""
        return sid in self._streams

    def waiting(self, sid: int) -> bool:
        """True while stream ``sid`` has begun and its request head is not complete."""
        st = self._streams.get(sid)
        return st is not None and not st.heads and not st.dropped

    def drop(self, sid: int) -> None:
        """Stream refused: let go of what it holds; drop what else comes on it."""
        st = self._streams.get(sid)
        if st is None:
            st = self._streams[sid] = _Stream()
        self.held -= len(st.held)
        st.held = bytearray()
        st.need = st.passing = st.skipping = 0
        st.dropped = True
        self.oversize.pop(sid, None)

    def forget(self, sid: int) -> None:
        """The stream is over (reset by the client, or the connection is closing)."""
        st = self._streams.pop(sid, None)
        if st is not None:
            self.held -= len(st.held)
        self.oversize.pop(sid, None)

    # ------------------------------------------------------------------ reading

    def _unidirectional(self, sid: int, st: _Stream, data: bytes) -> bytes:
        if st.kind == _PASS:
            return data
        if st.kind == _CONTROL:
            return self._frames(sid, st, data)
        before = len(st.held)
        head = bytes(st.held) + data[:8]
        parsed = _frame_header(head, 1)
        if parsed is None:
            self._hold(st, data)
            return b""
        kind, size = parsed
        self.held -= before
        st.held = bytearray()
        rest = data[size - before :]
        if kind == 0x0:
            st.kind = _CONTROL
            return head[:size] + self._frames(sid, st, rest)
        if kind == 0x1:
            raise FrameRefused(H3_STREAM_CREATION_ERROR, "push stream opened by a client")
        st.kind = _PASS
        return head[:size] + rest

    def _frames(self, sid: int, st: _Stream, data: bytes) -> bytes:
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if st.passing:
                take = min(st.passing, end - pos)
                out.append(data[pos : pos + take] if take < end else data)
                st.passing -= take
                pos += take
            elif st.skipping:
                take = min(st.skipping, end - pos)
                st.skipping -= take
                pos += take
            elif st.need:
                take = min(st.need - len(st.held), end - pos)
                self._hold(st, data[pos : pos + take])
                pos += take
                if len(st.held) == st.need:
                    out.append(self._complete(sid, st))
            else:
                pos = self._frame_start(sid, st, data, pos, out)
        return b"".join(out)

    def _frame_start(self, sid: int, st: _Stream, data: bytes, pos: int, out: list[bytes]) -> int:
        """Read a frame header at ``pos`` (its start may be held from the last chunk)."""
        before = len(st.held)
        head = bytes(st.held) + data[pos : pos + 16] if before else data[pos : pos + 16]
        parsed = _frame_header(head)
        if parsed is None:  # the rest of ``data`` is in ``head``: wait for more
            self._hold(st, data[pos:])
            return len(data)
        kind, length, size = parsed
        self.held -= before
        st.held = bytearray()
        pos += size - before
        if st.kind == _CONTROL:
            if kind in _NOT_ON_CONTROL:
                raise FrameRefused(H3_FRAME_UNEXPECTED, f"frame type {kind} on the control stream")
            if kind not in _CONTROL_TYPES:
                st.skipping = length  # unknown or reserved: ignored
            elif length > CONTROL_CAP:
                raise FrameRefused(H3_EXCESSIVE_LOAD, f"control frame of {length} bytes")
            else:
                self._begin(sid, st, head[:size], length, out)
        elif kind == _DATA:
            out.append(head[:size])
            st.passing = length
        elif kind == _HEADERS:
            if length > self.cap:
                out.append(self._oversize(sid, st))
                st.skipping = length
            elif not before and pos + length <= len(data):  # whole in this chunk: no copy
                frame = data[pos - size : pos + length]
                out.append(self._judge(sid, st, frame, data[pos : pos + length]))
                return pos + length
            else:
                self._begin(sid, st, head[:size], length, out)
        elif kind in _UNEXPECTED:
            raise FrameRefused(H3_FRAME_UNEXPECTED, f"frame type {kind} on a request stream")
        else:
            st.skipping = length  # unknown or reserved (grease) type: ignored
        return pos

    def _begin(self, sid: int, st: _Stream, head: bytes, length: int, out: list[bytes]) -> None:
        """Hold a frame from its header on until its ``length`` payload bytes came (an empty
        one is complete at once)."""
        st.start = len(head)
        st.need = len(head) + length
        self._hold(st, head)
        if not length:
            out.append(self._complete(sid, st))

    def _hold(self, st: _Stream, chunk: bytes) -> None:
        if self.held + len(chunk) > self.budget:
            raise FrameRefused(
                H3_REQUEST_REJECTED, "header frames in progress over budget", stream=True
            )
        st.held += chunk
        self.held += len(chunk)

    def _complete(self, sid: int, st: _Stream) -> bytes:
        """A complete frame: a control frame as it is; a HEADERS frame itself, or an empty
        one standing for an oversize one."""
        frame = bytes(st.held)
        self.held -= len(frame)
        st.held = bytearray()
        st.need = 0
        if st.kind == _CONTROL:
            return frame
        return self._judge(sid, st, frame, frame[st.start :])

    def _judge(self, sid: int, st: _Stream, frame: bytes, block: bytes) -> bytes:
        """A complete HEADERS frame (``block`` its field section) as qh3 gets it."""
        if len(block) * _LARGEST_LINE <= self.cap:
            st.heads += 1
            return frame  # cannot pass the cap; the decoder judges the rest
        try:
            size = field_section_size(block, stop=4 * self.cap)
        except QpackError as exc:
            raise FrameRefused(QPACK_DECOMPRESSION_FAILED, str(exc)) from None
        if size > 4 * self.cap:
            raise FrameRefused(H3_EXCESSIVE_LOAD, "field section too large")
        if size > self.cap:
            return self._oversize(sid, st)
        st.heads += 1
        return frame

    def _oversize(self, sid: int, st: _Stream) -> bytes:
        self.oversize[sid] = not st.heads
        st.heads += 1
        return EMPTY_HEADERS

    def _end(self, st: _Stream) -> None:
        if st.held or st.need or st.passing or st.skipping:
            raise FrameRefused(H3_FRAME_ERROR, "frame cut short by the end of the stream")
        if not st.heads:
            raise FrameRefused(H3_REQUEST_INCOMPLETE, "stream ended before the request head", True)
