"""The proxy: listeners for plain HTTP, TLS (h2/http1.1) and QUIC (h3), and their life cycle.

Signals while serving: SIGTERM and SIGINT drain and stop; SIGHUP reloads the config
(``_reload.Reloader``; the listeners, their connections and requests in flight go on)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
from typing import Protocol

from ._caps import AddressCounter
from ._certwatch import Certificates
from ._config import Config, Route
from ._errors import ConfigError
from ._h1 import H1Connection
from ._h2 import H2Connection
from ._handler import Handler
from ._memtrim import Trimmer
from ._metrics import metrics
from ._metrics_http import start_metrics_listener
from ._reload import ConfigSource, Reloader
from ._router import Router
from ._runtime import new_router
from ._sockets import bind_socket, plain_addr
from ._sslbuf import install as share_tls_buffers
from ._tls import ensure_certificate
from .quic._listen import QuicListener, Workers, start_quic_listener
from .upstream._tunnel import GOING_AWAY_WAIT

__all__ = ["Proxy", "default_ports"]

log = logging.getLogger("quicproxy")


class _Conn(Protocol):
    @property
    def busy(self) -> bool: ...

    def shutdown(self) -> None: ...


def default_ports(cfg: Config) -> tuple[int, int, str | None]:
    """(http, https, note): 80/443 as root, 8080/8443 otherwise, unless configured."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    http = cfg.listen.http_port
    https = cfg.listen.https_port
    note = None
    if http is None or https is None:
        if not root:
            note = "not running as root: using high ports (set --http-port/--https-port to change)"
        http = (80 if root else 8080) if http is None else http
        https = (443 if root else 8443) if https is None else https
    return http, https, note


def _record_waf_info(waf: object, cfg: Config) -> None:
    """The inline engine's facts as labels of quicproxy_waf_info (as `waf info` prints)."""
    from .waf._info import waf_info

    try:
        info = waf_info(waf, cfg.waf)  # type: ignore[arg-type]
        metrics.waf_info.labels(**info.labels()).set(1)
        metrics.waf_rules_loaded.labels(info.engine).set(info.rules)
    except Exception:  # metrics never stop the proxy
        log.exception("recording the WAF engine's facts failed")


class Proxy:
    """A running proxy inside the current asyncio loop.

    >>> proxy = Proxy(load_config(overrides={"backend": "http://127.0.0.1:9000"}))
    >>> await proxy.start()          # listeners are up; proxy.https_port is bound
    >>> proxy.add_route(Route(backends=["http://127.0.0.1:9001"], path_prefix="/api"))
    >>> await proxy.stop()           # graceful: drains in-flight requests
    """

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        workers: Workers | None = None,
        source: ConfigSource | None = None,
    ) -> None:
        self.config = config.validate()
        "The config in force (after a reload: the new one, restart-only settings as they were)."
        self.reuse_port = reuse_port
        self.workers = workers
        "This worker's index among several sharing the ports (QUIC hands datagrams over)."
        self._router = new_router(config)
        self.reloader = Reloader(self, source) if source is not None else None
        "Reloads the config from ``source`` on SIGHUP and when its file changes."
        self.handler: Handler | None = None
        self.http_port = 0
        self.https_port = 0
        self.cert = ""
        self.key = ""
        self.self_signed = False
        self.port_note: str | None = None
        self.metrics_port: int | None = None
        "Port of the separate metrics listener (metrics.port), once bound."
        self.tls_store: Certificates | None = None
        "The certificate pairs in use (chosen by SNI), reloaded when their files change."
        self._tcp: list[asyncio.Server] = []
        self._metrics_server: asyncio.Server | None = None
        self._quic: QuicListener | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._reloading: set[asyncio.Task[bool]] = set()
        self.per_address = AddressCounter(config.limits.max_connections_per_address)
        "Open TCP connections per client address (the QUIC listener may share it)."
        self._stopped = asyncio.Event()
        self.trimmer = Trimmer(lambda: len(self._quic.connections) if self._quic else 0)
        "Gives the heap's free pages back once connections closed (TCP counted, QUIC sampled)."

    @property
    def router(self) -> Router:
        """The router in force (a reload puts a new one in force, without routes added
        by :meth:`add_route`)."""
        return self.handler.runtime.router if self.handler is not None else self._router

    def add_route(self, route: Route) -> None:
        """Add a host/path route while running (or before start)."""
        self.router.add(route)

    def waf_loaded(self, waf: object) -> None:
        """A WAF engine was put in force (at start or by a reload): its facts as metrics."""
        if self.config.waf.mode == "inline":
            _record_waf_info(waf, self.config)

    async def reload(self, rebuild_waf: bool = True) -> bool:
        """Load the config again from its source and put it in force (as SIGHUP does);
        False when it is refused (logged) or there is no source."""
        if self.reloader is None:
            log.warning("reload: no config source (the proxy was given a Config object)")
            return False
        return await self.reloader.reload("SIGHUP", rebuild_waf=rebuild_waf)

    @property
    def using_demo_backend(self) -> bool:
        return self.router.default is None

    async def start(self) -> None:
        cfg = self.config
        self.cert, self.key, self.self_signed = ensure_certificate(cfg)
        share_tls_buffers()
        pairs = [(str(p.cert), str(p.key)) for p in cfg.tls.certificates]
        self.tls_store = Certificates((self.cert, self.key), pairs)
        tls = self.tls_store.context
        waf = None
        if cfg.waf.mode != "off":
            from .waf import create_waf

            waf = create_waf(cfg.waf)
            self.waf_loaded(waf)
        self.handler = handler = Handler(cfg, self._router, waf)
        http, https, self.port_note = default_ports(cfg)
        host = cfg.listen.host
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.listen.bind_wait
        while True:
            try:
                secure = await self._bind_all(tls, host, http, https)
                break
            except OSError as exc:
                for server in self._tcp:
                    server.close()
                self._tcp.clear()
                if self._quic is not None:
                    self._quic.close()
                    self._quic = None
                if self._metrics_server is not None:
                    self._metrics_server.close()
                    self._metrics_server = None
                if exc.errno == errno.EADDRINUSE and loop.time() < deadline:
                    log.warning("port in use (a previous instance draining?): retrying")
                    await asyncio.sleep(1.0)
                    continue
                self.tls_store.close()
                hint = "use a free port, or ports >= 1024 when not root"
                where = host or "every address"
                raise ConfigError("listen", f"cannot bind {where} ({exc.strerror})", hint) from None
        if self._quic is not None:
            self._quic.tls_store = self.tls_store
            self._quic.on_closed = self.trimmer.closed
        self.tls_store.start()
        self.trimmer.start()
        handler.start_probes()
        if self.reloader is not None:
            self.reloader.start()
        self.https_port = secure.sockets[0].getsockname()[1]
        alt = cfg.listen.alt_svc_port or self.https_port
        handler.alt_svc = f'h3=":{alt}"; ma=86400'
        if cfg.listen.alt_svc_port is None:
            cfg.listen.alt_svc_port = self.https_port

    async def _bind_all(
        self, tls: ssl.SSLContext, host: str, http: int, https: int
    ) -> asyncio.Server:
        """Every listener (plain, TLS + QUIC, metrics); the TLS server is returned."""
        cfg = self.config
        plain = await asyncio.start_server(
            lambda r, w: self._serve_tcp(r, w, None),
            sock=self._tcp_socket(host, http),
            backlog=cfg.listen.backlog,
            limit=self._line_limit(),
        )
        self._tcp.append(plain)
        self.http_port = plain.sockets[0].getsockname()[1]
        secure, self._quic = await self._bind_https(tls, host, https)
        self._tcp.append(secure)
        if cfg.metrics.port is not None:
            where = host if cfg.metrics.host is None else cfg.metrics.host
            server = await start_metrics_listener(where, cfg.metrics.port, self.reuse_port)
            self._metrics_server = server  # kept open while draining, closed last
            self.metrics_port = server.sockets[0].getsockname()[1]
        return secure

    def _line_limit(self) -> int:
        """The longest line a stream reader finds (a request head's line can use the
        whole header allowance)."""
        return max(1 << 16, self.config.limits.max_header_bytes)

    def _tcp_socket(self, host: str, port: int) -> socket.socket:
        backlog = self.config.listen.backlog
        return bind_socket(host, port, socket.SOCK_STREAM, self.reuse_port, backlog)

    async def _bind_https(
        self, tls: ssl.SSLContext, host: str, port: int
    ) -> tuple[asyncio.Server, QuicListener]:
        """Bind TCP and UDP on one port number (an ephemeral one when ``port`` is 0)."""
        assert self.handler is not None
        for _ in range(20):
            secure = await asyncio.start_server(
                lambda r, w: self._serve_tcp(r, w, "tls"),
                sock=self._tcp_socket(host, port),
                backlog=self.config.listen.backlog,
                limit=self._line_limit(),
                ssl=tls,
                ssl_handshake_timeout=10,
            )
            bound = secure.sockets[0].getsockname()[1]
            try:
                quic = await start_quic_listener(
                    self.config,
                    self.handler,
                    self.cert,
                    self.key,
                    host,
                    bound,
                    self.reuse_port,
                    self.workers,
                )
                return secure, quic
            except OSError:
                secure.close()
                if port:
                    raise
        raise OSError(98, "no port free for both TCP and UDP")

    async def _serve_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str | None
    ) -> None:
        assert self.handler is not None
        peer = plain_addr(writer.get_extra_info("peername"))[0]
        if not self.per_address.acquire(peer):
            writer.transport.abort()  # over the per-address cap: close at once
            with contextlib.suppress(Exception):
                metrics.connections_refused.labels(reason="tcp_address_connections").inc()
            return
        try:
            await self._serve_conn(reader, writer, kind)
        except asyncio.CancelledError:
            # The loop is going away after a drain: asyncio's stream callback would
            # log the cancellation of this task as an error.
            writer.transport.abort()
        except Exception:  # a bug, not the client: one traceback, the listener goes on
            log.exception("connection from %s failed", peer)
            writer.transport.abort()
        finally:
            self.per_address.release(peer)

    async def _serve_conn(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: str | None
    ) -> None:
        assert self.handler is not None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: H1Connection | H2Connection
        protocol = "h1"
        if kind == "tls":
            ssl_obj = writer.get_extra_info("ssl_object")
            alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            if alpn == "h2":
                conn = H2Connection(self.handler, reader, writer)
                protocol = "h2"
            else:
                conn = H1Connection(self.handler, reader, writer, "https")
        else:
            conn = H1Connection(self.handler, reader, writer, "http")
        if self.handler.draining:
            conn.shutdown()
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        metrics.active_connections.labels(protocol).inc()
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._tasks.discard(task)
            metrics.active_connections.labels(protocol).dec()
            self.trimmer.closed()

    async def _close_listeners(self) -> None:
        for server in self._tcp:
            server.close()
        if self._quic is not None:
            self._quic.drain()

    async def stop(self, grace: float | None = None) -> bool:
        """Drain: health 503, stop accepting, GOAWAY, wait for in-flight requests
        up to ``grace`` seconds (config shutdown_grace by default), then close.
        Returns True when every in-flight request finished in time."""
        if self.handler is None:
            return True
        grace = self.config.shutdown_grace if grace is None else grace
        self.handler.draining = True
        self.trimmer.stop()
        await self.handler.stop_probes()
        if self.reloader is not None:
            self.reloader.close()
        await self._close_listeners()
        for conn in list(self._conns):
            conn.shutdown()
        clean = await self.handler.wait_idle(grace)
        if not clean and self.handler.tunnels.go_away():
            # WebSockets still open: a 1001 Close both ways, then a moment to send it
            await self.handler.wait_idle(GOING_AWAY_WAIT + 1.0)
        if self._quic is not None:
            await self._quic.wait_closed(min(grace, 2.0))
            self._quic.close()
        for conn in list(self._conns):
            writer = getattr(conn, "writer", None)
            if writer is not None:
                writer.close()
        await self._end_connections()
        await self.handler.upstream.aclose()
        await self.handler.upstream_h2.aclose()
        if self.tls_store is not None:
            self.tls_store.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.handler.waf is not None:
            await self.handler.waf.aclose()
        await self.handler.waf_policies.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.handler.access.close)
        if self.handler.audit is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.handler.audit.close)
        self._stopped.set()
        return clean

    async def _end_connections(self) -> None:
        """Give connections a moment to close on their own, then abort and end them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for conn in list(self._conns):
            writer = getattr(conn, "writer", None)
            if writer is not None:
                writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT, then drain gracefully; returns the exit code.
        SIGHUP reloads the config meanwhile."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await stop.wait()
        log.info("shutting down: draining for up to %ss", self.config.shutdown_grace)
        clean = await self.stop()
        if not clean:
            log.warning("grace period over with requests still in flight")
        return 0

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._reloading.add(task)
        task.add_done_callback(self._reloading.discard)

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
