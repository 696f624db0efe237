"""Standalone WAF service (``quicproxy waf serve``): an inline engine behind HTTP/1.1.

``POST /evaluate`` (JSON, see :mod:`._wire`), ``GET /health``, ``GET /metrics``.
Plain asyncio streams and h11, keep-alive, one shared rule set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

import h11

from .._config import WafConfig
from .._errors import ConfigError
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
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._exchange(conn, reader, writer):
                conn.start_next_cycle()
        except (OSError, TimeoutError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("WAF service connection failed")
        finally:
            self._writers.discard(writer)
            self.metrics.connection_closed()
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(IDLE_TIMEOUT):
                conn.receive_data(await reader.read(65536))

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True when the connection can carry another."""
        try:
            event = await self._next(conn, reader)
        except h11.RemoteProtocolError as exc:
            self.metrics.bad_request()
            status = exc.error_status_hint
            await self._send(conn, writer, status, _error(str(exc)), _JSON, close=True)
            return False
        if not isinstance(event, h11.Request):
            return False
        try:
            status, payload, ctype = await self._handle(conn, reader, event)
        except _Reply as reply:
            if reply.close:
                self.metrics.bad_request()
                await self._send(conn, writer, reply.status, _error(str(reply)), _JSON, close=True)
                return False
            status, payload, ctype = reply.status, _error(str(reply)), _JSON
        await self._send(conn, writer, status, payload, ctype)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_body(self, conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_request:
                    raise _Reply(413, f"request body over {self.max_request} bytes", close=True)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise _Reply(400, "incomplete request", close=True)

    async def _handle(
        self, conn: h11.Connection, reader: asyncio.StreamReader, request: h11.Request
    ) -> tuple[int, bytes, str]:
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self.max_request:
                raise _Reply(413, f"request body over {self.max_request} bytes", close=True)
        body = await self._read_body(conn, reader)
        path = request.target.split(b"?", 1)[0]
        method = request.method
        if path == b"/health":
            if method != b"GET":
                raise _Reply(405, "use GET")
            return 200, b'{"status":"healthy"}', _JSON
        if path == b"/metrics":
            if method != b"GET":
                raise _Reply(405, "use GET")
            return 200, self.metrics.render().encode(), _METRICS
        if path == b"/evaluate":
            if method != b"POST":
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
        except Exception as exc:
            self.metrics.engine_error()
            log.exception("WAF evaluation failed")
            raise _Reply(500, f"evaluation failed: {exc}") from None
        self.metrics.observe(
            time.perf_counter() - started, decision.allowed, bool(decision.rule_ids)
        )
        return json.dumps(decision_to_json(decision)).encode()

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        payload: bytes,
        ctype: str,
        close: bool = False,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [("content-type", ctype), ("content-length", str(len(payload)))]
        if close:
            headers.append(("connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            data += conn.send(h11.Data(data=payload)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        writer.write(data)
        await writer.drain()


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
    log.info("WAF service (%s) listening on %s:%d", service.waf.engine.version, host, service.port)
    try:
        await stop.wait()
    finally:
        log.info("WAF service stopping")
        await service.aclose()


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
