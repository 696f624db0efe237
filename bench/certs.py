"""One self-signed certificate for every TLS target (Caddy and quicproxy)."""

from __future__ import annotations

from pathlib import Path

from quicproxy._tls import self_signed


def make_cert(directory: Path) -> tuple[Path, Path]:
    """Write cert.pem/key.pem (ECDSA P-256, SAN localhost/127.0.0.1/::1) and return their paths.

    The same generator the proxy uses for its embedded self-signed certificate."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    self_signed(cert_path, key_path)
    return cert_path, key_path
