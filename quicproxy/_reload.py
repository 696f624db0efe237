"""Live reload: the config loaded again on SIGHUP or when its file changes, and swapped in.

:class:`Reloader` loads the config from where the process got it (:class:`ConfigSource`:
the file, the environment and the command line flags, in the same precedence), builds
the next :class:`Runtime` beside the running one (a new router; the WAF built again
when its settings changed, or on SIGHUP, which also rereads its rule files; built in a
thread, the event loop keeps serving; the SNI pairs of ``tls.certificates`` added or
dropped, see ``Certificates.load``) and swaps it in with ``Handler.swap``: requests
that begin afterwards use it, requests in flight finish on theirs, connections stay
open. A config that does not load (validation, a route's backend, the WAF engine or a
rule file) is refused with one log line naming the key and the fix, and the running
config stays. Settings that need a restart (``_runtime.FIXED``) keep their running
values; the log line names those the new file changes.

A retired runtime's WAF engine (and its router's ``close``, if it has one) is closed
once its last request has finished and no runtime in force shares it.

The file is polled (every second by default) for a change of inode, mtime or size,
which includes the ``..data`` symlink swap of a mounted ConfigMap; a change that leaves
the bytes as they were, or bytes that already failed, is not loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._config import Config, load_config
from ._errors import ConfigError
from ._metrics import metrics
from ._runtime import Runtime, build_runtime, effective_config, fixed_changes, new_router
from .waf._policy import WafPolicies, route_name

if TYPE_CHECKING:
    from ._server import Proxy

__all__ = ["ConfigSource", "Reloader"]

log = logging.getLogger("quicproxy")
POLL_SECONDS = 1.0


@dataclass
class ConfigSource:
    """Where the running config came from: loaded again the same way on reload."""

    path: str | None = None
    "The config file (None: flags and environment only; nothing to watch)."
    overrides: dict[str, Any] = field(default_factory=dict)
    "The command line's settings, over the file and the environment."
    env: Mapping[str, str] | None = None
    "The environment (None: os.environ as it is at each load)."
    loaded: Config | None = None
    "A copy of the config last loaded, as loaded (a worker inherits its parent's)."
    signature: tuple[int, ...] = ()
    "The file's device, inode, mtime and size when it was last read."
    digest: str = ""
    "SHA-256 of the file's bytes when it was last read."

    def load(self) -> Config:
        """The config as the file, environment and flags say now (ConfigError if not)."""
        self.signature, self.digest = file_state(self.path)
        cfg = load_config(self.path, env=self.env, overrides=self.overrides)
        self.loaded = copy.deepcopy(cfg)  # before the process fills in ports, certificates
        return cfg


def file_state(path: str | None) -> tuple[tuple[int, ...], str]:
    """(device, inode, mtime, size) and SHA-256 of the file at ``path``; empty when unreadable."""
    if not path:
        return (), ""
    try:
        st = os.stat(path)  # follows a ConfigMap's ..data symlink
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return (), ""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), hashlib.sha256(data).hexdigest()


class Reloader:
    """Reloads one process's proxy: on :meth:`reload` (SIGHUP) and on file changes."""

    def __init__(self, proxy: Proxy, source: ConfigSource, poll: float = POLL_SECONDS) -> None:
        self.proxy = proxy
        self.source = source
        self.poll = poll
        self.loaded: Config | None = None
        "The config as last loaded (before the FIXED settings were put back)."
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._signature: tuple[int, ...] = ()
        self._digest = ""
        "SHA-256 of the file's bytes last loaded or refused (not loaded again)."
        self._live: list[Runtime] = []
        "Runtimes in force or still running requests (their WAF is not closed)."
        self.reloads = 0
        "Reloads taken into use (for tests and the log)."

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Poll the file in the background of the running loop. The baseline is the file
        as it was read for the config in force (in a worker: by its parent), so a change
        made while the process started is taken at the first poll."""
        if self.source.loaded is None:
            with contextlib.suppress(ConfigError):  # the next reload names the problem
                self.source.load()
        self.loaded = self.source.loaded
        self._signature, self._digest = self.source.signature, self.source.digest
        if self.source.path and self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.check()
            except Exception:  # never let the watcher die
                log.exception("config file check failed")

    async def check(self) -> bool:
        """Poll the file once; reload when its bytes changed. True when a reload was taken."""
        assert self.source.path is not None
        try:
            st = os.stat(self.source.path)
        except OSError:
            return False  # being replaced: the next poll sees the new file
        if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) == self._signature:
            return False
        signature, digest = file_state(self.source.path)
        if not signature:
            return False  # being replaced: the next poll sees the new file
        self._signature = signature
        if digest == self._digest:
            return False
        self._digest = digest
        return await self.reload(f"{self.source.path} changed")

    # ------------------------------------------------------------------ reloading

    async def reload(self, why: str = "SIGHUP", rebuild_waf: bool = False) -> bool:
        """Load the config again and put it in force; False (one log line, nothing
        changed) when it is refused. ``rebuild_waf``: build the WAF engine again even
        when its settings are the same (its rule files are read again)."""
        async with self._lock:
            handler = self.proxy.handler
            if handler is None:
                return False
            running = handler.runtime
            certs = self.proxy.tls_store
            pairs: list[Any] | None = None
            waf = running.waf
            try:
                new = self.source.load()
                cfg = effective_config(new, self.proxy.config)
                router = new_router(cfg)
                if certs is not None and cfg.tls.certificates != running.cfg.tls.certificates:
                    pairs = certs.load([(str(c.cert), str(c.key)) for c in cfg.tls.certificates])
                if rebuild_waf or cfg.waf != running.cfg.waf:
                    waf = await self._new_waf(cfg)
                policies = running.policies
                if waf is not running.waf or _route_wafs(cfg) != _route_wafs(running.cfg):
                    policies = await self._new_policies(cfg, waf)
            except ConfigError as exc:
                self._seen()
                if certs is not None and pairs is not None:
                    certs.discard(pairs)
                log.error(
                    "config reload (%s) refused, version %d stays in force: %s",
                    why,
                    running.version,
                    exc,
                )
                _count("error")
                return False
            runtime = build_runtime(cfg, waf, previous=running, router=router, policies=policies)
            fixed = fixed_changes(self.loaded, new) if self.loaded is not None else []
            if certs is not None and pairs is not None:
                certs.use(pairs)
            self._swap(runtime)
            self._seen()
            self.loaded = new
            self.reloads += 1
            _count("ok")
            note = f"; not applied until a restart: {', '.join(fixed)}" if fixed else ""
            (log.warning if fixed else log.info)(
                "config reloaded (%s): version %d in force for new requests%s",
                why,
                runtime.version,
                note,
            )
            return True

    def _seen(self) -> None:
        """The file as this reload read it: the watcher does not load those bytes again."""
        if self.source.signature:
            self._signature, self._digest = self.source.signature, self.source.digest

    async def _new_waf(self, cfg: Config) -> Any:
        if cfg.waf.mode == "off":
            return None
        from .waf import create_waf

        loop = asyncio.get_running_loop()
        try:  # loading a rule set takes a while: the loop keeps serving meanwhile
            return await loop.run_in_executor(None, create_waf, cfg.waf)
        except ConfigError:
            raise
        except Exception as exc:  # an engine's own error: refused like a bad setting
            raise ConfigError(
                "waf", f"the WAF engine did not load ({exc})", "fix the WAF settings or rules"
            ) from None

    async def _new_policies(self, cfg: Config, waf: Any) -> WafPolicies:
        """The routes' WAF policies; their own rule sets compiled off the loop."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, WafPolicies, cfg, waf)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                "routes[].waf", f"a route's WAF rules did not load ({exc})", "fix its settings"
            ) from None

    def _swap(self, runtime: Runtime) -> None:
        proxy = self.proxy
        assert proxy.handler is not None
        if not self._live:
            self._live.append(proxy.handler.runtime)
        old = proxy.handler.swap(runtime)
        self._live.append(runtime)
        proxy.config = runtime.cfg
        proxy.per_address.limit = runtime.cfg.limits.max_connections_per_address
        if runtime.cfg.log_level != old.cfg.log_level:
            logging.getLogger().setLevel(runtime.cfg.log_level.upper())
        if runtime.waf is not None and runtime.waf is not old.waf:
            proxy.waf_loaded(runtime.waf)
        old.uses.retire(lambda: self._idle(old))

    def _idle(self, old: Runtime) -> None:
        """``old`` is retired and its last request finished: close what no one shares."""
        with contextlib.suppress(ValueError):
            self._live.remove(old)
        if old.waf is not None and all(r.waf is not old.waf for r in self._live):
            asyncio.ensure_future(_close_waf(old.waf))
        if all(r.policies is not old.policies for r in self._live):
            asyncio.ensure_future(_close_waf(old.policies))  # the routes' own rule sets
        close = getattr(old.router, "close", None)
        if callable(close) and all(r.router is not old.router for r in self._live):
            close()


def _route_wafs(cfg: Config) -> list[tuple[str, Any]]:
    """Each route's WAF policy setting, by route (what WafPolicies is built from)."""
    return [(route_name(r), r.waf) for r in cfg.routes]


def _count(result: str) -> None:
    try:
        metrics.config_reloads.labels(result=result).inc()
    except Exception:
        log.exception("recording a metric failed")


async def _close_waf(waf: Any) -> None:
    try:
        await waf.aclose()
    except Exception:
        log.exception("closing a retired WAF engine failed")
