"""Command line: `quicproxy serve`, `quicproxy waf serve|info|tune|test`, `quicproxy get`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, NoReturn

from . import __version__
from ._config import Config, load_config
from ._errors import ConfigError
from ._metrics import mark_worker_dead, metrics, multiprocess_dir
from ._reload import ConfigSource
from ._server import Proxy, default_ports
from ._tls import ensure_certificate
from .quic._listen import Workers, handover_folder, new_generation

__all__ = ["main"]

log = logging.getLogger("quicproxy")


_ENGINES = ("coraza", "modsecurity")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"quicproxy: {message} (see quicproxy {self.prog.split()[-1]} --help)\n")


def _parser() -> argparse.ArgumentParser:
    top = _Parser(prog="quicproxy", description="HTTP/3 edge reverse proxy with a WAF")
    top.add_argument("--version", action="version", version=f"quicproxy {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file")
    serve.add_argument("--backend", help="default upstream, http(s)://HOST:PORT")
    serve.add_argument("--host", help="address to listen on")
    serve.add_argument("--http-port", help="plain HTTP port")
    serve.add_argument("--https-port", help="TLS TCP and QUIC UDP port")
    serve.add_argument("--alt-svc-port", help="port advertised in Alt-Svc")
    serve.add_argument("--cert", help="PEM certificate chain")
    serve.add_argument("--key", help="PEM private key")
    serve.add_argument("--waf", choices=("off", "inline", "service"), help="WAF mode")
    serve.add_argument("--waf-engine", choices=_ENGINES, help="inline WAF engine")
    serve.add_argument("--waf-url", help="WAF service URL for --waf service")
    serve.add_argument("--waf-fail", choices=("closed", "open"), help="when the WAF is down")
    serve.add_argument("--workers", help="worker processes")
    serve.add_argument("--metrics-port", help="serve /metrics on this port (not the http port)")
    serve.add_argument("--metrics-host", help="address of the metrics listener")
    serve.add_argument("--access-log", choices=("json", "common", "off"), help="access log")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    waf = sub.add_parser("waf", help="WAF service commands")
    waf_sub = waf.add_subparsers(dest="waf_command", required=True, parser_class=_Parser)
    wserve = waf_sub.add_parser("serve", help="run the standalone WAF service")
    wserve.add_argument("--config", help="YAML config file (its waf: section is used)")
    wserve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    wserve.add_argument("--port", default="9000", help="port to listen on")
    wserve.add_argument("--waf-engine", choices=_ENGINES, help="WAF engine")
    winfo = waf_sub.add_parser("info", help="load the WAF and print engine, CRS and rule count")
    winfo.add_argument("--config", help="YAML config file (its waf: section is used)")
    winfo.add_argument("--waf-engine", choices=_ENGINES, help="WAF engine")
    wtune = waf_sub.add_parser(
        "tune", help="propose exclusions from the audit log of a benign detection period"
    )
    wtune.add_argument(
        "audit_log", metavar="AUDIT_LOG", help="audit records, JSON lines (- for stdin)"
    )
    wtune.add_argument("--config", help="YAML config file (routes are named by their index)")
    wtune.add_argument("--min-count", type=int, default=1, help="propose only what N requests hit")
    wtune.add_argument("-o", "--output", help="also write the proposals to this file")
    wtest = waf_sub.add_parser(
        "test", help="replay recorded requests through the configured WAF policy"
    )
    wtest.add_argument(
        "requests", metavar="REQUESTS_FILE", help="requests or audit records, JSON lines"
    )
    wtest.add_argument("--config", help="YAML config file (its waf: and routes: are used)")
    wtest.add_argument("--waf-engine", choices=_ENGINES, help="WAF engine")
    wtest.add_argument(
        "--route-aware", action="store_true", help="apply each route's routes[].waf policy"
    )

    get = sub.add_parser("get", help="fetch a URL over HTTP/3 and print the body")
    get.add_argument("url")
    get.add_argument("-k", "--insecure", action="store_true", help="do not verify the certificate")
    get.add_argument("--cacert", help="CA bundle to verify with")
    get.add_argument("-i", "--include", action="store_true", help="print status and headers")
    return top


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    listen: dict[str, Any] = {}
    for flag, key in (
        ("http_port", "http_port"),
        ("https_port", "https_port"),
        ("alt_svc_port", "alt_svc_port"),
        ("host", "host"),
    ):
        value = getattr(args, flag)
        if value is not None:
            listen[key] = value
    if listen:
        out["listen"] = listen
    if args.backend is not None:
        out["backend"] = args.backend
    tls = {k: getattr(args, k) for k in ("cert", "key") if getattr(args, k) is not None}
    if tls:
        out["tls"] = tls
    waf: dict[str, Any] = {}
    if args.waf is not None:
        waf["mode"] = args.waf
    if args.waf_url is not None:
        waf["url"] = args.waf_url
    if args.waf_fail is not None:
        waf["fail"] = args.waf_fail
    if args.waf_engine is not None:
        waf["engine"] = args.waf_engine
    if waf:
        out["waf"] = waf
    if args.workers is not None:
        out["workers"] = args.workers
    mopts = {"port": args.metrics_port, "host": args.metrics_host}
    if any(v is not None for v in mopts.values()):
        out["metrics"] = {k: v for k, v in mopts.items() if v is not None}
    if args.access_log is not None:
        out["log"] = {"access": args.access_log}
    if args.log_level is not None:
        out["log_level"] = args.log_level
    return out


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("quic", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _banner(proxy: Proxy) -> str:
    cfg = proxy.config
    host = cfg.listen.host
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    http, https = proxy.http_port, proxy.https_port
    lines = [f"quicproxy {__version__} is listening:"]
    if proxy.port_note:
        lines.append(f"  note: {proxy.port_note}")
    mode = "redirects to https" if cfg.listen.plain_http == "redirect" else "proxied"
    lines += [
        f"  http://{shown}:{http}/    plain HTTP/1.1 ({mode}; /_gwhealthz"
        + ("" if cfg.metrics.port is not None else ", /metrics")
        + ")",
        f"  https://{shown}:{https}/   TLS over TCP: HTTP/2 and HTTP/1.1",
        f"  https://{shown}:{https}/   QUIC over UDP: HTTP/3 (Alt-Svc advertises port "
        f"{cfg.listen.alt_svc_port})",
    ]
    if proxy.metrics_port is not None:
        lines.append(f"  http://{shown}:{proxy.metrics_port}/metrics    Prometheus metrics")
    if proxy.using_demo_backend:
        lines.append("  backend: built-in demo backend (give --backend http://HOST:PORT)")
    else:
        lines.append(f"  backend: {cfg.backend}")
    lines.append(f"  WAF: {cfg.waf.mode}")
    if proxy.self_signed:
        lines.append(f"  certificate: self-signed, {proxy.cert}")
    insecure = " --insecure" if proxy.self_signed else ""
    lines.append(f"Try HTTP/3:  quicproxy get{insecure} -i https://{shown}:{https}/")
    return "\n".join(lines)


async def _serve(
    cfg: Config,
    reuse_port: bool,
    banner: bool,
    workers: Workers | None = None,
    source: ConfigSource | None = None,
) -> int:
    proxy = Proxy(cfg, reuse_port=reuse_port, workers=workers, source=source)
    await proxy.start()
    if banner:
        print(_banner(proxy), flush=True)
    tune_gc()
    return await proxy.serve_forever()


GC_THRESHOLDS = (7000, 10, 10)
"""Collect the youngest generation every 7,000 net allocations, not 700: a request makes
thousands, so the default ran a collection several times per request."""


def tune_gc() -> None:
    """Once started: what exists now (modules, rules, certificates) lives for the process,
    so it leaves the collector's scans (``gc.freeze``), and collections run less often.
    A/B against the defaults (1 KiB requests, c=64): CPU per request -19 % (h1), -16 % (h3)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _exit_now(_signum: int, _frame: object) -> None:
    """SIGTERM while a worker starts: nothing to drain yet."""
    sys.exit(0)


def _worker(
    cfg: Config, banner: bool, metrics_dir: str, workers: Workers, source: ConfigSource
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve_forever reloads on SIGHUP
    signal.signal(signal.SIGTERM, _exit_now)  # until serve_forever drains on SIGTERM
    metrics.use_multiprocess(metrics_dir)
    try:
        code = asyncio.run(_serve(cfg, True, banner, workers, source))
    except ConfigError as exc:
        print(f"quicproxy: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Supervisor:
    """Keeps ``cfg.workers`` worker processes running until SIGTERM/SIGINT.

    SIGHUP is passed on to every worker: each reloads the config.

    A worker that dies is restarted after a backoff (0.5 s, doubling up to 30 s
    while workers keep dying within a minute of their start), with one log line
    naming its exit status or signal. A worker that exits with status 2 (bad
    config, port in use) is not restarted: everything stops. The exit code is 1
    when any worker died abnormally (signal or non-zero status) during the run,
    2 for a start failure, else 0."""

    BACKOFF_MAX = 30.0
    STABLE = 60.0

    def __init__(
        self, cfg: Config, metrics_dir: str, workers_dir: str, source: ConfigSource
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.metrics_dir = metrics_dir
        self.workers_dir = workers_dir
        "Where workers hand QUIC datagrams to each other (one Unix socket each)."
        self.generation = new_generation(workers_dir)
        "This run's generation, in every connection ID of its workers (see Workers)."
        self.secret = os.urandom(32)
        "The workers' QUIC secret when no quic.shared_secret_file is set (see quic._keys)."
        self.ctx = multiprocessing.get_context("fork")
        self.procs: dict[int, Any] = {}
        self.started: dict[int, float] = {}
        self.due: dict[int, float] = {}
        "Slot -> monotonic time its replacement starts."
        self.backoff = 0.5
        self.stopping = False
        self.abnormal = False
        self.code = 0

    def start(self, slot: int, banner: bool) -> None:
        workers = Workers(slot, self.cfg.workers, self.workers_dir, self.secret, self.generation)
        args = (self.cfg, banner, self.metrics_dir, workers, self.source)
        proc = self.ctx.Process(target=_worker, args=args, daemon=False)
        proc.start()
        self.procs[slot] = proc
        self.started[slot] = time.monotonic()

    def handover_path(self, slot: int) -> str:
        return Workers(slot, self.cfg.workers, self.workers_dir, b"", self.generation).path(slot)

    def stop(self, _signum: int = 0, _frame: object = None) -> None:
        self.stopping = True
        self.due.clear()
        for proc in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)

    def reload(self, _signum: int = 0, _frame: object = None) -> None:
        """SIGHUP: every worker reloads the config."""
        for proc in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGHUP)

    def _reap(self, slot: int) -> None:
        proc = self.procs.pop(slot)
        proc.join()
        if proc.pid is not None:
            mark_worker_dead(self.metrics_dir, proc.pid)
        code = proc.exitcode
        if self.stopping and code == 0:
            return
        self.abnormal = self.abnormal or code != 0
        if code == 2:
            log.error("worker %d (pid %d) could not start (status 2): stopping", slot, proc.pid)
            self.code = 2
            self.stop()
            return
        if self.stopping:
            log.error("worker %d (pid %d) %s while stopping", slot, proc.pid, _exit_text(code))
            return
        if time.monotonic() - self.started[slot] > self.STABLE:
            self.backoff = 0.5
        log.error(
            "worker %d (pid %d) %s; restarting it in %g s",
            slot,
            proc.pid,
            _exit_text(code),
            self.backoff,
        )
        self.due[slot] = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.BACKOFF_MAX)

    def run(self) -> int:
        for slot in range(self.cfg.workers):
            self.start(slot, slot == 0)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.reload)
        while self.procs or self.due:
            now = time.monotonic()
            for slot, when in list(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self.start(slot, False)
            wait = min((when - now for when in self.due.values()), default=1.0)
            sentinels = {proc.sentinel: slot for slot, proc in self.procs.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), max(0.0, wait)):
                self._reap(sentinels[ready])
        return self.code or (1 if self.abnormal else 0)


def _run_workers(cfg: Config, source: ConfigSource) -> int:
    http, https, _ = default_ports(cfg)
    if not http or not https:
        raise ConfigError(
            "workers",
            "port 0 cannot be shared by several workers",
            "give fixed ports or use --workers 1",
        )
    cfg.listen.http_port, cfg.listen.https_port = http, https
    cfg.tls.cert, cfg.tls.key, _ = ensure_certificate(cfg)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(multiprocess_dir())  # every worker's metric files
        sockets = _handover_folder(cfg, https)  # shared with other runs on the port
        if sockets is None:  # this run's workers only
            sockets = stack.enter_context(tempfile.TemporaryDirectory(prefix="quicproxy-w-"))
        supervisor = _Supervisor(cfg, folder, sockets, source)
        try:
            return supervisor.run()
        finally:
            for slot in range(cfg.workers):  # a killed worker's socket (see Workers)
                with contextlib.suppress(OSError):
                    os.unlink(supervisor.handover_path(slot))


def _check_engine(cfg: Config) -> None:
    """Fail at start, before any worker forks, when the inline engine is not built.
    Only the file is checked: the Go runtime inside is loaded in each worker."""
    if cfg.waf.mode == "inline" and cfg.waf.engine == "coraza":
        from .waf._coraza_lib import check_built

        check_built(cfg.waf.library)


def _cmd_serve(args: argparse.Namespace) -> int:
    source = ConfigSource(args.config, _overrides(args))
    cfg = source.load()
    _check_engine(cfg)
    _logging(cfg.log_level)
    if cfg.workers > 1:
        return _run_workers(cfg, source)
    workers = None
    _, https, _ = default_ports(cfg)
    if https:  # a fixed port: another run may start on it (a restart) and take over
        folder = _handover_folder(cfg, https)
        if folder:
            workers = Workers(0, 1, folder, generation=new_generation(folder))
    return asyncio.run(_serve(cfg, True, True, workers, source))


def _handover_folder(cfg: Config, port: int) -> str | None:
    """The hand-over folder of ``port``, or None (said once) when it cannot be made."""
    try:
        return handover_folder(cfg, port)
    except OSError as exc:
        log.warning(
            "QUIC hand-over folder for port %d unusable (%s): a process started on the "
            "port later cannot take over this one's connections (set quic.handover_dir)",
            port,
            exc.strerror or exc,
        )
        return None


def _waf_config(args: argparse.Namespace) -> Config:
    waf: dict[str, Any] = {"mode": "inline"}
    if args.waf_engine is not None:
        waf["engine"] = args.waf_engine
    cfg = load_config(args.config, overrides={"waf": waf})
    _check_engine(cfg)
    return cfg


def _cmd_waf_info(args: argparse.Namespace) -> int:
    from .waf import inline_waf, waf_info

    cfg = _waf_config(args)
    waf = inline_waf(cfg.waf, workers=1)
    try:
        sys.stdout.write(waf_info(waf, cfg.waf).text())
    finally:
        waf.engine.close()
    return 0


def _read_lines(path: str, key: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path} ({exc.strerror})", "give a readable file"
        ) from None


def _cmd_waf_tune(args: argparse.Namespace) -> int:
    from .waf._tune import propose, render

    if args.min_count < 1:
        raise ConfigError("--min-count", f"{args.min_count} is not positive", "use 1 or more")
    cfg = load_config(args.config) if args.config else None
    lines = _read_lines(args.audit_log, "AUDIT_LOG")
    text = render(propose(lines, cfg, args.min_count), args.audit_log, cfg)
    sys.stdout.write(text)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise ConfigError(
                "--output", f"cannot write {args.output} ({exc.strerror})", "give a writable path"
            ) from None
    return 0


def _cmd_waf_test(args: argparse.Namespace) -> int:
    from .waf._replay import parse_requests, render_outcomes, replay

    cfg = _waf_config(args)
    requests, errors = parse_requests(_read_lines(args.requests, "REQUESTS_FILE"))
    outcomes = asyncio.run(replay(cfg, requests, args.route_aware))
    text, status = render_outcomes(outcomes, errors, cfg, args.route_aware)
    sys.stdout.write(text)
    return status


def _cmd_waf(args: argparse.Namespace) -> int:
    from .waf import run_waf_service

    if args.waf_command == "info":
        return _cmd_waf_info(args)
    if args.waf_command == "tune":
        return _cmd_waf_tune(args)
    if args.waf_command == "test":
        return _cmd_waf_test(args)
    try:
        port = int(args.port)
    except ValueError:
        raise ConfigError("--port", f"{args.port!r} is not a port", "use a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError("--port", f"port {port} out of range", "use a port from 1 to 65535")
    cfg = _waf_config(args)
    _logging(cfg.log_level)
    return run_waf_service(cfg.waf, args.host, port)


def _cmd_get(args: argparse.Namespace) -> int:
    from ._client import h3_get

    resp = asyncio.run(h3_get(args.url, insecure=args.insecure, cafile=args.cacert))
    if args.include:
        print(f"HTTP/3 {resp.status}")
        for k, v in resp.headers:
            print(f"{k}: {v}")
        print()
    sys.stdout.buffer.write(resp.body)
    sys.stdout.flush()
    return 0 if resp.status < 400 else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    serving = args.command == "serve" or getattr(args, "waf_command", None) == "serve"
    if serving and threading.current_thread() is threading.main_thread():
        # never SIGHUP's default (exit): once serving, the proxy reloads on it (only the
        # long-running commands; the others may run in a library user's thread)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "waf":
            return _cmd_waf(args)
        return _cmd_get(args)
    except ConfigError as exc:
        print(f"quicproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"quicproxy: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
