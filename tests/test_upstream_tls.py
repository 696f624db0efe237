"""https:// upstreams: verified TLS, mTLS, per-route TLS, pooled and resumed sessions.

Real TLS backends (asyncio + h11 behind Python's ssl, over loopback) with certificates
issued by a test CA made here; a real proxy; clients over h1, h2 and h3.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quicproxy import ConfigError, Proxy, Route, UpstreamTlsConfig
from quicproxy._config import parse_upstream
from quicproxy.upstream._member import Member, TlsProfile
from tests.backend import Backend, pattern_bytes
from tests.helpers import fetch, https_url, proxy_config, tcp_client
from tests.test_cli import assert_one_line_error, run_cli

PROTOCOLS = ["h1", "h2", "h3"]
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class _Ca:
    """A certificate authority that issues PEM files into ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = str(folder / f"{name}.pem")
        Path(self.pem).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, dns: str = "localhost", *, expired: bool = False, client: bool = False
    ) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        after = NOW - DAY if expired else NOW + 30 * DAY
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - 10 * DAY)
            .not_valid_after(after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test CA, an unknown CA, and the certificates the backends and the proxy use."""
    folder = tmp_path_factory.mktemp("upstream-pki")
    ca, other = _Ca(folder, "test-ca"), _Ca(folder, "unknown-ca")
    return {
        "ca": ca.pem,
        "other_ca": other.pem,
        "good": ca.issue("good"),
        "wrong_name": ca.issue("wrong-name", dns="wrong.example"),
        "expired": ca.issue("expired", expired=True),
        "unknown_ca": other.issue("unknown-ca-leaf"),
        "client": ca.issue("client", dns="quicproxy", client=True),
        "folder": folder,
    }


class TlsBackend(Backend):
    """The test backend behind TLS; counts handshakes and resumed sessions."""

    def __init__(
        self, pair: tuple[str, str], client_ca: str | None = None, version: str = "TLSv1_3"
    ) -> None:
        super().__init__("tls-backend")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.maximum_version = ssl.TLSVersion[version]
        self.ctx.load_cert_chain(*pair)
        self.ctx.set_alpn_protocols(["http/1.1"])
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.handshakes = 0
        self.resumed = 0
        self.alpn: list[str | None] = []

    async def start(self) -> TlsBackend:
        self.server = await asyncio.start_server(self._tls, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def _tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        self.handshakes += 1
        self.resumed += bool(tls.session_reused)
        self.alpn.append(tls.selected_alpn_protocol())
        await self._client(reader, writer)


@pytest.fixture
async def tls_backend(pki: dict[str, Any]) -> Any:
    started: list[TlsBackend] = []

    async def make(
        cert: str = "good", client_ca: str | None = None, version: str = "TLSv1_3"
    ) -> TlsBackend:
        backend = await TlsBackend(pki[cert], client_ca, version).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


def _upstream(pki: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return {"tls": {"ca": pki["ca"], **tls}}


def _quicproxy_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("quicproxy")]


# --------------------------------------------------------------------------- verified TLS


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_a_verified_backend_answers_intact_over_each_protocol(
    make_proxy, tls_backend, pki, certs, proto
):
    backend = await tls_backend()
    proxy = await make_proxy(backend, upstream=_upstream(pki))
    lines: list[str] = []
    proxy.handler.access.sink = lines.append
    status, _, body = await fetch(proxy, certs, proto, "GET", "/bytes/300000")
    assert status == 200 and body == pattern_bytes(300000)
    upload = pattern_bytes(200000)
    status, _, body = await fetch(proxy, certs, proto, "POST", "/sha256", body=upload)
    assert status == 200
    assert json.loads(body) == {"sha256": hashlib.sha256(upload).hexdigest(), "size": 200000}
    assert backend.alpn == ["http/1.1"]  # one connection, http/1.1 offered and chosen
    assert json.loads(lines[0])["upstream"] == f"https://localhost:{backend.port}"


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        ("wrong_name", "certificate name mismatch"),
        ("expired", "certificate expired"),
        ("unknown_ca", "unknown CA"),
    ],
)
async def test_a_certificate_that_fails_verification_is_a_502_with_one_log_line(
    make_proxy, tls_backend, pki, certs, caplog, cert, reason
):
    backend = await tls_backend(cert)
    proxy = await make_proxy(backend, upstream=_upstream(pki))
    with caplog.at_level(logging.DEBUG):
        for proto in PROTOCOLS:
            caplog.clear()
            status, _, body = await fetch(proxy, certs, proto, "GET", "/secret")
            assert status == 502 and body == b"502 Bad Gateway\n"
            records = _quicproxy_records(caplog)
            assert [r.levelno for r in records] == [logging.WARNING], records
            assert reason in records[0].getMessage()
            assert f"https://localhost:{backend.port}" in records[0].getMessage()
            assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)
    assert backend.requests == [] and backend.handshakes == 0


async def test_a_plain_http_server_behind_an_https_url_is_a_502_never_plaintext(
    make_proxy, certs, caplog
):
    received: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.INFO, logger="quicproxy"):
            proxy = await make_proxy(None, backend=f"https://127.0.0.1:{port}")
            status, _, _ = await fetch(proxy, certs, "h1", "GET", "/")
    finally:
        server.close()
    assert status == 502
    assert "not a TLS server" in caplog.text
    assert received and all(data.startswith(b"\x16\x03") for data in received)  # ClientHellos


async def test_server_name_sets_sni_and_the_name_verified(make_proxy, tls_backend, pki, certs):
    backend = await tls_backend()
    by_ip = f"https://127.0.0.1:{backend.port}"
    proxy = await make_proxy(None, backend=by_ip, upstream=_upstream(pki))
    assert (await fetch(proxy, certs, "h1", "GET", "/"))[0] == 502  # 127.0.0.1 is not in it
    named = await make_proxy(None, backend=by_ip, upstream=_upstream(pki, server_name="localhost"))
    assert (await fetch(named, certs, "h1", "GET", "/"))[0] == 200


async def test_verify_false_is_explicit_and_warned_about_at_start(
    make_proxy, tls_backend, certs, caplog
):
    backend = await tls_backend("unknown_ca")
    with caplog.at_level(logging.WARNING, logger="quicproxy"):
        proxy = await make_proxy(backend, upstream={"tls": {"verify": False}})
    assert "certificate verification is off" in caplog.text
    assert (await fetch(proxy, certs, "h1", "GET", "/"))[0] == 200


async def test_the_system_store_is_the_default_and_refuses_a_private_ca(
    make_proxy, tls_backend, certs
):
    backend = await tls_backend()
    proxy = await make_proxy(backend)
    assert (await fetch(proxy, certs, "h2", "GET", "/"))[0] == 502


# --------------------------------------------------------------------------- mTLS, routes


async def test_an_mtls_backend_refuses_a_proxy_without_a_client_certificate(
    make_proxy, tls_backend, pki, certs, caplog
):
    backend = await tls_backend(client_ca=pki["ca"])
    without = await make_proxy(backend, upstream=_upstream(pki))
    with caplog.at_level(logging.DEBUG):
        status, _, _ = await fetch(without, certs, "h1", "GET", "/")
    assert status == 502
    records = _quicproxy_records(caplog)
    assert len(records) == 1 and "client certificate required" in records[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert backend.requests == []
    cert, key = pki["client"]
    with_cert = await make_proxy(backend, upstream=_upstream(pki, cert=cert, key=key))
    for proto in PROTOCOLS:
        assert (await fetch(with_cert, certs, proto, "GET", "/"))[0] == 200
    assert len(backend.requests) == 3


class ThreadedTlsBackend:
    """http.server behind blocking ssl sockets (a thread): a refused handshake sends its
    alert before closing, which the asyncio backend's abort may not."""

    def __init__(self, pair: tuple[str, str], client_ca: str) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*pair)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen.append(self.path)
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


async def test_a_threaded_mtls_backend_is_refused_and_accepted_the_same_way(
    make_proxy, pki, certs, caplog
):
    backend = ThreadedTlsBackend(pki["good"], pki["ca"])
    try:
        without = await make_proxy(backend, upstream=_upstream(pki))
        with caplog.at_level(logging.WARNING, logger="quicproxy"):
            for _ in range(3):
                assert (await fetch(without, certs, "h1", "GET", "/"))[0] == 502
        records = _quicproxy_records(caplog)
        assert len(records) == 3
        assert all("client certificate required" in r.getMessage() for r in records)
        assert backend.requests == []
        cert, key = pki["client"]
        with_cert = await make_proxy(backend, upstream=_upstream(pki, cert=cert, key=key))
        status, _, body = await fetch(with_cert, certs, "h2", "GET", "/in")
        assert (status, body) == (200, b"ok") and backend.requests == ["/in"]
    finally:
        await asyncio.to_thread(backend.stop)


async def test_a_routes_tls_goes_over_the_global_one(make_proxy, tls_backend, pki, certs):
    backend = await tls_backend()
    routes = [{"path_prefix": "/own", "backends": [backend.url], "tls": {"ca": pki["ca"]}}]
    proxy = await make_proxy(backend, routes=routes, upstream={"tls": {"ca": pki["other_ca"]}})
    assert (await fetch(proxy, certs, "h1", "GET", "/own/1"))[0] == 200  # the route's CA
    assert (await fetch(proxy, certs, "h1", "GET", "/else"))[0] == 502  # the global CA


# --------------------------------------------------------------------------- pooling


async def test_pooled_connections_carry_20_requests_over_one_handshake(
    make_proxy, tls_backend, pki, certs
):
    backend = await tls_backend()
    proxy = await make_proxy(backend, upstream=_upstream(pki))
    async with tcp_client(certs, http2=False) as client:
        for i in range(20):
            resp = await client.get(https_url(proxy, f"/n/{i}"))
            assert resp.status_code == 200
    assert backend.handshakes == 1 and proxy.handler.upstream.connections_opened == 1
    assert len(backend.requests) == 20


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
async def test_a_new_connection_resumes_the_members_last_session(
    make_proxy, tls_backend, pki, certs, version
):
    backend = await tls_backend(version=version)
    proxy = await make_proxy(backend, upstream={**_upstream(pki), "pool_size": 0})
    async with tcp_client(certs, http2=False) as client:
        for i in range(5):
            assert (await client.get(https_url(proxy, f"/n/{i}"))).status_code == 200
    assert backend.handshakes == 5  # pool_size 0: every request opens a connection
    assert backend.resumed == 4 and proxy.handler.upstream.tls_resumed == 4


async def test_members_differing_only_in_tls_profile_are_pooled_apart(
    make_proxy, tls_backend, pki, certs
):
    backend = await tls_backend()
    routes = [
        {"path_prefix": "/a", "backends": [backend.url]},
        {"path_prefix": "/b", "backends": [backend.url], "tls": {"server_name": "localhost"}},
    ]
    proxy = await make_proxy(None, routes=routes, upstream=_upstream(pki))
    async with tcp_client(certs, http2=False) as client:
        for path in ("/a", "/b", "/a", "/b"):
            assert (await client.get(https_url(proxy, path))).status_code == 200
    assert backend.handshakes == 2


# --------------------------------------------------------------------------- config


def _config_error(certs: tuple[str, str], **extra: Any) -> str:
    with pytest.raises(ConfigError) as info:
        proxy_config(certs, None, **extra)
    return str(info.value)


def test_https_backends_parse_with_443_by_default():
    assert parse_upstream("backend", "https://api.internal") == ("https", "api.internal", 443)
    assert parse_upstream("backend", "api:8080") == ("http", "api", 8080)
    assert Member("api", 443, "https", TlsProfile()).label == "https://api:443"
    assert Member("10.0.0.1", 80).label == "10.0.0.1:80"


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"upstream": {"tls": {"ca": "/nonexistent/ca.pem"}}}, "upstream.tls.ca", "cannot read"),
        ({"upstream": {"tls": {"cert": "CERT"}}}, "upstream.tls.key", "both cert and key"),
        ({"upstream": {"tls": {"key": "KEY"}}}, "upstream.tls.cert", "both cert and key"),
        (
            {"routes": [{"backends": ["https://a"], "tls": {"ca": "JUNK"}}]},
            "routes[0].tls.ca",
            "no PEM",
        ),
        ({"upstream": {"tls": {"cert": "CERT", "key": "CA"}}}, "upstream.tls.key", "not a PEM"),
        ({"upstream": {"tls": {"server_name": "a b"}}}, "upstream.tls.server_name", "host name"),
        ({"backend": "ftp://a:21"}, "backend", "https://HOST:PORT"),
        ({"upstream": {"tls": {"verify": "maybe"}}}, "upstream.tls.verify", "true or false"),
    ],
)
def test_bad_upstream_tls_settings_fail_at_start_in_one_line(certs, pki, extra, key, words):
    files = {"CERT": pki["client"][0], "KEY": pki["client"][1], "CA": pki["ca"]}
    junk = pki["folder"] / "junk.pem"
    junk.write_text("not a certificate\n")
    files["JUNK"] = str(junk)
    text = json.dumps(extra)
    for name, path in files.items():
        text = text.replace(f'"{name}"', json.dumps(path))
    message = _config_error(certs, **json.loads(text))
    assert f"config error: {key}:" in message and words in message and "\n" not in message


def test_the_cli_stops_on_a_missing_ca_file_with_one_line(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text("backend: https://api.internal\nupstream: {tls: {ca: /nonexistent/ca.pem}}\n")
    proc = run_cli("serve", "--config", str(config))
    assert_one_line_error(proc, "upstream.tls.ca", "cannot read /nonexistent/ca.pem", "fix:")


async def test_routes_added_at_run_time_take_the_global_tls_or_their_own(
    make_proxy, tls_backend, pki, certs
):
    backend = await tls_backend()
    proxy: Proxy = await make_proxy(None, upstream={"tls": {"ca": pki["other_ca"]}})
    proxy.add_route(Route(backends=[backend.url], path_prefix="/global"))
    own = UpstreamTlsConfig(ca=pki["ca"])
    proxy.add_route(Route(backends=[backend.url], path_prefix="/own", tls=own))
    with pytest.raises(ConfigError, match=r"route /bad tls\.ca: cannot read"):
        bad = UpstreamTlsConfig(ca="/nonexistent/ca.pem")
        proxy.add_route(Route(backends=[backend.url], path_prefix="/bad", tls=bad))
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=certs[0])) as client:
        assert (await client.get(https_url(proxy, "/global"))).status_code == 502
        assert (await client.get(https_url(proxy, "/own"))).status_code == 200


async def test_a_websocket_reaches_a_verified_tls_backend(make_proxy, pki, certs):
    """wss through the proxy to a WebSocket server that speaks TLS: the tunnel's backend
    connection is verified like any other (and a wrong name is a 502, never plaintext)."""
    import websockets

    from tests.ws import WsBackend, client_ssl, wss

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*pki["good"])
    backend = WsBackend()
    backend.server = await websockets.serve(backend.handler, "127.0.0.1", 0, ssl=ctx)
    backend.port = backend.server.sockets[0].getsockname()[1]

    class Origin:
        url = f"https://localhost:{backend.port}"

    try:
        proxy = await make_proxy(Origin(), upstream=_upstream(pki))
        async with websockets.connect(wss(proxy, "/echo"), ssl=client_ssl(certs)) as ws:
            await ws.send("over verified TLS")
            assert await ws.recv() == "over verified TLS"
        wrong = await make_proxy(Origin(), upstream=_upstream(pki, server_name="wrong.example"))
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(wss(wrong, "/echo"), ssl=client_ssl(certs)):
                pass
        assert info.value.response.status_code == 502
        assert backend.connected == 1
    finally:
        await backend.stop()
