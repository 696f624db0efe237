"""Certificate rotation without restart: the pair in use, reloaded when its files change.

:class:`TlsStore` polls the certificate and key files (every second by default).
A change of inode, mtime or size, including the atomic ``..data`` symlink swap
the kubelet does for a mounted Secret, makes it read both files once, check
that the pair loads and matches, and only then switch:

- TLS over TCP: the listener's live :class:`ssl.SSLContext` loads the new pair;
  OpenSSL copies the certificate into each connection when it starts, so open
  connections keep theirs and new handshakes get the new one.
- QUIC: the QUIC listener asks :meth:`TlsStore.quic_configuration` for the
  configuration of each new connection (see ``_h3._Server``); connections
  already open keep the configuration they were created with.

A pair that does not load (half-written files, key not matching) is retried on
the next poll, then rejected with one log line; the old pair stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError
from ._metrics import metrics
from ._quic import QuicConfiguration
from ._tls import tcp_tls_context

__all__ = ["TlsStore", "TlsPair"]

log = logging.getLogger("quicproxy")
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class TlsPair:
    """One loaded certificate pair."""

    version: int
    "1 for the pair loaded at start, +1 per rotation."
    digest: str
    "SHA-256 of the certificate and key bytes."
    certificate: Any
    "Leaf certificate (cryptography x509) for QUIC."
    chain: list[Any]
    "Intermediate certificates for QUIC."
    private_key: Any
    "Private key for QUIC."


def _stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows the ..data symlink to the current file
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class TlsStore:
    """The certificate pair in use by every listener of one process."""

    def __init__(self, cert: str, key: str, poll: float = POLL_SECONDS) -> None:
        self.cert_path = cert
        self.key_path = key
        self.poll = poll
        self._task: asyncio.Task[None] | None = None
        self._scratch = tempfile.mkdtemp(prefix="quicproxy-tls-")
        self._signature = self._files_signature()
        pair_bytes = self._read()
        try:
            ctx, pair = self._load(pair_bytes, 1)
        except ConfigError:
            self.close()
            raise
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.close()
            raise ConfigError(
                "tls.cert", f"cannot load certificate/key ({exc})", "give a matching PEM pair"
            ) from None
        self.context: ssl.SSLContext = ctx
        "The TCP listener's context; reloaded in place on rotation."
        self._pair = pair
        self._quic: dict[int, QuicConfiguration] = {}
        self._failed: str | None = None

    # ------------------------------------------------------------------ reading

    def current(self) -> TlsPair:
        """The pair new handshakes use now."""
        return self._pair

    def quic_configuration(self, base: QuicConfiguration) -> QuicConfiguration:
        """``base`` with the current pair: the configuration for a new QUIC connection."""
        pair = self._pair
        if base.certificate is pair.certificate:
            return base
        cached = self._quic.get(pair.version)
        if cached is None:
            cached = dataclasses.replace(
                base,
                certificate=pair.certificate,
                certificate_chain=pair.chain,
                private_key=pair.private_key,
            )
            self._quic = {pair.version: cached}
        return cached

    # ------------------------------------------------------------------ loading

    def _files_signature(self) -> tuple[object, ...]:
        try:
            return (_stat(self.cert_path), _stat(self.key_path))
        except OSError:
            return ()

    def _read(self) -> tuple[bytes, bytes]:
        with open(self.cert_path, "rb") as fh:
            cert = fh.read()
        with open(self.key_path, "rb") as fh:
            key = fh.read()
        return cert, key

    def _load(
        self, pair: tuple[bytes, bytes], version: int, live: ssl.SSLContext | None = None
    ) -> tuple[ssl.SSLContext, TlsPair]:
        """Load both halves from one read of the files; raises if they do not fit.
        Only once both loaded is ``live`` (the listener's context) given the pair."""
        cert_file = os.path.join(self._scratch, "tls.crt")
        key_file = os.path.join(self._scratch, "tls.key")
        try:
            for path, data in ((cert_file, pair[0]), (key_file, pair[1])):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            ctx = tcp_tls_context(cert_file, key_file)  # checks the key matches
            quic = QuicConfiguration(is_client=False)
            quic.load_cert_chain(cert_file, key_file)
            if live is not None:
                live.load_cert_chain(cert_file, key_file)
        finally:
            for path in (cert_file, key_file):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        digest = hashlib.sha256(pair[0] + b"\0" + pair[1]).hexdigest()
        chain = quic.certificate_chain
        return ctx, TlsPair(version, digest, quic.certificate, chain, quic.private_key)

    def check(self) -> bool:
        """Poll once: True when a new pair was taken into use."""
        signature = self._files_signature()
        if not signature or signature == self._signature:
            return False
        try:
            data = self._read()
        except OSError as exc:
            log.debug("certificate files not readable yet: %s", exc)
            return False
        digest = hashlib.sha256(data[0] + b"\0" + data[1]).hexdigest()
        if digest == self._pair.digest:
            self._signature = signature
            return False
        try:
            _, pair = self._load(data, self._pair.version + 1, self.context)
        except (ssl.SSLError, OSError, ValueError, ConfigError) as exc:
            if self._failed == digest:  # the same bytes failed twice: not a swap in progress
                self._signature = signature
                log.error(
                    "new certificate %s / key %s rejected, keeping the old one: %s",
                    self.cert_path,
                    self.key_path,
                    exc,
                )
                _count("error")
            self._failed = digest
            return False
        self._signature = signature
        self._failed = None
        self._pair = pair
        log.info("certificate reloaded from %s (version %d)", self.cert_path, pair.version)
        _count("ok")
        return True

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Poll in the background of the running loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                self.check()
            except Exception:  # never let the watcher die
                log.exception("certificate check failed")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        shutil.rmtree(self._scratch, ignore_errors=True)


def _count(result: str) -> None:
    try:
        metrics.cert_reloads.labels(result=result).inc()
    except Exception:
        log.exception("recording a metric failed")
