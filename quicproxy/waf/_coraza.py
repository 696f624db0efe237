"""Inline WAF on Coraza v3 with the OWASP CRS 4 compiled into its library.

Same shape as the ModSecurity engine (:mod:`._engine`): one rule set shared by
all transactions, and the event loop never evaluates rules. A bodiless request
(most of them) goes to the library as a message and its verdict comes back the
same way (:mod:`._channel`); requests with a body run their phases in a thread
pool (foreign calls release the GIL) as the body streams in. Either way every
core is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import struct
import time

from .._config import WafConfig
from .._errors import ConfigError
from ._channel import Verdict, VerdictChannel
from ._coraza_lib import CorazaLib, load, pack_headers
from ._matches import Match, decide
from ._pooled import PooledTransaction, PooledWaf, stamp
from ._rules import (
    EXTRA_DETECTION,
    base_directives,
    find_plugins,
    removal_directives,
    score_directives,
    settings_directives,
)
from ._types import WafDecision, WafRequest, WafUnavailable

__all__ = ["CorazaEngine", "CorazaTransaction", "CorazaWaf", "coraza_directives"]


RAW_BODY_RULE = 99007
"Our rule that hands unclaimed bodies to the raw processor (ModSecurity's local id range)."

_PROTOCOLS = {"HTTP/2": "HTTP/2.0", "HTTP/3": "HTTP/3.0"}
"What the engine is told; CRS 4 allows HTTP/2.0 and HTTP/3.0 (tx.allowed_http_versions)."

_PORTS = struct.Struct("<II")
_LENGTH = struct.Struct("<I")


def _bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def coraza_directives(config: WafConfig, crs_version: tuple[int, int, int]) -> str:
    """The whole rule set: base, CRS 4 setup, our settings, plugin config and before
    files, CRS rules (our detection rules before the blocking evaluation), plugin after
    files, extras, removals."""
    return "".join(text for text, _ in _directive_parts(config, crs_version))


def _directive_parts(
    config: WafConfig, crs_version: tuple[int, int, int]
) -> list[tuple[str, str | None]]:
    """The rule set in order, each part with the plugin file it includes (else None)."""
    limit = max(1, config.body_limit)
    plugins = find_plugins(config, crs_version)
    parts: list[tuple[str, str | None]] = [
        (base_directives(config), None),
        (f"SecRequestBodyInMemoryLimit {limit}\n", None),
        # CRS rule 901340 forces REQUEST_BODY for bodies no processor claims; Coraza
        # then parses them as urlencoded (binary uploads turn into garbage ARGS).
        # The raw processor fills REQUEST_BODY alone, as ModSecurity does.
        (
            'SecRule REQBODY_PROCESSOR "!@rx (?:URLENCODED|MULTIPART|XML|JSON)" '
            f'"id:{RAW_BODY_RULE},phase:1,pass,nolog,ctl:requestBodyProcessor=RAW"\n',
            None,
        ),
        ("Include @crs-setup.conf.example\n", None),
        (settings_directives(config, crs_version), None),
    ]
    parts += [(f"Include {path}\n", path) for path in plugins.config + plugins.before]
    parts += [
        ("Include @owasp_crs/REQUEST-9[0-3]*.conf\n", None),
        ("Include @owasp_crs/REQUEST-94[0-8]*.conf\n", None),
        (f"Include {EXTRA_DETECTION}\n" if config.extra_detection else "", None),
        (score_directives(crs_version), None),
        ("Include @owasp_crs/REQUEST-949*.conf\n", None),
        ("Include @owasp_crs/REQUEST-9[5-9]*.conf\n", None),
    ]
    parts += [(f"Include {path}\n", path) for path in plugins.after]
    for i, path in enumerate(config.extra_rules):
        if not os.path.isfile(path):
            raise ConfigError(
                f"waf.extra_rules[{i}]", f"rule file {path} not found", "fix the path"
            )
        parts.append((f"Include {os.path.abspath(path)}\n", None))
    parts.append((removal_directives(config), None))
    return parts


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def _version_tuple(text: str) -> tuple[int, int, int]:
    numbers = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    major, minor, patch = (numbers + [0, 0, 0])[:3]
    return major, minor, patch


class CorazaEngine:
    """A compiled rule set plus the worker threads that evaluate against it."""

    name = "coraza"

    def __init__(self, config: WafConfig, workers: int | None = None) -> None:
        self.config = config
        self.lib: CorazaLib = load(config.library)
        self.release = self.lib.coraza_version
        "Coraza version, e.g. 3.8.1."
        self.crs_release = self.lib.crs_version
        "CRS version compiled in, e.g. 4.25.0."
        self.version = f"Coraza v{self.release}"
        self.crs_version = _version_tuple(self.crs_release)
        parts = _directive_parts(config, self.crs_version)
        self.handle: int | None = None
        self.handle, detail = self._compile("".join(text for text, _ in parts))
        if not self.handle:
            plugin, why = self._failing_plugin(parts)
            if plugin is not None:
                raise ConfigError(
                    "waf.plugins_dir",
                    f"coraza refused {plugin}: {_first_line(why)}",
                    "fix or remove the plugin file",
                )
            raise ConfigError(
                "waf.extra_rules" if config.extra_rules else "waf",
                f"coraza refused the rules: {detail}",
                "fix or remove the rule",
            )
        self.rule_count = int(self.lib.qpc_waf_rules(self.handle))
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="waf"
        )
        self._channel: VerdictChannel | None = None

    def _compile(self, directives: str) -> tuple[int | None, str]:
        """(rule set handle, or None and the library's error)."""
        error = ctypes.c_void_p()
        handle = self.lib.qpc_waf_new(directives.encode(), ctypes.byref(error))
        if handle:
            return handle, ""
        return None, self.lib.take_text(error.value) or "unknown error"

    def _failing_plugin(self, parts: list[tuple[str, str | None]]) -> tuple[str | None, str]:
        """The first plugin file whose inclusion makes the rule set fail to compile
        (only after a failure: each try compiles the rules up to one plugin file)."""
        for end, (_, plugin) in enumerate(parts):
            if plugin is None:
                continue
            handle, detail = self._compile("".join(text for text, _ in parts[: end + 1]))
            if not handle:
                return plugin, detail
            self.lib.qpc_waf_free(handle)
        return None, ""

    def channel(self) -> VerdictChannel:
        """The running loop's channel to the library (bodiless requests' verdicts)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel.loop is not loop or self._channel.closed:
            self._close_channel()
            self._channel = VerdictChannel(
                loop, lambda fd: self.lib.qpc_channel_open(self.handle, fd)
            )
        return self._channel

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def settle(self, seconds: float = 5.0) -> None:
        """On the loop: wait (bounded) for verdicts still due, then close the channel,
        which stops the library's reader."""
        deadline = time.monotonic() + seconds
        while self._channel is not None and self._channel.waiting:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        self._close_channel()

    def close(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True)
        if self._channel is not None and not self._channel.loop.is_running():
            self._close_channel()
        if not self.handle:
            return
        deadline = time.monotonic() + 5.0
        while self.lib.qpc_pending(self.handle) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.lib.qpc_pending(self.handle):  # else a goroutine still uses the rules
            self.lib.qpc_waf_free(self.handle)
            self.handle = None


class CorazaTransaction(PooledTransaction):
    """One request through Coraza (implements ``WafTransaction``).

    Body chunks are kept here and handed over with the body phase in one pool call.
    """

    _engine: CorazaEngine

    def __init__(self, engine: CorazaEngine, request: WafRequest) -> None:
        super().__init__(engine, request)
        self._handle = 0
        self._matches: list[Match] = []
        self._body = bytearray()
        self._verdict: asyncio.Future[Verdict] | None = None

    @property
    def _open(self) -> bool:
        return bool(self._handle)

    def _take(self, data: bytes) -> None:
        self._body += data

    # -- work done in the pool ---------------------------------------------------------

    def _settle(self, status: int) -> None:
        if status < 0:
            raise WafUnavailable("the coraza engine failed on this request")
        self._blocked = status or None
        if self._blocked is not None:
            self._read_matches()

    def _read_matches(self) -> None:
        self._parse_matches(
            self._engine.lib.take_text(self._engine.lib.qpc_tx_matches(self._handle))
        )

    def _parse_matches(self, text: str) -> None:
        self._matches = []
        for line in text.splitlines():
            rule_id, severity, message, variable, data = (line.split("\t", 4) + [""] * 4)[:5]
            level = int(severity) if severity.lstrip("-").isdigit() else -1
            self._matches.append(
                Match(rule_id, message, level if 0 <= level <= 7 else None, variable, data)
            )

    def _fields(self) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
        """Client and server address, URI, method, protocol (as the engine is told) and
        the packed headers."""
        req = self._request
        return (
            _bytes(req.remote_addr),
            _bytes(req.server_addr),
            _bytes(req.uri),
            _bytes(req.method),
            _PROTOCOLS.get(req.protocol, req.protocol).encode(),
            pack_headers([(_bytes(n), _bytes(v)) for n, v in req.headers]),
        )

    def _request_args(self) -> tuple[object, ...]:
        """What opens a transaction in a foreign call (``_REQUEST`` in _coraza_lib)."""
        client, server, uri, method, protocol, headers = self._fields()
        req = self._request
        return (
            self._engine.handle,
            client,
            req.remote_port,
            server,
            req.server_port,
            uri,
            method,
            protocol,
            headers,
            len(headers),
        )

    def _start(self) -> None:
        blocked = ctypes.c_int(0)
        self._handle = self._engine.lib.qpc_tx_new(*self._request_args(), ctypes.byref(blocked))
        self._settle(blocked.value)

    def _evaluate_whole(self, body: bytes) -> None:
        """Every request phase in one foreign call: one GIL hand-over, not four."""
        lib = self._engine.lib
        fed = body if self._engine.config.body_access else b""
        blocked, matches = ctypes.c_int(0), ctypes.c_void_p()
        self._handle = lib.qpc_tx_eval(
            *self._request_args(), fed, len(fed), ctypes.byref(blocked), ctypes.byref(matches)
        )
        text = lib.take_text(matches.value)
        if blocked.value < 0:
            raise WafUnavailable("the coraza engine failed on this request")
        self._blocked = blocked.value or None
        self._parse_matches(text)

    def _finish_body(self) -> None:
        lib = self._engine.lib
        fed = len(self._body) if self._engine.config.body_access else 0
        if fed:
            self._settle(lib.qpc_tx_body(self._handle, bytes(self._body), fed))
        self._body.clear()
        if self._blocked is None:
            self._settle(lib.qpc_tx_finish(self._handle))
            if self._blocked is None:
                self._read_matches()

    def _release(self) -> None:
        self._engine.lib.qpc_tx_close(self._handle)
        self._handle = 0

    def evaluate(self, body: bytes) -> WafDecision:
        """All request phases in the calling thread (the service uses this)."""
        self._evaluate_whole(body)
        return self._decision()

    # -- bodiless requests: through the channel ----------------------------------------

    def _message(self) -> bytes:
        """The request as channel.go reads it (after the id the channel puts first)."""
        *texts, headers = self._fields()
        out = bytearray(_PORTS.pack(self._request.remote_port, self._request.server_port))
        for data in texts:
            out += _LENGTH.pack(len(data))
            out += data
        out += headers
        return bytes(out)

    def _ask(self) -> asyncio.Future[Verdict] | None:
        try:
            return self._engine.channel().ask(self._message())
        except WafUnavailable:  # no channel: the pool evaluates it
            return None

    def begin(self) -> None:
        if not self._request.has_body and self._verdict is None:
            self._verdict = self._ask()

    async def headers(self) -> WafDecision | None:
        if self._request.has_body:
            return await super().headers()
        self._started = True
        verdict = self._verdict if self._verdict is not None else self._ask()
        if verdict is None:  # the channel is full or the request too large: the pool
            await self._run(lambda: self._evaluate_whole(b""))
        else:
            status, nanos, text = await verdict
            self.engine_seconds += nanos / 1e9
            if status < 0:
                raise WafUnavailable("the coraza engine failed on this request")
            self._blocked = status or None
            self._parse_matches(text)
        self._finished = True
        return None if self._blocked is None else self._decision()

    async def close(self) -> None:
        if self._handle or self._pending is not None:
            return await super().close()
        self._closed = True  # nothing of ours in the library: its goroutine frees its own

    # -- WafTransaction ----------------------------------------------------------------

    def _decision(self) -> WafDecision:
        return stamp(decide(self._matches, self._blocked), self._engine)


class CorazaWaf(PooledWaf):
    """The ``Waf`` for mode 'inline' with engine 'coraza'."""

    transaction_class = CorazaTransaction

    def __init__(self, config: WafConfig, workers: int | None = None) -> None:
        super().__init__(CorazaEngine(config, workers))

    async def aclose(self) -> None:
        await self.engine.settle()
        await super().aclose()
