"""The QUIC side's keys: one secret, and the keys derived from it.

- One secret makes every key the QUIC side seals or signs with, each derived with
  HKDF-SHA256 (RFC 5869) under its own label: Retry tokens, session tickets
  (resumption and 0-RTT) and stateless-reset tokens. Two processes with the same
  secret (the workers of one ``quicproxy serve``, the replicas of a fleet) accept each
  other's tokens and tickets, and a node that lost a connection resets it with the
  token the connection was given.
- ``quic.shared_secret_file`` names the secret (see :func:`read_secret_file` for the
  format): the newest secret issues, the one before it is still accepted (rotation
  with an overlap). The file is read again when it changes (``refresh``).
- Without it, a random secret is made at start (a supervisor makes it before its
  workers fork, so they share it) and logged once: nothing outlives the process.
- Every secret has a one-byte id, carried in what it seals (and in every connection ID
  issued), so a token is checked with the key it was made under.

This module knows no QUIC library: ``_core.py`` uses the keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

__all__ = ["KeySet", "QuicKeys", "SecretFileError", "read_secret_file"]

log = logging.getLogger("quicproxy")

MIN_SECRET = 32
"Bytes a secret has at least (after base64 decoding)."

RESET_TOKEN_SIZE = 16
"A stateless-reset token (RFC 9000 §10.3)."


class SecretFileError(ValueError):
    """The shared secret file cannot be used (the message says why, never the secret)."""


def hkdf(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with no salt, ``label`` as the info."""
    prk = hmac.digest(b"\0" * 32, secret, "sha256")
    out = block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + label + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:length]


@dataclass(frozen=True)
class KeySet:
    """The keys derived from one secret."""

    id: int
    "One byte naming the secret (in tokens, tickets and connection IDs)."
    retry: bytes
    "AES-128-GCM key of Retry tokens."
    ticket: bytes
    "AES-256-GCM key of session tickets."
    reset: bytes
    "HMAC-SHA256 key of stateless-reset tokens."

    @classmethod
    def derive(cls, secret: bytes) -> KeySet:
        return cls(
            id=hkdf(secret, b"quicproxy key id", 1)[0],
            retry=hkdf(secret, b"quicproxy retry token", 16),
            ticket=hkdf(secret, b"quicproxy session ticket", 32),
            reset=hkdf(secret, b"quicproxy stateless reset", 32),
        )

    def reset_token(self, cid: bytes) -> bytes:
        return hmac.digest(self.reset, cid, "sha256")[:RESET_TOKEN_SIZE]


def read_secret_file(path: str) -> list[bytes]:
    """The secrets of a shared secret file, newest first.

    One secret a line, base64 (standard or URL-safe, padding optional), at least 32
    bytes decoded; empty lines and lines starting with ``#`` are skipped. The first is
    the current secret, the second (if any) the previous one, still accepted; more
    lines are an error (rotate by writing the new secret above the current one and
    dropping the oldest)."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read it ({type(exc).__name__})") from None
    secrets = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        try:
            secret = base64.b64decode(
                line.replace("-", "+").replace("_", "/") + "=" * (-len(line) % 4),
                validate=True,
            )
        except (binascii.Error, ValueError):
            raise SecretFileError(f"line {number} is not base64") from None
        if len(secret) < MIN_SECRET:
            raise SecretFileError(f"line {number} holds {len(secret)} bytes, {MIN_SECRET} needed")
        secrets.append(secret)
    if not secrets:
        raise SecretFileError("it holds no secret")
    if len(secrets) > 2:
        raise SecretFileError(f"it holds {len(secrets)} secrets: the current and previous only")
    return secrets


class QuicKeys:
    """The keys in use: ``current`` issues, every one of ``accepted`` (current first)
    validates. One object per listener, shared by its connections; ``refresh`` swaps
    the keys in place when the secret file changed."""

    def __init__(self, secrets: list[bytes], path: str = "") -> None:
        self.path = path
        "The shared secret file, or  for a secret of this process."
        self._stamp: tuple[float, int, int] | None = None
        self._use(secrets)

    @classmethod
    def random(cls) -> QuicKeys:
        return cls([os.urandom(MIN_SECRET)])

    @classmethod
    def from_file(cls, path: str) -> QuicKeys:
        keys = cls(read_secret_file(path), path)
        keys._stamp = _file_stamp(path)
        return keys

    def _use(self, secrets: list[bytes]) -> None:
        sets = [KeySet.derive(secret) for secret in secrets]
        self.current = sets[0]
        self.accepted = sets
        self.fingerprint = hashlib.sha256(secrets[0]).hexdigest()[:8]
        "Names the current secret in logs (never the secret)."

    def refresh(self) -> bool:
        """Read the secret file again if it changed; True when the keys changed. A file
        that became unusable keeps the keys in use (one warning)."""
        if not self.path:
            return False
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            secrets = read_secret_file(self.path)
        except SecretFileError as exc:
            log.warning("quic.shared_secret_file %s: %s; keeping the keys in use", self.path, exc)
            return False
        before = self.fingerprint
        self._use(secrets)
        if self.fingerprint != before:
            log.info(
                "quic.shared_secret_file: now issuing under secret %s (%d accepted)",
                self.fingerprint,
                len(self.accepted),
            )
        return True

    def for_id(self, key_id: int) -> list[KeySet]:
        """The accepted key sets a token naming ``key_id`` may be sealed with."""
        return [keys for keys in self.accepted if keys.id == key_id]

    def reset_token(self, cid: bytes) -> bytes:
        """The stateless-reset token of one of our connection IDs: under the key its
        second byte names (see ``_core.stamp``), else the current one."""
        if len(cid) > 1:
            for keys in self.accepted:
                if keys.id == cid[1]:
                    return keys.reset_token(cid)
        return self.current.reset_token(cid)


def _file_stamp(path: str) -> tuple[float, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size, st.st_ino)
