"""Certificates without restart: the pairs in use, chosen by SNI, reloaded when their files change.

:class:`TlsStore` is one pair; :class:`Certificates` is every pair of a process: the
default one (``tls.cert``/``tls.key``) and those of ``tls.certificates``, each serving
the names its certificate holds (subjectAltName DNS names, ``*.example.com`` matching
one label; the common name when there is none). A handshake's server name picks the
pair: an exact name first, then a wildcard, the first listed pair winning a tie and the
default pair's own names coming last; a client without SNI or with a name no pair
holds gets the default. Both listeners ask
the same :meth:`Certificates.choose`:

- TLS over TCP: the default pair's context has an ``sni_callback`` that moves the
  handshake to the chosen pair's context.
- QUIC: each new connection reads the ClientHello's server name before answering
  (``quic._core.CreditedConnection``) and takes the chosen pair's certificate and key.

Each :class:`TlsStore` polls the certificate and key files (every second by default).
A change of inode, mtime or size, including the atomic ``..data`` symlink swap
the kubelet does for a mounted Secret, makes it read both files once, check
that the pair loads and matches, and only then switch (the other pairs are
untouched; the names a rotated certificate holds are taken into use with it):

- TLS over TCP: the listener's live :class:`ssl.SSLContext` loads the new pair;
  OpenSSL copies the certificate into each connection when it starts, so open
  connections keep theirs and new handshakes get the new one.
- QUIC: the QUIC listener asks :meth:`TlsStore.quic_configuration` for the
  configuration of each new connection (see ``quic._listen.QuicListener``); connections
  already open keep the configuration they were created with.

A pair that does not load (half-written files, key not matching) is retried on
the next poll, then rejected with one log line; the old pair stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ._errors import ConfigError
from ._metrics import metrics
from ._tls import tcp_tls_context
from .quic._core import QuicConfiguration

__all__ = ["Certificates", "TlsStore", "TlsPair", "certificate_names"]

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
    "Leaf certificate (qh3's) for QUIC."
    chain: list[Any]
    "Intermediate certificates for QUIC."
    private_key: Any
    "Private key for QUIC."
    names: tuple[str, ...] = ()
    "DNS names the certificate holds (lower case; wildcards as ``*.example.com``)."


def certificate_names(pem: bytes) -> tuple[str, ...]:
    """The DNS names of a PEM certificate's leaf: its subjectAltName DNS entries, or its
    common name when it has none (IP addresses are never sent as SNI: left out)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    out: list[str] = []
    for name in names:
        name = name.strip().rstrip(".").lower()
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            continue
        if name and name not in out:
            out.append(name)
    return tuple(out)


def _stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows the ..data symlink to the current file
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class _Watched:
    """Something whose files are checked every ``poll`` seconds in the background."""

    poll: float
    _task: asyncio.Task[None] | None

    def check(self) -> bool:
        raise NotImplementedError

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

    def stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class TlsStore(_Watched):
    """One certificate pair in use by every listener of one process."""

    def __init__(
        self, cert: str, key: str, poll: float = POLL_SECONDS, setting: str = "tls.cert"
    ) -> None:
        self.cert_path = cert
        self.key_path = key
        self.setting = setting
        "The config key that named the pair (in error messages)."
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
                self.setting, f"cannot load certificate/key ({exc})", "give a matching PEM pair"
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
            ctx = tcp_tls_context(cert_file, key_file, self.setting)  # checks the key matches
            names = certificate_names(pair[0])
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
        return ctx, TlsPair(version, digest, quic.certificate, chain, quic.private_key, names)

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

    def close(self) -> None:
        self.stop_watching()
        shutil.rmtree(self._scratch, ignore_errors=True)


class Certificates(_Watched):
    """Every certificate pair of one process, watched, and the choice of one by SNI.

    >>> certs = Certificates(("tls.crt", "tls.key"), [("shop.crt", "shop.key")])
    >>> certs.choose("shop.example.com").current().names
    ('shop.example.com',)
    """

    def __init__(
        self,
        default: tuple[str, str],
        pairs: list[tuple[str, str]] | None = None,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.poll = poll
        self.default = TlsStore(*default, poll=poll)
        self.stores: list[TlsStore] = []
        "The pairs of tls.certificates, in their order."
        self._task: asyncio.Task[None] | None = None
        self._exact: dict[str, TlsStore] = {}
        self._wildcard: dict[str, TlsStore] = {}
        self.context: ssl.SSLContext = self.default.context
        "The TCP listener's context: the default pair, moved to another by SNI."
        try:
            self.use(self.load(pairs or []))
        except Exception:
            self.close()
            raise

    def load(self, pairs: list[tuple[str, str]]) -> list[TlsStore]:
        """Stores for ``pairs`` (a reload's tls.certificates): those already in use kept
        as they are, the others loaded; ConfigError naming the entry when one does not
        load. Nothing changes until :meth:`use` (or :meth:`discard`)."""
        known = {(s.cert_path, s.key_path): s for s in self.stores}
        stores: list[TlsStore] = []
        try:
            for i, (cert, key) in enumerate(pairs):
                store = known.get((cert, key))
                if store is None:
                    store = TlsStore(cert, key, self.poll, setting=f"tls.certificates[{i}].cert")
                    stores.append(store)  # closed below if a later one fails
                    if not store.current().names:
                        raise ConfigError(
                            store.setting,
                            f"{cert} holds no DNS name to serve",
                            "give a certificate whose subjectAltName lists DNS names",
                        )
                else:
                    stores.append(store)
        except Exception:
            self.discard(stores)
            raise
        return stores

    def use(self, stores: list[TlsStore]) -> None:
        """Serve ``stores`` (from :meth:`load`) from the next handshake on; pairs no longer
        listed are closed (connections open with them keep them)."""
        dropped = [s for s in self.stores if s not in stores]
        self.stores = stores
        self._index()
        self.context.sni_callback = self._sni if stores else None
        for store in dropped:
            store.close()

    def discard(self, stores: list[TlsStore]) -> None:
        """Close the stores of a :meth:`load` that will not be used."""
        for store in stores:
            if store not in self.stores:
                store.close()

    def _index(self) -> None:
        exact: dict[str, TlsStore] = {}
        wildcard: dict[str, TlsStore] = {}
        # the first listed pair wins a name two hold; the default's names come last
        for store in (*self.stores, self.default) if self.stores else ():
            for name in store.current().names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], store)
                else:
                    exact.setdefault(name, store)
        self._exact, self._wildcard = exact, wildcard

    # ------------------------------------------------------------------ choosing

    def choose(self, server_name: str | None) -> TlsStore:
        """The pair for a handshake's server name: exact name, then wildcard, else the default."""
        if not server_name or not self.stores:
            return self.default
        name = server_name.rstrip(".").lower()
        store = self._exact.get(name)
        if store is None:
            label, _, parent = name.partition(".")
            if label and parent:
                store = self._wildcard.get(parent)
        return store or self.default

    def _sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        store = self.choose(name)
        if store is not self.default:
            sslobj.context = store.context
        return None

    def quic_pair(self, server_name: str | None) -> tuple[Any, list[Any], Any]:
        """The QUIC connection's certificate, chain and key for ``server_name``."""
        pair = self.choose(server_name).current()
        return pair.certificate, pair.chain, pair.private_key

    def quic_configuration(self, base: QuicConfiguration) -> QuicConfiguration:
        """``base`` with the current default pair (see :meth:`TlsStore.quic_configuration`)."""
        return self.default.quic_configuration(base)

    # ------------------------------------------------------------------ life cycle

    def check(self) -> bool:
        """Poll every pair once: True when one of them was rotated."""
        rotated = False
        for store in (self.default, *self.stores):
            try:
                rotated = store.check() or rotated
            except Exception:  # never let one pair stop the others' checks
                log.exception("certificate check of %s failed", store.cert_path)
        if rotated:
            self._index()
        return rotated

    def close(self) -> None:
        self.stop_watching()
        for store in (self.default, *self.stores):
            store.close()


def _count(result: str) -> None:
    try:
        metrics.cert_reloads.labels(result=result).inc()
    except Exception:
        log.exception("recording a metric failed")
