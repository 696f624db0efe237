"""Framing headers are the proxy's (issue 26, item 1), checked against strict backends.

Node.js ``http`` (llhttp) refuses a request with two Content-Length fields, and Go's
``net/http`` one whose Content-Length values differ ("0005" and "5"): the proxy must send
each request upstream with exactly one framing field it computed itself, never the
client's copy beside it. Both backends (``tests/backends/``) answer with the method, the
body's length and sha256, and the framing and field names they received. Every method
with a body of 0 B to 300 KB, sent with a length and streamed, over h1, h2 and h3, must
arrive byte for byte; responses must keep to their own framing on every protocol (no
Content-Length on a 204; HEAD and 304 without a body).

The backends are required: missing node or go fails under CI and skips elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import h3, https_url, need_tool, tcp_client

BACKENDS_DIR = Path(__file__).parent / "backends"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
SIZES = [0, 1, 5, 64 * 1024, 300_000]
FRAMINGS = ["length", "stream"]
PROTOCOLS = ["h1", "h2", "h3"]


@dataclass
class Origin:
    """A backend process: ``url`` is what the proxy's config takes."""

    name: str
    url: str


def _serve(name: str, argv: list[str]) -> Iterator[Origin]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"{name} backend did not start: {err.strip()[-500:]}")
        yield Origin(name, f"http://127.0.0.1:{line}")
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _go() -> str:
    if not shutil.which("go") and os.path.isfile("/usr/local/go/bin/go"):
        return "/usr/local/go/bin/go"
    return need_tool("go", "install Go (https://go.dev/dl/) or apt-get install golang")


@pytest.fixture(scope="session")
def node_origin() -> Iterator[Origin]:
    node = need_tool("node", "apt-get install -y nodejs")
    yield from _serve("node", [node, str(BACKENDS_DIR / "echo_node.js")])


@pytest.fixture(scope="session")
def go_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    go = _go()
    folder = tmp_path_factory.mktemp("go-echo")
    binary = folder / "echo"
    env = dict(os.environ)
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(folder / "cache")  # go needs one; a fresh one is slow
    build = subprocess.run(
        [go, "build", "-o", str(binary), str(BACKENDS_DIR / "echo_go.go")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if build.returncode != 0:
        pytest.fail(f"go build of the Go backend failed: {build.stderr.strip()[-500:]}")
    yield from _serve("go", [str(binary)])


@pytest.fixture(params=["node", "go"])
def origin(request: pytest.FixtureRequest) -> Origin:
    return request.getfixturevalue(f"{request.param}_origin")  # type: ignore[no-any-return]


def pattern(size: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(size))


async def _chunks(data: bytes, size: int = 16384) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Sender:
    """One protocol's client, kept open for a test's requests."""

    def __init__(self, proto: str, proxy: Any, certs: tuple[str, str]) -> None:
        self.proto, self.proxy, self.certs = proto, proxy, certs
        self._ctx: Any = None
        self._client: Any = None

    async def __aenter__(self) -> Sender:
        if self.proto == "h3":
            self._ctx = h3(self.proxy, self.certs)
        else:
            self._ctx = tcp_client(self.certs, http2=self.proto == "h2")
        self._client = await self._ctx.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ctx.__aexit__(*exc)

    async def send(
        self, method: str, path: str, data: bytes, framing: str
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); ``framing`` 'length' sends a Content-Length, 'stream'
        the body in pieces without one (chunked on h1)."""
        if self.proto == "h3":
            content: Any = data if framing == "length" else _chunks(data)
            r = await self._client.request(method, path, [], content)
            return r.status, dict(r.headers), r.body
        content = data if framing == "length" else _chunks(data)
        resp = await self._client.request(method, https_url(self.proxy, path), content=content)
        assert resp.http_version == ("HTTP/2" if self.proto == "h2" else "HTTP/1.1")
        return resp.status_code, dict(resp.headers), resp.content


def _judge(case: str, status: int, body: bytes, method: str, data: bytes) -> str | None:
    """What is wrong with one echoed answer, or None."""
    if status != 200:
        return f"{case}: status {status} {body[:80]!r}"
    seen = json.loads(body)
    want = (method, len(data), hashlib.sha256(data).hexdigest())
    got = (seen["method"], seen["length"], seen["sha256"])
    if got != want:
        return f"{case}: backend got {got[:2]}, digest {'ok' if got[2] == want[2] else 'differs'}"
    framing = [tuple(f) for f in seen["framing"]]
    lengths = [v for k, v in framing if k == "content-length"]
    if len(framing) > 1 or any(v != str(len(data)) for v in lengths):
        return f"{case}: framing fields upstream {framing}"
    if data and not framing:
        return f"{case}: a body sent without a framing field"
    return None


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_every_method_and_body_arrives_intact(
    make_proxy: Any, certs: tuple[str, str], origin: Origin, proto: str
) -> None:
    """5 methods x 5 body sizes x 2 framings through the proxy to the backend: each request
    is answered 200 and the backend saw the method, the length and the digest sent, with
    exactly one framing field of the right value."""
    proxy = await make_proxy(origin)
    wrong: list[str] = []
    sender = await Sender(proto, proxy, certs).__aenter__()
    try:
        for framing in FRAMINGS:
            for size in SIZES:
                data = pattern(size)
                for method in METHODS:
                    case = f"{origin.name} {proto} {method} {size} B {framing}"
                    try:
                        status, _, body = await sender.send(method, "/echo", data, framing)
                    except Exception as exc:  # a reset or a dead connection: noted, go on
                        wrong.append(f"{case}: {type(exc).__name__}: {str(exc)[:80]}")
                        await sender.__aexit__(None, None, None)
                        sender = await Sender(proto, proxy, certs).__aenter__()
                        continue
                    problem = _judge(case, status, body, method, data)
                    if problem:
                        wrong.append(problem)
    finally:
        await sender.__aexit__(None, None, None)
    total = len(FRAMINGS) * len(SIZES) * len(METHODS)
    assert not wrong, f"{len(wrong)} of {total} requests went wrong:\n" + "\n".join(wrong)


CLIENT_LENGTHS = {
    "leading-zeros": [("Content-Length", "0005")],
    "repeated-line": [("Content-Length", "5"), ("Content-Length", "5")],
    "list": [("Content-Length", "5, 5")],
}


async def _raw_h1(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One request written by hand on the plain HTTP port; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_part, _, rest = response.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_part.lower():
        out, pos = b"", 0
        while True:
            line_end = rest.index(b"\r\n", pos)
            size = int(rest[pos:line_end], 16)
            if not size:
                return status, out
            out += rest[line_end + 2 : line_end + 2 + size]
            pos = line_end + 4 + size
    return status, rest


@pytest.mark.parametrize("variant", list(CLIENT_LENGTHS))
async def test_the_clients_content_length_is_never_forwarded_beside_the_proxys(
    make_proxy: Any, origin: Origin, variant: str
) -> None:
    """A Content-Length the h1 parser accepts (leading zeros, the same value repeated)
    reaches the backend as one field with the plain number."""
    proxy = await make_proxy(origin, listen={"plain_http": "proxy"})
    fields = "".join(f"{k}: {v}\r\n" for k, v in CLIENT_LENGTHS[variant])
    head = f"POST /echo HTTP/1.1\r\nHost: localhost\r\n{fields}Connection: close\r\n\r\n"
    status, body = await _raw_h1(proxy.http_port, head.encode(), b"hello")
    problem = _judge(f"{origin.name} {variant}", status, body, "POST", b"hello")
    assert problem is None, problem
    assert json.loads(body)["framing"] == [["content-length", "5"]]


async def test_hop_by_hop_fields_stop_at_the_proxy(make_proxy: Any, origin: Origin) -> None:
    """Connection and the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer,
    Upgrade and the client's Transfer-Encoding never reach the backend."""
    proxy = await make_proxy(origin, listen={"plain_http": "proxy"})
    head = (
        "POST /echo HTTP/1.1\r\nHost: localhost\r\n"
        "Connection: close, x-private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\n"
        "Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x-sum\r\n"
        "Upgrade: websocket\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
    )
    status, body = await _raw_h1(proxy.http_port, head.encode(), b"5\r\nhello\r\n0\r\n\r\n")
    assert _judge(f"{origin.name} hop-by-hop", status, body, "POST", b"hello") is None
    names = set(json.loads(body)["names"])
    hop = {"connection", "x-private", "keep-alive", "proxy-connection", "te", "trailer"}
    assert not names & (hop | {"upgrade", "transfer-encoding"})
    assert "x-kept" in names
    assert json.loads(body)["framing"] == [["content-length", "5"]]


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_responses_without_a_body_keep_their_framing(
    make_proxy: Any, certs: tuple[str, str], origin: Origin, proto: str
) -> None:
    """The backends send ``Content-Length: 5`` with 204, 304 and HEAD answers (Node even on
    the 204, which RFC 9110 8.6 forbids). The client sees no body on any protocol, no
    Content-Length on the 204, and the representation's length on HEAD; the connection
    then carries a normal request."""
    proxy = await make_proxy(origin)
    async with Sender(proto, proxy, certs) as sender:
        status, headers, body = await sender.send("GET", "/status/204", b"", "length")
        assert (status, body) == (204, b"")
        assert "content-length" not in headers
        status, headers, body = await sender.send("GET", "/status/304", b"", "length")
        assert (status, body) == (304, b"")
        assert headers.get("content-length") in (None, "5")
        if proto == "h3":
            status, headers, body = await _qh3_head(proxy, certs, "/status/200")
        else:
            status, headers, body = await sender.send("HEAD", "/status/200", b"", "length")
        assert (status, body, headers.get("content-length")) == (200, b"", "5")
        status, headers, body = await sender.send("GET", "/status/200", b"", "length")
        assert (status, body, headers.get("content-length")) == (200, b"hello", "5")


async def _qh3_head(
    proxy: Any, certs: tuple[str, str], path: str
) -> tuple[int, dict[str, str], bytes]:
    """HEAD over h3 with qh3's client. aioquic's (``quicproxy._client``) holds a HEAD
    answer's Content-Length against its empty DATA and fails the connection, though RFC
    9114 4.1.2 allows it; qh3 reads it as the proxy sends it."""
    from qh3.asyncio.client import connect
    from qh3.asyncio.protocol import QuicConnectionProtocol
    from qh3.h3.connection import H3_ALPN, H3Connection
    from qh3.h3.events import DataReceived, HeadersReceived
    from qh3.quic.configuration import QuicConfiguration

    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answer: dict[str, Any] = {"headers": {}, "body": b""}

    class Client(QuicConnectionProtocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.h3 = H3Connection(self._quic)

        def quic_event_received(self, event: Any) -> None:
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    for k, v in ev.headers:
                        answer["headers"][k.decode()] = v.decode()
                elif isinstance(ev, DataReceived):
                    answer["body"] += ev.data
                if getattr(ev, "stream_ended", False) and not done.done():
                    done.set_result(None)

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(cafile=certs[0])
    async with connect(
        "127.0.0.1", proxy.https_port, configuration=config, create_protocol=Client
    ) as client:
        sid = client._quic.get_next_available_stream_id()
        head = [(b":method", b"HEAD"), (b":scheme", b"https"), (b":authority", b"localhost")]
        client.h3.send_headers(sid, head + [(b":path", path.encode())], end_stream=True)
        client.transmit()
        await asyncio.wait_for(done, 10)
    headers = answer["headers"]
    return int(headers.pop(":status")), headers, answer["body"]


@pytest.mark.parametrize("declared", ["5", "0005"])
async def test_a_declared_length_with_no_body_is_the_clients_400_on_h3(
    make_proxy: Any, certs: tuple[str, str], go_origin: Origin, declared: str
) -> None:
    """An h3 request that declares a Content-Length and ends its stream with the HEADERS
    (qh3 does not hold the two together): 400 at once, not a head promising 5 bytes
    upstream that never come (the backend would wait for them until a timeout)."""
    proxy = await make_proxy(go_origin)
    async with h3(proxy, certs) as client:
        r = await client.request("POST", "/echo", [("content-length", declared)], None, timeout=10)
        assert r.status == 400
        r = await client.request("POST", "/echo", [], b"hello", timeout=10)  # and it goes on
        assert r.status == 200 and json.loads(r.body)["length"] == 5
