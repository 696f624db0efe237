"""ctypes declarations for the Coraza engine library (quicproxy/waf/coraza/main.go).

The library embeds a Go runtime. It is loaded on first use, in the process that
evaluates (a forked proxy worker, the WAF service), never before a fork. Every
rule-evaluating call releases the GIL, so transactions run in parallel across threads.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_void_p
from typing import Any

from .._errors import ConfigError
from ._binding import bind_prototypes

__all__ = ["CorazaLib", "library_path", "load", "pack_headers", "BUILD_HINT"]

LIBRARY_NAME = "libquicproxy-coraza.so"
SOURCE_DIR = os.path.join(os.path.dirname(__file__), "coraza")
"The Go sources; the library is built next to them by default."

BUILD_HINT = (
    "build it with `bash quicproxy/waf/coraza/build.sh` (or `python -m quicproxy.waf.build`; "
    "needs Go), point QUICPROXY_CORAZA_LIB at a built one, or use --waf-engine modsecurity"
)

_REQUEST: list[object] = [
    c_size_t,  # rule set
    c_char_p,  # client address
    c_int,  # client port
    c_char_p,  # server address
    c_int,  # server port
    c_char_p,  # URI
    c_char_p,  # method
    c_char_p,  # protocol
    c_char_p,  # packed headers
    c_int,  # their length
]
"What opens a transaction, as ``CorazaTransaction._request_args`` passes it."

_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "qpc_versions": (c_void_p, []),
    "qpc_free": (None, [c_void_p]),
    "qpc_waf_new": (c_size_t, [c_char_p, POINTER(c_void_p)]),
    "qpc_waf_rules": (c_int, [c_size_t]),
    "qpc_waf_free": (None, [c_size_t]),
    "qpc_tx_new": (c_size_t, [*_REQUEST, POINTER(c_int)]),
    "qpc_tx_eval": (c_size_t, [*_REQUEST, c_char_p, c_int, POINTER(c_int), POINTER(c_void_p)]),
    "qpc_channel_open": (c_int, [c_size_t, c_int]),
    "qpc_pending": (c_int, [c_size_t]),
    "qpc_tx_body": (c_int, [c_size_t, c_char_p, c_int]),
    "qpc_tx_finish": (c_int, [c_size_t]),
    "qpc_tx_matches": (c_void_p, [c_size_t]),
    "qpc_tx_close": (None, [c_size_t]),
}

_HELD = {
    "qpc_free",
    "qpc_tx_matches",
    "qpc_channel_open",
    "qpc_pending",
}
"""Calls of a few microseconds that keep the GIL (see ``bind_prototypes``); opening the
channel only starts a goroutine."""


class CorazaLib:
    """The loaded library with typed entry points (attribute per C function)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dll = bind_prototypes(self, path, _PROTOTYPES, _HELD)
        coraza, crs = self.take_text(self.qpc_versions()).split()
        self.coraza_version = coraza
        "Coraza module version, e.g. '3.8.1'."
        self.crs_version = crs
        "Embedded CRS version, e.g. '4.25.0'."

    def take_text(self, pointer: int | None) -> str:
        """The string at ``pointer`` (UTF-8), then free it."""
        if not pointer:
            return ""
        try:
            return ctypes.string_at(pointer).decode("utf-8", "replace")
        finally:
            self.qpc_free(pointer)

    # Typed stubs for mypy; replaced per instance by the foreign functions above.
    def __getattr__(self, name: str) -> Any:  # pragma: no cover
        raise AttributeError(name)


def library_path(configured: str | None = None) -> str:
    """waf.library, else $QUICPROXY_CORAZA_LIB, else the one built next to the sources."""
    return (
        configured
        or os.environ.get("QUICPROXY_CORAZA_LIB")
        or os.path.join(SOURCE_DIR, LIBRARY_NAME)
    )


def check_built(configured: str | None = None) -> str:
    """The library path; ConfigError (one line, with the build command) if it is absent.

    Only looks at the file, so it is safe before forking workers."""
    path = library_path(configured)
    if not os.path.isfile(path):
        raise ConfigError(
            "waf.engine", f"the coraza engine is not built ({path} is missing)", BUILD_HINT
        )
    return path


_lock = threading.Lock()
_loaded: dict[str, CorazaLib] = {}


def load(configured: str | None = None) -> CorazaLib:
    """Load (once per process and path) the Coraza library."""
    path = check_built(configured)
    with _lock:
        lib = _loaded.get(path)
        if lib is None:
            try:
                lib = _loaded[path] = CorazaLib(path)
            except (OSError, AttributeError, ValueError) as exc:
                raise ConfigError(
                    "waf.library", f"cannot load the coraza engine {path} ({exc})", BUILD_HINT
                ) from None
        return lib


def pack_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Headers as the library reads them: length-prefixed (u32 LE) name, value, ..."""
    out = bytearray()
    for name, value in headers:
        out += struct.pack("<I", len(name)) + name + struct.pack("<I", len(value)) + value
    return bytes(out)
