"""Certificates by SNI: two pairs of ``tls.certificates`` and the default, chosen by the
same server name on TLS over TCP (Python's ssl, httpx over h2) and QUIC (aioquic), each
checked by the names of the certificate the proxy presents (one pair RSA, the others
ECDSA: the handshake's signature follows the chosen key); rotating one pair leaves the
others alone."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from quicproxy import Proxy
from quicproxy._certwatch import Certificates, certificate_names
from quicproxy._config import load_config
from quicproxy._errors import ConfigError
from quicproxy._tls import self_signed
from tests.helpers import proxy_config
from tests.test_certwatch import SecretVolume, wait_for

SHOP = ("shop.example.com",)
API = ("*.api.example.com", "api.example.com")
DEFAULT = ("default.test",)

CASES = [
    # (SNI sent, names of the certificate that must come back)
    ("shop.example.com", SHOP),
    ("SHOP.example.com.", SHOP),  # case and a trailing dot do not matter
    ("v1.api.example.com", API),  # the wildcard, one label
    ("api.example.com", API),
    ("deep.v1.api.example.com", DEFAULT),  # a wildcard matches one label only
    ("unknown.example.org", DEFAULT),
    (None, DEFAULT),  # no SNI at all
]


def _pair(folder: Path, names: tuple[str, ...], rsa_key: bool = False) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    if rsa_key:
        _rsa_self_signed(cert, key, names)
    else:
        self_signed(cert, key, list(names))
    return str(cert), str(key)


def _rsa_self_signed(cert_path: Path, key_path: Path, names: tuple[str, ...]) -> None:
    """An RSA pair (the others are ECDSA): the signature the proxy makes follows the pair."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(der: bytes) -> tuple[str, ...]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(san.get_values_for_type(x509.DNSName))


async def tcp_names(port: int, sni: str | None) -> tuple[tuple[str, ...], str | None]:
    """(DNS names of the certificate, ALPN chosen) of one TLS handshake over TCP."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    # an IP literal as server_hostname: Python's ssl sends no SNI
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=sni or "127.0.0.1"
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        return _san(tls.getpeercert(binary_form=True)), tls.selected_alpn_protocol()
    finally:
        writer.close()


async def quic_names(port: int, sni: str | None) -> tuple[str, ...]:
    """DNS names of the certificate the proxy presents over QUIC to aioquic."""
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE, server_name=sni
    )

    def protocol(quic: Any, **kw: Any) -> QuicConnectionProtocol:
        if sni is None:  # aioquic would send "127.0.0.1" as SNI: send none
            quic._configuration.server_name = None
        return QuicConnectionProtocol(quic, **kw)

    async with connect("127.0.0.1", port, configuration=config, create_protocol=protocol) as c:
        await asyncio.wait_for(c.ping(), 10)
        peer = c._quic.tls._peer_certificate
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return tuple(san.get_values_for_type(x509.DNSName))


async def h2_get(port: int, sni: str, cafile: str) -> int:
    """A GET over h2 verified against ``cafile`` for ``sni`` (the name must be in its SAN)."""
    verify = ssl.create_default_context(cafile=cafile)
    async with httpx.AsyncClient(verify=verify, http2=True, http1=False, timeout=10) as client:
        resp = await client.get(
            f"https://127.0.0.1:{port}/", headers={"host": sni}, extensions={"sni_hostname": sni}
        )
        assert resp.http_version == "HTTP/2"
        return resp.status_code


async def h3_get(port: int, sni: str, cafile: str) -> int:
    """A GET over HTTP/3, aioquic verifying the certificate against ``cafile`` for ``sni``."""
    from quicproxy._client import h3_client

    async with h3_client(f"https://127.0.0.1:{port}/", cafile=cafile, server_name=sni) as c:
        return (await asyncio.wait_for(c.request("GET", "/"), 10)).status


@pytest.fixture
def pairs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    return {
        "default": _pair(tmp_path / "default", DEFAULT),
        "shop": _pair(tmp_path / "shop", SHOP),
        "api": _pair(tmp_path / "api", API, rsa_key=True),
    }


def _config(pairs: dict[str, tuple[str, str]], backend: Any, **extra: Any) -> Any:
    listed = [{"cert": pairs[n][0], "key": pairs[n][1]} for n in ("shop", "api")]
    return proxy_config(pairs["default"], backend, tls={"certificates": listed}, **extra)


async def test_each_name_gets_its_pair_over_tcp_tls_and_quic(pairs, backend):
    proxy = Proxy(_config(pairs, backend))
    await proxy.start()
    try:
        port = proxy.https_port
        for sni, names in CASES:
            got, alpn = await tcp_names(port, sni)
            assert got == names, f"TCP TLS, SNI {sni!r}"
            assert alpn == "h2"  # ALPN survives the move to the chosen pair's context
            assert await quic_names(port, sni) == names, f"QUIC, SNI {sni!r}"
        # whole requests, each client verifying the name against the pair it expects
        for sni, pair in (("shop.example.com", "shop"), ("v1.api.example.com", "api")):
            assert await h2_get(port, sni, pairs[pair][0]) == 200
            assert await h3_get(port, sni, pairs[pair][0]) == 200
    finally:
        await proxy.stop(grace=1)


async def test_rotating_one_pair_leaves_the_others(tmp_path, pairs, backend):
    volume = SecretVolume(tmp_path / "shop-secret")
    volume.root.mkdir()
    old = _pair(tmp_path / "shop-old", SHOP)
    new = _pair(tmp_path / "shop-new", ("shop.example.com", "www.shop.example.com"))
    volume.publish_pair((Path(old[0]), Path(old[1])))
    listed = [
        {"cert": volume.cert, "key": volume.key},
        {"cert": pairs["api"][0], "key": pairs["api"][1]},
    ]
    proxy = Proxy(proxy_config(pairs["default"], backend, tls={"certificates": listed}))
    await proxy.start()
    assert proxy.tls_store is not None
    try:
        port = proxy.https_port
        before = {sni: await quic_names(port, sni) for sni, _ in CASES}
        default_before = proxy.tls_store.default.current()
        api_before = proxy.tls_store.stores[1].current()
        volume.publish_pair((Path(new[0]), Path(new[1])))

        async def rotated() -> bool:
            return (await tcp_names(port, "shop.example.com"))[0] == (
                "shop.example.com",
                "www.shop.example.com",
            )

        await wait_for(rotated)
        # the new certificate's new name is served at once, on both listeners
        assert (await tcp_names(port, "www.shop.example.com"))[0][1] == "www.shop.example.com"
        assert (await quic_names(port, "www.shop.example.com"))[1] == "www.shop.example.com"
        assert await h3_get(port, "shop.example.com", new[0]) == 200
        # every other name is served the very same pair as before
        for sni, _ in CASES:
            if sni is None or "shop" not in sni.lower():
                assert await quic_names(port, sni) == before[sni], sni
                assert (await tcp_names(port, sni))[0] == before[sni], sni
        assert proxy.tls_store.default.current() is default_before
        assert proxy.tls_store.stores[1].current() is api_before
    finally:
        await proxy.stop(grace=1)


def test_choice_is_exact_then_wildcard_then_first_listed(tmp_path):
    default = _pair(tmp_path / "d", ("www.example.com", "*.default.test"))
    wide = _pair(tmp_path / "w", ("*.example.com",))
    exact = _pair(tmp_path / "e", ("a.example.com", "*.example.com"))
    certs = Certificates(default, [wide, exact])
    try:
        assert certs.choose("a.example.com") is certs.stores[1]  # exact beats wildcard
        assert certs.choose("www.example.com") is certs.default  # the default's exact name too
        assert certs.choose("x.default.test") is certs.default
        assert certs.choose("b.example.com") is certs.stores[0]  # first listed wildcard
        assert certs.choose("example.com") is certs.default
        assert certs.choose(".example.com") is certs.default  # empty label
        assert certs.choose("") is certs.default and certs.choose(None) is certs.default
    finally:
        certs.close()


def test_names_come_from_the_san_and_ip_entries_are_left_out(tmp_path):
    cert, _ = _pair(tmp_path / "n", ("Shop.Example.com", "*.api.example.com"))
    assert certificate_names(Path(cert).read_bytes()) == ("shop.example.com", "*.api.example.com")


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"cert": "shop"}, "tls.certificates[0].key"),
        ({"cert": "/nonexistent", "key": "shop"}, "tls.certificates[0].cert"),
        ({"cert": "shop", "key": "shop", "names": ["x"]}, "tls.certificates[0].names"),
        ({"cert": "shop", "key": "shop", "default": None}, "tls.certificates"),
    ],
)
def test_a_bad_certificates_entry_is_one_error_naming_its_key(pairs, entry, key):
    entry = dict(entry)
    tls: dict[str, Any] = {"cert": pairs["default"][0], "key": pairs["default"][1]}
    if "default" in entry:  # the listed pairs without a default pair
        del entry["default"], tls["cert"], tls["key"]
    for i, part in enumerate(("cert", "key")):
        if entry.get(part) == "shop":
            entry[part] = pairs["shop"][i]
    tls["certificates"] = [entry]
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"tls": tls})
    assert err.value.key == key and "fix:" in str(err.value) and "\n" not in str(err.value)


def test_a_pair_that_does_not_load_is_refused_at_start_naming_it(tmp_path, pairs):
    with pytest.raises(ConfigError, match=r"tls\.certificates\[1\]\.cert"):
        Certificates(pairs["default"], [pairs["shop"], (pairs["api"][0], pairs["shop"][1])])


async def test_a_reload_adds_and_drops_sni_pairs_and_refuses_one_that_does_not_load(
    tmp_path, pairs, backend, caplog
):
    import logging

    import yaml

    from quicproxy._reload import ConfigSource

    def entry(name: str) -> dict[str, str]:
        return {"cert": pairs[name][0], "key": pairs[name][1]}

    def write(listed: list[dict[str, str]]) -> None:
        data = {
            "backend": backend.url,
            "listen": {"host": "127.0.0.1", "http_port": 0, "https_port": 0},
            "tls": {
                "cert": pairs["default"][0],
                "key": pairs["default"][1],
                "certificates": listed,
            },
            "log": {"access": "off"},
        }
        (tmp_path / "c.tmp").write_text(yaml.safe_dump(data))
        (tmp_path / "c.tmp").replace(path)

    path = tmp_path / "config.yaml"
    write([entry("shop")])
    source = ConfigSource(str(path), env={})
    proxy = Proxy(source.load(), source=source)
    await proxy.start()
    try:
        port = proxy.https_port
        assert await quic_names(port, "v1.api.example.com") == DEFAULT
        write([entry("shop"), entry("api")])  # a new site
        assert await proxy.reload()
        assert await quic_names(port, "v1.api.example.com") == API
        assert (await tcp_names(port, "v1.api.example.com"))[0] == API
        assert await h2_get(port, "v1.api.example.com", pairs["api"][0]) == 200
        write([entry("api")])  # one dropped
        assert await proxy.reload()
        assert await quic_names(port, "shop.example.com") == DEFAULT
        assert (await tcp_names(port, "shop.example.com"))[0] == DEFAULT
        assert (await tcp_names(port, "v1.api.example.com"))[0] == API
        # a pair whose key is another's: refused, nothing changes
        with caplog.at_level(logging.ERROR, logger="quicproxy"):
            write([entry("api"), {"cert": pairs["shop"][0], "key": pairs["api"][1]}])
            assert not await proxy.reload()
        (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert "tls.certificates[1].cert" in line and "fix:" in line
        assert (await tcp_names(port, "shop.example.com"))[0] == DEFAULT
        assert await quic_names(port, "v1.api.example.com") == API
    finally:
        await proxy.stop(grace=1)
