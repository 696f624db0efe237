"""Upstream members: where a request goes and how its connection is secured.

A :class:`Member` is the upstream pool's key: host, port, scheme and, for
``https``, the :class:`TlsProfile` (CA, client certificate, server name,
verification). Its ``label`` is what logs show: ``host:port`` for http,
``https://host:port`` for https. :func:`client_context` builds a profile's client
SSLContext (the ALPN offers are chosen here only: :data:`ALPN` for requests, h2 and
http/1.1; :data:`TUNNEL_ALPN`, http/1.1 alone, for WebSocket tunnels), raising
:class:`ConfigError` naming the setting; :func:`tls_failure` names in a few words
why a TLS connection to a member failed (expired, name mismatch, unknown CA...).

An https member's ALPN choice decides which client carries its requests (h2: the
HTTP/2 client, else the HTTP/1.1 pool); it is learned from each new connection and
remembered by the pool. A request sent for one protocol to a connection that chose
the other is handed back with :class:`AlpnChanged` before anything of it was sent.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import NamedTuple

from .._errors import ConfigError

__all__ = [
    "ALPN",
    "TUNNEL_ALPN",
    "AlpnChanged",
    "Member",
    "ResumingContext",
    "TlsProfile",
    "client_context",
    "tls_failure",
]

ALPN = ("h2", "http/1.1")
"Protocols offered to https upstreams for requests, preferred first."
TUNNEL_ALPN = ("http/1.1",)
"Offered on a WebSocket tunnel's connection: the Upgrade is an HTTP/1.1 request."


class AlpnChanged(Exception):
    """The member's new connection chose the other protocol than the client this request
    was given to: nothing of the request was sent or read; send it again by the member's
    protocol, now learned."""


@dataclass(frozen=True)
class TlsProfile:
    """How an https member is reached (part of its pool key)."""

    ca: str | None = None
    "PEM CA bundle the member's certificate must chain to; None: the system store."
    cert: str | None = None
    "PEM client certificate chain (mTLS), with ``key``."
    key: str | None = None
    "PEM private key of ``cert``."
    server_name: str | None = None
    "SNI and the name verified; None: the URL's host."
    verify: bool = True
    "False skips certificate verification (logged at start)."


class Member(NamedTuple):
    """One upstream member: the pool key."""

    host: str
    port: int
    scheme: str = "http"
    tls: TlsProfile | None = None
    "Set for https members only."

    @property
    def label(self) -> str:
        """Readable name for logs: ``host:port``, or ``https://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "http":
            return f"{host}:{self.port}"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name sent in SNI and verified in the certificate."""
        return (self.tls.server_name if self.tls else None) or self.host


class ResumingContext(ssl.SSLContext):
    """A client context for one member that offers its last TLS session to each new
    connection (asyncio's open_connection takes no ``session``; ``wrap_bio`` does)."""

    session: ssl.SSLSession | None = None
    "The member's last resumable session (one with a ticket), offered on the next connect."

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.session
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def remember(self, tls: ssl.SSLObject | None) -> None:
        """Keep ``tls``'s session for the next connection if it can be resumed."""
        session = tls.session if tls is not None else None
        if session is not None and session.has_ticket:
            self.session = session


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def _readable(key: str, path: str, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path} ({exc.strerror})", f"give a readable {what}"
        ) from None


def client_context(
    profile: TlsProfile, section: str = "upstream.tls", alpn: tuple[str, ...] = ALPN
) -> ResumingContext:
    """The client SSLContext of ``profile`` offering ``alpn``; ConfigError naming
    ``section``'s key if its files are unreadable, not PEM, or a certificate without
    its key."""
    if (profile.cert is None) != (profile.key is None):
        missing = "key" if profile.key is None else "cert"
        raise ConfigError(
            f"{section}.{missing}",
            "a client certificate needs both cert and key",
            "set both (PEM chain and its private key) or neither",
        )
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    if not profile.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif profile.ca is not None:
        _readable(f"{section}.ca", profile.ca, "PEM CA bundle")
        try:
            ctx.load_verify_locations(cafile=profile.ca)
        except ssl.SSLError:
            raise ConfigError(
                f"{section}.ca", f"{profile.ca} holds no PEM certificate", "give a PEM CA bundle"
            ) from None
    else:
        ctx.load_default_certs()
    if profile.cert is not None and profile.key is not None:
        _readable(f"{section}.cert", profile.cert, "PEM certificate chain")
        _readable(f"{section}.key", profile.key, "PEM private key")
        try:
            ctx.load_cert_chain(profile.cert, profile.key, password=_no_password)
        except ssl.SSLError:
            raise ConfigError(
                f"{section}.key",
                f"{profile.cert} and {profile.key} are not a PEM certificate and its key",
                "give the PEM chain and its matching unencrypted private key",
            ) from None
    return ctx


_VERIFY = {
    2: "unknown CA",  # unable to get issuer certificate
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA (self-signed certificate)",
    19: "unknown CA (self-signed certificate in chain)",
    20: "unknown CA",  # unable to get local issuer certificate
    21: "unknown CA",  # unable to verify the first certificate
    23: "certificate revoked",
    62: "certificate name mismatch",
    64: "certificate IP address mismatch",
}
_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client certificate required",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake refused (a client certificate required?)",
    "TLSV1_ALERT_UNKNOWN_CA": "client certificate refused (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client certificate refused",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client certificate refused (expired)",
    "TLSV1_ALERT_DECRYPT_ERROR": "client certificate refused",
    "WRONG_VERSION_NUMBER": "not a TLS server (plain HTTP on an https URL?)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "no ALPN protocol in common",
}


def tls_failure(exc: ssl.SSLError) -> str:
    """Why a TLS connection failed, in a few words (the reason logged, never sent)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = _VERIFY.get(exc.verify_code, "certificate verification failed")
        return f"{text} ({exc.verify_message})"
    reason = getattr(exc, "reason", None) or ""
    if reason in _REASONS:
        return _REASONS[reason]
    return f"TLS error ({reason.lower().replace('_', ' ') or type(exc).__name__})"
