"""The QUIC keys a fleet shares (``quic.shared_secret_file``): a proxy that lost a
connection (it restarted, or a balancer moved the client) resets it statelessly with the
token the connection was given, and the client reconnects at once; a session ticket (with
0-RTT) and a Retry token minted by one proxy process are accepted by another, under the
previous secret too until a second rotation ends the overlap."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted

from quicproxy import Proxy, load_config
from quicproxy._client import h3_client
from quicproxy.quic._core import stamp, stateless_reset
from quicproxy.quic._keys import KeySet, QuicKeys
from quicproxy.quic._listen import Workers, quic_keys
from tests.helpers import free_port, https_url, need_tool, proxy_config

CLIENTS = Path(__file__).parent / "clients"


def secret_file(path: Path, *secrets: bytes) -> str:
    path.write_text("".join(base64.b64encode(s).decode() + "\n" for s in secrets))
    return str(path)


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """quic-go's HTTP/3 client (tests/clients/h3_restart.go), built once: a client that
    recognises stateless resets (qh3 and aioquic clients do not: qh3 drops a datagram
    for an unknown connection ID before it looks for a reset token, aioquic never does)."""
    go = "/usr/local/go/bin/go" if os.path.isfile("/usr/local/go/bin/go") else None
    go = go or need_tool("go", "install Go (https://go.dev/dl/)")
    folder = tmp_path_factory.mktemp("go-h3")
    binary = folder / "h3_restart"
    env = dict(os.environ)
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(folder / "cache")
    build = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=CLIENTS,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if build.returncode != 0:  # e.g. quic-go not in the module cache and no module proxy
        why = f"go build of the quic-go client failed: {build.stderr.strip()[-500:]}"
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    return str(binary)


class GoClient:
    """The quic-go client: one GET per ``get()``, over one kept connection."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    async def get(self) -> dict[str, Any]:
        self.proc.stdin.write(b"get\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        return json.loads(line)  # type: ignore[no-any-return]


@asynccontextmanager
async def go_client_for(binary: str, port: int, cafile: str) -> AsyncIterator[GoClient]:
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"https://127.0.0.1:{port}/hello",
        cafile,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield GoClient(proc)
    finally:
        proc.kill()
        await proc.wait()


@asynccontextmanager
async def proxy_process(config: Path, log: Path) -> AsyncIterator[Any]:
    """``quicproxy serve --config`` in a process of its own (to be killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quicproxy", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers too go with one killpg
        )
    try:
        deadline = time.monotonic() + 30
        while "is listening" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the proxy did not start"
            await asyncio.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_client_of_a_restarted_proxy_is_reset_and_reconnects_at_once(
    go_client, certs, backend, tmp_path, workers
):
    secret = secret_file(tmp_path / "secret", os.urandom(32))
    http, https = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "http_port": http, "https_port": https},
                "tls": {"cert": certs[0], "key": certs[1]},
                "backend": backend.url,
                "quic": {"shared_secret_file": secret},
                "workers": workers,
            }
        )
    )
    async with go_client_for(go_client, https, certs[0]) as client:
        async with proxy_process(config, tmp_path / "a.log") as first:
            first_get = await client.get()
            assert first_get.get("status") == 200, first_get
            assert (await client.get()).get("status") == 200  # the same connection
            os.killpg(first.pid, signal.SIGKILL)  # gone without a word to its clients
            first.wait(10)
        # the killed workers let go of the ports a moment after the supervisor: wait for them
        listen = {"host": "127.0.0.1", "http_port": http, "https_port": https, "bind_wait": 5.0}
        second = Proxy(
            proxy_config(certs, backend, listen=listen, quic={"shared_secret_file": secret})
        )
        await second.start()
        try:
            lost = await client.get()  # its datagrams reach a process that never knew it
            again = await client.get()
            resets = second._quic.stats["reset"]
        finally:
            await second.stop(grace=1)
    print(f"after the restart: {lost}, then {again}")
    assert lost.get("reset") is True, lost  # quic-go's StatelessResetError
    assert lost["seconds"] < 3.0  # not its 30 s idle timeout
    assert resets >= 1
    assert again["status"] == 200 and again["seconds"] < 2.0, again


def write_config(path: Path, certs: Any, backend: Any, https: int, **quic: Any) -> Path:
    listen = {"host": "127.0.0.1", "http_port": free_port(), "https_port": https}
    tls = {"cert": certs[0], "key": certs[1]}
    data = {"listen": listen, "tls": tls, "backend": backend.url, "quic": quic}
    path.write_text(json.dumps(data))
    return path


async def until_keys(proxy: Proxy, key_id: int) -> None:
    """Wait (bounded) for a proxy to read its rotated secret file."""
    deadline = time.monotonic() + 10
    while proxy._quic.keys.current.id != key_id:
        assert time.monotonic() < deadline, "the secret file was not read again"
        await asyncio.sleep(0.1)


async def ticket_from(port: int, certs: Any) -> Any:
    """The session ticket a proxy issues over one connection that made a GET."""
    tickets: list[Any] = []
    url = f"https://localhost:{port}/"
    async with h3_client(url, cafile=certs[0], session_ticket_handler=tickets.append) as c:
        assert (await c.request("GET", "/hello")).status == 200
        await asyncio.sleep(0.2)
    assert tickets, "no session ticket issued"
    return tickets[-1]


async def resume(proxy: Proxy, certs: Any, ticket: Any) -> tuple[bool, bool, int]:
    """A GET sent as 0-RTT with ``ticket``: (resumed, 0-RTT accepted, status)."""
    async with h3_client(
        https_url(proxy), cafile=certs[0], session_ticket=ticket, wait_connected=False
    ) as client:
        resp = await client.request("GET", "/hello")
        tls = client.proto._quic.tls
        return bool(tls.session_resumed), bool(tls.early_data_accepted), resp.status


async def test_a_session_ticket_from_one_proxy_resumes_with_0rtt_at_another(
    make_proxy, certs, backend, tmp_path
):
    s1, s2, s3 = os.urandom(32), os.urandom(32), os.urandom(32)
    shared = secret_file(tmp_path / "a-secret", s1)
    rotated = secret_file(tmp_path / "b-secret", s1)
    other = secret_file(tmp_path / "c-secret", s3)
    port = free_port()
    config = write_config(
        tmp_path / "a.yaml", certs, backend, port, shared_secret_file=shared, early_data=True
    )
    async with proxy_process(config, tmp_path / "a.log"):
        tickets = [await ticket_from(port, certs) for _ in range(3)]
    b = await make_proxy(backend, quic={"shared_secret_file": rotated, "early_data": True})
    c = await make_proxy(backend, quic={"shared_secret_file": other, "early_data": True})
    at_b = await resume(b, certs, tickets[0])
    at_c = await resume(c, certs, tickets[1])  # another secret: a full handshake
    secret_file(tmp_path / "b-secret", s2, s1)  # rotation: s2 issues, s1 still accepted
    await until_keys(b, KeySet.derive(s2).id)
    overlap = await resume(b, certs, tickets[1])
    issued_after = await ticket_from(b.https_port, certs)
    secret_file(tmp_path / "b-secret", s3, s2)  # the overlap ends: s1 is gone
    await until_keys(b, KeySet.derive(s3).id)
    after = await resume(b, certs, tickets[2])
    assert at_b == (True, True, 200)
    assert at_c == (False, False, 200)
    assert overlap == (True, True, 200)
    assert issued_after.ticket[0] == KeySet.derive(s2).id
    assert after == (False, False, 200)


def quic_client(certs: Any) -> QuicConnection:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.server_name = "localhost"
    config.load_verify_locations(certs[0])
    return QuicConnection(configuration=config)


async def retry_then(first: int, then: int, certs: Any) -> bool:
    """A client's first Initial goes to port ``first`` (it answers with a Retry); what
    follows, with the token, goes to port ``then``, as a balancer that moved the client
    would send it. True when the handshake completes there."""
    loop = asyncio.get_running_loop()
    server = ("127.0.0.1", first)  # the address the client believes it talks to
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    client = quic_client(certs)
    try:
        client.connect(server, now=time.monotonic())
        for data, _ in client.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, server)
        retry = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
        assert retry[0] & 0xF0 == 0xF0, "no Retry"  # long header, type Retry (QUIC v1)
        client.receive_datagram(retry, server, now=time.monotonic())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for data, _ in client.datagrams_to_send(now=time.monotonic()):
                sock.sendto(data, ("127.0.0.1", then))
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 0.2)
            except TimeoutError:
                continue
            client.receive_datagram(data, server, now=time.monotonic())
            while (event := client.next_event()) is not None:
                if isinstance(event, HandshakeCompleted):
                    return True
        return False
    finally:
        sock.close()


async def test_a_retry_token_minted_by_one_proxy_validates_at_another(
    make_proxy, certs, backend, tmp_path
):
    s1, s2, s3 = os.urandom(32), os.urandom(32), os.urandom(32)
    shared = secret_file(tmp_path / "a-secret", s1)
    rotated = secret_file(tmp_path / "b-secret", s1)
    port = free_port()
    config = write_config(
        tmp_path / "a.yaml", certs, backend, port, shared_secret_file=shared, retry=True
    )
    b = await make_proxy(backend, quic={"shared_secret_file": rotated, "retry": True})
    async with proxy_process(config, tmp_path / "a.log"):
        same = await retry_then(port, b.https_port, certs)
        secret_file(tmp_path / "b-secret", s2, s1)
        await until_keys(b, KeySet.derive(s2).id)
        overlap = await retry_then(port, b.https_port, certs)
        secret_file(tmp_path / "b-secret", s3, s2)
        await until_keys(b, KeySet.derive(s3).id)
        after = await retry_then(port, b.https_port, certs)
    stats = b._quic.stats
    assert same and overlap
    assert not after  # the token's secret is no longer accepted: B asks for a Retry of its own
    assert stats["retry"] >= 1 and stats["handshakes"] == 2


def test_a_connection_id_is_reset_with_the_key_of_the_secret_it_was_issued_under():
    """A connection ID names its secret (second byte): after a rotation, a process holding
    [new, previous] resets a connection opened under the previous secret with the token
    that connection was given; an ID naming no accepted secret gets the current key's."""
    s1, s2 = os.urandom(32), os.urandom(32)
    old, new = KeySet.derive(s1), KeySet.derive(s2)
    cid = stamp(os.urandom(8), 1, old.id)
    rotated = QuicKeys([s2, s1])
    assert rotated.reset_token(cid) == old.reset_token(cid)
    reset = stateless_reset(cid, 1200, rotated)
    assert reset is not None and reset.endswith(old.reset_token(cid))
    assert len(reset) == 43 and reset[0] & 0xC0 == 0x40
    unknown = stamp(cid, 1, next(i for i in range(256) if i not in (old.id, new.id)))
    assert QuicKeys([s2]).reset_token(cid) == new.reset_token(cid)
    assert rotated.reset_token(unknown) == new.reset_token(unknown)
    assert stateless_reset(cid, 22, rotated) is not None  # 21 bytes: the smallest
    assert stateless_reset(cid, 21, rotated) is None  # a reset would not be smaller


def test_workers_share_the_secret_their_supervisor_made(tmp_path):
    """``--workers N`` without a secret file: every worker derives its keys from the
    supervisor's random secret (Retry tokens and resets cross workers)."""
    cfg = load_config(env={})
    secret = os.urandom(32)
    first = quic_keys(cfg, Workers(0, 2, str(tmp_path), secret))
    second = quic_keys(cfg, Workers(1, 2, str(tmp_path), secret))
    alone = quic_keys(cfg)
    assert first.current == second.current == KeySet.derive(secret)
    assert alone.current != first.current
