"""Standalone WAF service (``quicproxy waf serve``): an inline engine behind HTTP/1.1.

``POST /evaluate`` (JSON, see :mod:`._wire`), ``GET /health``, ``GET /metrics``.
Plain asyncio streams and the proxy's HTTP/1.1 codec, keep-alive, one shared rule set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time

from .. import _h1wire as wire
from .._config import WafConfig
from .._errors import ConfigError
from .._streamio import write_within
from ._coraza import CorazaWaf
from ._engine import InlineWaf
from ._info import waf_info
from ._metrics import ServiceMetrics
from ._wire import BadInput, decision_to_json, request_from_json

__all__ = ["WafService", "start_waf_service", "run_waf_service"]

log = logging.getLogger("quicproxy.waf")

IDLE_TIMEOUT = 300.0
"Seconds a keep-alive connection may sit idle (or a request may stall) before it is closed."

_JSON = "application/json"
_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class _Reply(Exception):
    """Answer with ``status`` and a JSON error, then close if ``close``."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


class WafService:
    """A running service; ``port`` is the port actually bound."""

    def __init__(self, waf: CorazaWaf | InlineWaf, max_request: int) -> None:
        self.waf = waf
        self.metrics = ServiceMetrics(info=waf_info(waf, waf.engine.config))
        self.max_request = max_request
        "Largest /evaluate request body accepted (larger gets 413)."
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
            await self.waf.aclose()

    # -- HTTP -------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.metrics.connection_opened()
        self._writers.add(writer)
        try:
            while await self._exchange(reader, writer):
                pass
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("WAF service connection failed")
        finally:
            self._writers.discard(writer)
            self.metrics.connection_closed()
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True when the connection can carry another."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            first = await reader.read(1)
            if not first:
                return False
            try:
                head = await wire.read_request(reader, wire.HEAD_LIMIT, first)
            except wire.Invalid as exc:
                self.metrics.bad_request()
                await self._send(writer, exc.status, _error(str(exc)), _JSON, close=True)
                return False
        try:
            status, payload, ctype = await self._handle(reader, head)
        except _Reply as reply:
            if reply.close:
                self.metrics.bad_request()
                await self._send(writer, reply.status, _error(str(reply)), _JSON, close=True)
                return False
            status, payload, ctype = reply.status, _error(str(reply)), _JSON
        await self._send(writer, status, payload, ctype, close=not head.keep_alive)
        return head.keep_alive

    async def _read_body(self, reader: asyncio.StreamReader, head: wire.RequestHead) -> bytes:
        if (head.length or 0) > self.max_request:
            raise _Reply(413, f"request body over {self.max_request} bytes", close=True)
        body = bytearray()
        try:
            async for data in wire.read_body(reader, head, IDLE_TIMEOUT):
                body += data
                if len(body) > self.max_request:
                    raise _Reply(413, f"request body over {self.max_request} bytes", close=True)
        except (wire.Invalid, asyncio.IncompleteReadError):
            raise _Reply(400, "incomplete request", close=True) from None
        return bytes(body)

    async def _handle(
        self, reader: asyncio.StreamReader, head: wire.RequestHead
    ) -> tuple[int, bytes, str]:
        body = await self._read_body(reader, head)
        path = head.target.split("?", 1)[0]
        method = head.method
        if path == "/health":
            if method != "GET":
                raise _Reply(405, "use GET")
            return 200, b'{"status":"healthy"}', _JSON
        if path == "/metrics":
            if method != "GET":
                raise _Reply(405, "use GET")
            return 200, self.metrics.render().encode(), _METRICS
        if path == "/evaluate":
            if method != "POST":
                raise _Reply(405, "use POST")
            return 200, await self._evaluate(body), _JSON
        raise _Reply(404, "unknown path; use POST /evaluate, GET /health or GET /metrics")

    async def _evaluate(self, body: bytes) -> bytes:
        try:
            request, request_body = request_from_json(json.loads(body))
        except (ValueError, RecursionError) as exc:
            self.metrics.bad_request()
            problem = str(exc) if isinstance(exc, BadInput) else f"body is not valid JSON ({exc})"
            raise _Reply(400, problem) from None
        started = time.perf_counter()
        try:
            decision = await self.waf.evaluate(request, request_body)
        except Exception:
            self.metrics.engine_error()
            log.exception("WAF evaluation failed")
            raise _Reply(500, "evaluation failed") from None
        self.metrics.observe(
            time.perf_counter() - started, decision.allowed, bool(decision.rule_ids)
        )
        return json.dumps(decision_to_json(decision)).encode()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: bytes,
        ctype: str,
        close: bool = False,
    ) -> None:
        headers = [("content-type", ctype), ("content-length", str(len(payload)))]
        if close:
            headers.append(("connection", "close"))
        await write_within(writer, wire.response_head(status, headers) + payload, IDLE_TIMEOUT)


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def start_waf_service(config: WafConfig, host: str, port: int) -> WafService:
    """Load the engine and listen on ``host:port`` (0 picks a free port)."""
    from . import inline_waf

    loop = asyncio.get_running_loop()
    waf = await loop.run_in_executor(None, inline_waf, config)
    service = WafService(waf, max_request=8 * max(config.body_limit, 0) + 65536)
    try:
        await service._listen(host, port)
    except BaseException:
        await waf.aclose()
        raise
    return service


async def _serve_until_signalled(config: WafConfig, host: str, port: int) -> None:
    service = await start_waf_service(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _sighup)  # never the default: exit
    log.info("WAF service (%s) listening on %s:%d", service.waf.engine.version, host, service.port)
    try:
        await stop.wait()
    finally:
        log.info("WAF service stopping")
        await service.aclose()


def _sighup() -> None:
    log.info("WAF service: SIGHUP ignored (restart the service to change its settings)")


def run_waf_service(config: WafConfig, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT; the process exit code."""
    try:
        asyncio.run(_serve_until_signalled(config, host, port))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"waf service: cannot listen on {host}:{port} ({exc.strerror})", file=sys.stderr)
        return 1
    return 0
