"""ctypes declarations for the ModSecurity v3 C API (libmodsecurity.so.3).

Only the calls the inline WAF needs. Every rule-evaluating call releases the GIL,
so transactions evaluated from worker threads run in parallel; the cheap calls
around them keep it (see ``bind_prototypes``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_size_t,
    c_void_p,
)
from typing import Any

__all__ = ["Intervention", "LogCallback", "ModSecLib", "load_library", "text_at"]

LogCallback = CFUNCTYPE(None, c_void_p, c_void_p)
"""``void (*ModSecLogCb)(void *data, const void *message)``."""


class Intervention(Structure):
    """``ModSecurityIntervention``: what ModSecurity wants done with the request."""

    _fields_ = [
        ("status", c_int),
        ("pause", c_int),
        ("url", c_void_p),
        ("log", c_void_p),
        ("disruptive", c_int),
    ]


_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "msc_init": (c_void_p, []),
    "msc_who_am_i": (c_char_p, [c_void_p]),
    "msc_set_connector_info": (None, [c_void_p, c_char_p]),
    "msc_set_log_cb": (None, [c_void_p, LogCallback]),
    "msc_cleanup": (None, [c_void_p]),
    "msc_create_rules_set": (c_void_p, []),
    "msc_rules_add": (c_int, [c_void_p, c_char_p, POINTER(c_void_p)]),
    "msc_rules_add_file": (c_int, [c_void_p, c_char_p, POINTER(c_void_p)]),
    "msc_rules_cleanup": (c_int, [c_void_p]),
    "msc_new_transaction": (c_void_p, [c_void_p, c_void_p, c_void_p]),
    "msc_process_connection": (c_int, [c_void_p, c_char_p, c_int, c_char_p, c_int]),
    "msc_process_uri": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p]),
    "msc_add_n_request_header": (c_int, [c_void_p, c_char_p, c_size_t, c_char_p, c_size_t]),
    "msc_process_request_headers": (c_int, [c_void_p]),
    "msc_append_request_body": (c_int, [c_void_p, c_char_p, c_size_t]),
    "msc_process_request_body": (c_int, [c_void_p]),
    "msc_intervention": (c_int, [c_void_p, POINTER(Intervention)]),
    "msc_process_logging": (c_int, [c_void_p]),
    "msc_transaction_cleanup": (None, [c_void_p]),
}

_HELD = {
    "msc_new_transaction",
    "msc_process_connection",
    "msc_process_uri",
    "msc_add_n_request_header",
    "msc_append_request_body",
    "msc_intervention",
}
"Calls that evaluate no rules (connection phase: CRS has no phase-0 rules) and keep the GIL."


def bind_prototypes(
    owner: object,
    path: str,
    prototypes: dict[str, Any],
    held: set[str] | frozenset[str] = frozenset(),
) -> ctypes.CDLL:
    """Load ``path`` and set each C function, typed, as an attribute of ``owner``.

    Calls release the GIL, except those named in ``held``: calls of a few microseconds
    that evaluate no rules. A pool thread that releases the GIL must win it back from
    the busy event loop afterwards (up to the interpreter's switch interval), so a
    transaction is cheapest with the fewest releases, one per rule phase.
    """
    dll = ctypes.CDLL(path)
    keep = ctypes.PyDLL(path) if held else None
    for name, (restype, argtypes) in prototypes.items():
        func = getattr(keep if keep is not None and name in held else dll, name)
        func.restype = restype
        func.argtypes = argtypes
        setattr(owner, name, func)
    return dll


class ModSecLib:
    """The loaded library with typed entry points (attribute per C function)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dll = bind_prototypes(self, path, _PROTOTYPES, _HELD)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._free = libc.free
        self._free.argtypes = [c_void_p]
        self._free.restype = None
        # Exported from 3.0.10 on; older releases leave freeing to the caller.
        self._intervention_cleanup = getattr(self._dll, "msc_intervention_cleanup", None)
        if self._intervention_cleanup is not None:
            self._intervention_cleanup.argtypes = [POINTER(Intervention)]
            self._intervention_cleanup.restype = None

    def free(self, pointer: int | None) -> None:
        """Release a string ModSecurity allocated for us (rule errors)."""
        if pointer:
            self._free(pointer)

    def intervention_cleanup(self, it: Intervention) -> None:
        """msc_intervention_cleanup, or free url/log by hand where it is not exported."""
        if self._intervention_cleanup is not None:
            self._intervention_cleanup(ctypes.byref(it))
        else:
            self.free(it.url)
            self.free(it.log)
        it.url = None
        it.log = None

    # Typed stubs for mypy; replaced per instance by the foreign functions above.
    def __getattr__(self, name: str) -> Any:  # pragma: no cover
        raise AttributeError(name)


def load_library(path: str) -> ModSecLib:
    """Load ``path`` (a file or a soname); OSError when it cannot be loaded."""
    return ModSecLib(path)


def text_at(pointer: int | None) -> str:
    """The NUL-terminated string at ``pointer`` (UTF-8, bad bytes replaced)."""
    if not pointer:
        return ""
    return ctypes.string_at(pointer).decode("utf-8", "replace")
