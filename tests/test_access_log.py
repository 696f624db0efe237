"""Access log: the same fields for the same request on h1, h2 and h3, and the
request id kept from trusted proxies only, sent upstream and back."""

from __future__ import annotations

import json

import pytest

from quicproxy._access import AccessLog, AccessRecord
from tests.helpers import fetch

PROTOCOLS = ["h1", "h2", "h3"]
FIELDS = [
    "time",
    "request_id",
    "client",
    "protocol",
    "method",
    "host",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream",
    "upstream_ms",
    "route",
    "waf",
    "waf_rule",
]


def capture(proxy) -> list[str]:
    lines: list[str] = []
    proxy.handler.access.sink = lines.append
    return lines


async def test_every_protocol_logs_the_same_fields_for_the_same_request(make_proxy, backend, certs):
    proxy = await make_proxy(backend)
    lines = capture(proxy)
    for proto in PROTOCOLS:
        status, headers, _ = await fetch(proxy, certs, proto, "POST", "/echo?q=1", b"x" * 1000)
        assert status == 200
    entries = [json.loads(line) for line in lines]
    assert [e["protocol"] for e in entries] == PROTOCOLS
    for entry in entries:
        assert list(entry) == FIELDS
        same = {k: entry[k] for k in FIELDS if k not in ("time", "request_id", "protocol")}
        same.pop("duration_ms")
        same.pop("upstream_ms")
        assert same == {
            "client": "127.0.0.1",
            "method": "POST",
            "host": "localhost",
            "path": "/echo",
            "status": 200,
            "bytes_in": 1000,
            "bytes_out": 1000,
            "upstream": f"127.0.0.1:{backend.port}",
            "route": "default",
            "waf": "off",
            "waf_rule": None,
        }
        assert entry["duration_ms"] >= entry["upstream_ms"] > 0
        assert entry["time"].endswith("Z") and len(entry["request_id"]) == 32
    assert len({e["request_id"] for e in entries}) == 3


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_request_id_is_generated_forwarded_and_returned(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend)
    lines = capture(proxy)
    headers = [("x-request-id", "from-an-untrusted-client")]
    _, resp_headers, _ = await fetch(proxy, certs, proto, "GET", "/x", headers=headers)
    rid = resp_headers["x-request-id"]
    assert rid != "from-an-untrusted-client" and len(rid) == 32
    sent = [v for k, v in backend.requests[-1][2] if k == "x-request-id"]
    assert sent == [rid]
    assert json.loads(lines[-1])["request_id"] == rid


async def test_request_id_and_client_of_a_trusted_proxy_are_kept(make_proxy, backend, certs):
    proxy = await make_proxy(backend, trusted_proxies=["127.0.0.0/8"])
    lines = capture(proxy)
    headers = [("x-request-id", "edge-42"), ("x-forwarded-for", "203.0.113.9, 127.0.0.5")]
    _, resp_headers, _ = await fetch(proxy, certs, "h2", "GET", "/x", headers=headers)
    assert resp_headers["x-request-id"] == "edge-42"
    assert [v for k, v in backend.requests[-1][2] if k == "x-request-id"] == ["edge-42"]
    entry = json.loads(lines[-1])
    assert (entry["request_id"], entry["client"]) == ("edge-42", "203.0.113.9")


async def test_a_waf_block_is_logged_with_verdict_and_rule(make_proxy, backend, certs):
    proxy = await make_proxy(backend, waf={"mode": "inline"})
    lines = capture(proxy)
    path = "/search?q=1%27%20UNION%20SELECT%20password%20FROM%20users--"
    status, headers, _ = await fetch(proxy, certs, "h3", "GET", path)
    assert status == 403
    entry = json.loads(lines[-1])
    assert (entry["status"], entry["waf"]) == (403, "block")
    assert entry["waf_rule"] == headers["x-waf-rule-id"]
    assert entry["upstream"] is None and entry["path"] == "/search"


async def test_off_writes_nothing(make_proxy, backend, certs):
    proxy = await make_proxy(backend, log={"access": "off"})
    lines = capture(proxy)
    assert (await fetch(proxy, certs, "h1", "GET", "/"))[0] == 200
    assert lines == []


def test_common_format_is_one_line_without_raw_control_characters():
    lines: list[str] = []
    log = AccessLog("common", lines.append)
    rec = AccessRecord("rid1", "10.0.0.1", "h2", "GET", "evil\n host", '/a"b c', 0.0, 200)
    rec.bytes_out = 12
    log.write(rec)
    (line,) = lines
    when = "[01/Jan/1970:00:00:00 +0000]"
    assert line.startswith(f'10.0.0.1 - - {when} "GET /a\\x22b\\x20c h2" 200 12')
    assert "host=evil\\x0a\\x20host" in line and "rid=rid1" in line and "\n" not in line


def test_line_writer_never_blocks_and_bounds_what_waits():
    """A pipe nobody reads: calls return at once, at most `limit` bytes wait, the rest is
    dropped and counted; read the pipe and the kept lines arrive whole, in order."""
    import os
    import time

    from quicproxy._access import LineWriter

    r, w = os.pipe()
    drops: list[int] = []
    writer = LineWriter(w, limit=256 * 1024, on_drop=lambda: drops.append(1))
    started = time.monotonic()
    for i in range(20000):  # ~1.3 MB, the pipe holds 64 KiB
        writer(f"line {i:06d} " + "x" * 50)
    assert time.monotonic() - started < 2.0  # never waited on the pipe
    assert writer.dropped > 0 and len(drops) == writer.dropped
    got = b""
    os.set_blocking(r, False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            if writer._size == 0 and not writer._lines:
                break
            time.sleep(0.01)
            continue
        got += chunk
    writer.close()
    os.close(w)
    lines = got.decode().splitlines()
    kept = 20000 - writer.dropped
    assert len(lines) == kept
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == sorted(numbers) and all(len(line) == 62 for line in lines)
    os.close(r)


def test_batches_are_cut_at_line_boundaries_within_pipe_buf():
    """Writes of at most PIPE_BUF bytes (atomic on a pipe shared with other workers and
    stderr), each made of whole lines; a longer line goes alone."""
    from quicproxy._access import PIPE_BUF, _atomic_chunks

    lines = [(f"{i:05d}" + "y" * (i % 700)).encode() + b"\n" for i in range(300)]
    lines.insert(150, b"z" * (PIPE_BUF + 10) + b"\n")
    chunks = list(_atomic_chunks(lines))
    assert b"".join(chunks) == b"".join(lines)
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= PIPE_BUF or chunk.count(b"\n") == 1


def test_json_line_is_exactly_what_json_dumps_writes():
    """The hand-built line is byte for byte json.dumps of as_dict(), for hostile text too."""
    odd = ['ev"il\\', "tab\tnew\nline", "\x00\x1f\x7f", "h\u00f6st\u2028", "\ud800lone", ""]
    for i, text in enumerate(odd):
        rec = AccessRecord(text, "10.0.0.1", "h3", text, text, text, 1.7e9 + i / 7, 200 + i)
        rec.bytes_in, rec.bytes_out, rec.duration = i, 10**12 + i, i / 3
        rec.upstream, rec.route, rec.waf_rule = (text, None, text) if i % 2 else (None, text, None)
        rec.upstream_time = None if i % 3 else i / 9
        expected = json.dumps(rec.as_dict(), ensure_ascii=True, separators=(",", ":"))
        assert rec.as_json() == expected


def test_new_request_ids_are_32_hex_digits_and_distinct():
    from quicproxy._access import new_id

    ids = [new_id() for _ in range(1000)]  # crosses several refills of the random buffer
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
