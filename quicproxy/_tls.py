"""Certificates: the configured pair, or a self-signed one generated once and reused."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._config import Config
from ._errors import ConfigError

__all__ = ["ensure_certificate", "tcp_tls_context", "self_signed", "spki_sha256_b64"]


def _default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quicproxy"


def self_signed(cert_path: Path, key_path: Path, names: list[str] | None = None) -> None:
    """Write a new self-signed ECDSA P-256 certificate valid for localhost and loopback."""
    names = names or ["localhost"]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(cfg: Config) -> tuple[str, str, bool]:
    """Return (cert, key, generated): the configured pair or a reused/generated self-signed one."""
    if cfg.tls.cert and cfg.tls.key:
        return cfg.tls.cert, cfg.tls.key, False
    folder = Path(cfg.tls.self_signed_dir) if cfg.tls.self_signed_dir else _default_dir()
    cert, key = folder / "selfsigned.crt", folder / "selfsigned.key"
    if not (cert.exists() and key.exists()):
        try:
            self_signed(cert, key)
        except OSError as exc:
            raise ConfigError(
                "tls.self_signed_dir",
                f"cannot write a self-signed certificate to {folder} ({exc.strerror})",
                "point it at a writable folder or give --cert/--key",
            ) from None
    return str(cert), str(key), True


def tcp_tls_context(cert: str, key: str, setting: str = "tls.cert") -> ssl.SSLContext:
    """Server context for TLS over TCP, offering h2 and http/1.1 by ALPN (``setting``:
    the config key named when the pair does not load)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            setting, f"cannot load certificate/key ({exc})", "give a matching PEM pair"
        ) from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def spki_sha256_b64(cert_path: str) -> str:
    """Base64 SHA-256 of the certificate's public key (for Chromium's SPKI allow-list)."""
    import base64

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()
