"""Inline WAF: ModSecurity v3 with the OWASP CRS, in this process, via ctypes.

One rule set is shared by all transactions. Each engine call runs in a thread
pool (foreign calls release the GIL), so the event loop never waits on rule
evaluation and transactions are evaluated in parallel across cores.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import os
import threading
from dataclasses import dataclass

from .._config import WafConfig
from .._errors import ConfigError
from ._binding import Intervention, LogCallback, ModSecLib, load_library, text_at
from ._matches import make_decision
from ._pooled import PooledTransaction, PooledWaf, stamp
from ._rules import INSTALL_HINT, CrsLayout, RuleSource, find_crs, rule_sources
from ._types import WafDecision, WafRequest

__all__ = ["Engine", "InlineWaf", "InlineTransaction", "engine_version"]


MODSECURITY_LIBRARY = "libmodsecurity.so.3"
"Soname loaded when waf.library is unset."

_HTTP_VERSIONS = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2": "2.0", "HTTP/3": "3.0"}


def _bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


class _Runtime:
    """The process-wide ModSecurity instance for one library (shared by engines).

    Log lines arrive through one callback whose data pointer is a transaction
    key; each transaction registers the list its lines go to.
    """

    _lock = threading.Lock()
    _instances: dict[str, _Runtime] = {}

    def __init__(self, lib: ModSecLib) -> None:
        self.lib = lib
        self.users = 0
        self.lines: dict[int, list[str]] = {}
        self._keys = itertools.count(1)
        self.handle = lib.msc_init()
        lib.msc_set_connector_info(self.handle, b"quicproxy-waf")
        self._callback = LogCallback(self._on_log)
        lib.msc_set_log_cb(self.handle, self._callback)
        self.version = (lib.msc_who_am_i(self.handle) or b"").decode(errors="replace")

    def _on_log(self, data: int | None, message: int | None) -> None:
        sink = self.lines.get(data or 0)
        if sink is not None and message:
            sink.append(ctypes.string_at(message).decode("utf-8", "replace"))

    def register(self) -> tuple[int, list[str]]:
        key = next(self._keys)
        sink: list[str] = []
        self.lines[key] = sink
        return key, sink

    def unregister(self, key: int) -> None:
        self.lines.pop(key, None)

    @classmethod
    def acquire(cls, library: str) -> _Runtime:
        with cls._lock:
            runtime = cls._instances.get(library)
            if runtime is None:
                try:
                    lib = load_library(library)
                except (OSError, AttributeError) as exc:
                    raise ConfigError(
                        "waf.library", f"cannot load ModSecurity {library} ({exc})", INSTALL_HINT
                    ) from None
                runtime = cls._instances[library] = _Runtime(lib)
            runtime.users += 1
            return runtime

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                del self._instances[self.lib.path]
                self.lib.msc_cleanup(self.handle)


def engine_version(library: str = MODSECURITY_LIBRARY) -> str:
    """'ModSecurity v3.0.9 (Linux)'; ConfigError if the library is missing."""
    runtime = _Runtime.acquire(library)
    try:
        return runtime.version
    finally:
        runtime.release()


@dataclass
class _Phase:
    """Result of driving ModSecurity through some phases."""

    status: int | None
    "Status to block with, None when ModSecurity did not intervene."


class Engine:
    """A loaded rule set plus the worker threads that evaluate against it."""

    name = "modsecurity"

    def __init__(self, config: WafConfig, workers: int | None = None) -> None:
        self.config = config
        self.crs: CrsLayout = find_crs(config.rules_dir)
        self._runtime = _Runtime.acquire(config.library or MODSECURITY_LIBRARY)
        self.lib = self._runtime.lib
        self.rules: int | None = self.lib.msc_create_rules_set()
        try:
            self.rule_count = sum(self._load(source) for source in rule_sources(config, self.crs))
        except BaseException:
            self.close()
            raise
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="waf"
        )
        self.http3_version = "3.0" if self.crs.version[0] >= 4 else "2.0"
        """CRS 3.x predates HTTP/3 (it would flag the version and a missing
        Content-Length); it is evaluated as the HTTP/2 it resembles there."""

    @property
    def version(self) -> str:
        return self._runtime.version

    @property
    def release(self) -> str:
        """'3.0.9' out of 'ModSecurity v3.0.9 (Linux)'."""
        words = self.version.split()
        return words[1].lstrip("v") if len(words) > 1 else self.version

    @property
    def crs_version(self) -> tuple[int, int, int]:
        return self.crs.version

    @property
    def crs_release(self) -> str:
        return ".".join(map(str, self.crs.version))

    def _load(self, source: RuleSource) -> int:
        error = ctypes.c_void_p()
        if source.text is None:
            if not os.path.isfile(source.name):
                raise ConfigError(source.key, f"rule file {source.name} not found", "fix the path")
            count = self.lib.msc_rules_add_file(
                self.rules, os.fsencode(source.name), ctypes.byref(error)
            )
        else:
            count = self.lib.msc_rules_add(self.rules, source.text.encode(), ctypes.byref(error))
        if count < 0:
            detail = " ".join(text_at(error.value).split()) or "unknown error"
            self.lib.free(error.value)
            raise ConfigError(
                source.key, f"rule error in {source.name}: {detail}", "fix or remove the rule"
            )
        return int(count)

    def new_transaction(self) -> tuple[int, int, list[str]]:
        """(C transaction, log key, log lines) for one request."""
        key, sink = self._runtime.register()
        handle = self.lib.msc_new_transaction(self._runtime.handle, self.rules, key)
        return handle, key, sink

    def end_transaction(self, handle: int, key: int) -> None:
        self.lib.msc_process_logging(handle)
        self.lib.msc_transaction_cleanup(handle)
        self._runtime.unregister(key)

    def intervention(self, handle: int, sink: list[str]) -> int | None:
        """Status to block with when ModSecurity wants to intervene, else None."""
        it = Intervention(status=200)
        if not self.lib.msc_intervention(handle, ctypes.byref(it)):
            return None
        if it.log:
            sink.append(text_at(it.log))
        status = it.status if it.status >= 300 else 403
        self.lib.intervention_cleanup(it)
        return status

    def close(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True)
        if self.rules is not None:
            self.lib.msc_rules_cleanup(self.rules)
            self.rules = None
            self._runtime.release()


class InlineTransaction(PooledTransaction):
    """One request through the inline engine (implements ``WafTransaction``)."""

    _engine: Engine

    def __init__(self, engine: Engine, request: WafRequest) -> None:
        super().__init__(engine, request)
        self._handle: int | None = None
        self._key = 0
        self._lines: list[str] = []
        self._body_access = engine.config.body_access

    @property
    def _open(self) -> bool:
        return self._handle is not None

    def _take(self, data: bytes) -> None:
        if self._handle is not None and data and self._body_access:
            # Appending copies into ModSecurity's buffer: cheap, done on the loop.
            self._append(data)

    # -- work done in the pool ---------------------------------------------------------

    def _start(self) -> None:
        engine, req = self._engine, self._request
        lib = engine.lib
        self._handle, self._key, self._lines = engine.new_transaction()
        handle = self._handle
        lib.msc_process_connection(
            handle,
            _bytes(req.remote_addr),
            req.remote_port,
            _bytes(req.server_addr),
            req.server_port,
        )
        version = _HTTP_VERSIONS.get(req.protocol, "1.1")
        if req.protocol == "HTTP/3":
            version = engine.http3_version
        uri = _bytes(req.uri.replace("\0", "%00"))
        lib.msc_process_uri(handle, uri, _bytes(req.method), version.encode())
        self._blocked = engine.intervention(handle, self._lines)
        if self._blocked is None:
            for name, value in req.headers:
                key, data = _bytes(name), _bytes(value)
                lib.msc_add_n_request_header(handle, key, len(key), data, len(data))
            lib.msc_process_request_headers(handle)
            self._blocked = engine.intervention(handle, self._lines)

    def _finish_body(self) -> None:
        assert self._handle is not None
        self._engine.lib.msc_process_request_body(self._handle)
        self._blocked = self._engine.intervention(self._handle, self._lines)

    def _append(self, data: bytes) -> None:
        assert self._handle is not None
        self._engine.lib.msc_append_request_body(self._handle, data, len(data))

    def _release(self) -> None:
        assert self._handle is not None
        self._engine.end_transaction(self._handle, self._key)
        self._handle = None

    def evaluate(self, body: bytes) -> WafDecision:
        """All request phases in the calling thread (the service uses this)."""
        self._start()
        if self._blocked is None:
            if body:
                self._append(body)
            self._finish_body()
        return self._decision()

    # -- WafTransaction ----------------------------------------------------------------

    def _decision(self) -> WafDecision:
        return stamp(make_decision(self._lines, self._blocked), self._engine)


class InlineWaf(PooledWaf):
    """The ``Waf`` for mode 'inline'."""

    transaction_class = InlineTransaction

    def __init__(self, config: WafConfig, workers: int | None = None) -> None:
        super().__init__(Engine(config, workers))

    def transaction(self, request: WafRequest) -> InlineTransaction:
        return InlineTransaction(self.engine, request)
