"""The proxy's client for the WAF service (mode 'service').

Keep-alive HTTP/1.1 (the upstream pool's codec, :mod:`.._h1wire`), at most ``pool_size``
connections, one ``POST /evaluate`` per request at ``finish()``. Anything but a
timely, well-formed answer raises :class:`WafUnavailable`; the proxy applies
fail-open/closed.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .. import _h1wire as wire
from .._config import WafConfig, parse_backend
from .._streamio import write_within
from ._types import WafDecision, WafRequest, WafUnavailable
from ._wire import BadInput, decision_from_json, request_to_json

__all__ = ["WafClient", "ServiceTransaction"]

MAX_IDLE = 30.0
"Seconds an idle pooled connection is kept before it is dropped rather than reused."

MAX_ANSWER = 1 << 20
"Largest answer accepted from the service."


class _Closed(Exception):
    """The connection ended before a whole answer arrived."""


class _Connection:
    """One keep-alive HTTP/1.1 connection to the service."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = False
        self.idle_since = time.monotonic()

    @property
    def usable(self) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and time.monotonic() - self.idle_since < MAX_IDLE
        )

    async def post(self, host: str, target: str, body: bytes) -> tuple[int, bytes]:
        headers = [
            ("host", host),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        self.reusable = False
        await write_within(self.writer, wire.request_head("POST", target, headers) + body)
        try:  # evaluate() bounds the time
            head = await wire.read_head(self.reader, "POST")
            if head.length is not None and head.length > MAX_ANSWER:
                raise _Closed("answer too large")
            answer = bytearray()
            async for chunk in wire.read_body(self.reader, head, MAX_IDLE):
                answer += chunk
                if len(answer) > MAX_ANSWER:
                    raise _Closed("answer too large")
        except asyncio.IncompleteReadError:
            raise _Closed("connection closed") from None
        except wire.Invalid as exc:
            raise _Closed(f"invalid answer: {exc}") from None
        self.reusable = head.keep_alive
        self.idle_since = time.monotonic()
        return head.status, bytes(answer)

    def close(self) -> None:
        self.writer.close()


class WafClient:
    """The ``Waf`` for mode 'service'."""

    def __init__(self, config: WafConfig) -> None:
        self.host, self.port, _ = parse_backend("waf.url", config.url or "", ("http",))
        self.timeout = config.timeout_ms / 1000
        self.pool_size = max(1, config.pool_size)
        self._authority = f"{self.host}:{self.port}"
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self.connects = 0
        "TCP connections opened so far."

    def transaction(self, request: WafRequest) -> ServiceTransaction:
        return ServiceTransaction(self, request)

    async def evaluate(self, request: WafRequest, body: bytes = b"") -> WafDecision:
        """The service's verdict; WafUnavailable when there is none in time."""
        if self._closed:
            raise WafUnavailable("WAF client is closed")
        payload = json.dumps(request_to_json(request, body)).encode()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.pool_size)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    status, answer = await self._post(payload)
        except TimeoutError:
            raise WafUnavailable(
                f"WAF service {self._authority} gave no answer within {self.timeout * 1000:g} ms"
            ) from None
        return self._decision(status, answer)

    def _decision(self, status: int, answer: bytes) -> WafDecision:
        where = f"WAF service {self._authority}"
        try:
            data: Any = json.loads(answer)
        except ValueError:
            raise WafUnavailable(f"{where} answered {status} with non-JSON") from None
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            raise WafUnavailable(f"{where} answered {status}: {error or 'no reason given'}")
        try:
            return decision_from_json(data)
        except BadInput as exc:
            raise WafUnavailable(f"{where} gave a bad answer: {exc}") from None

    async def _post(self, payload: bytes) -> tuple[int, bytes]:
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                status, answer = await conn.post(self._authority, "/evaluate", payload)
            except (OSError, _Closed) as exc:
                conn.close()
                if reused:
                    continue  # the service closed a kept-alive connection; use a fresh one
                raise WafUnavailable(f"WAF service {self._authority} failed: {exc}") from None
            except BaseException:
                conn.close()  # timeout or cancel mid-exchange: the connection is unusable
                raise
            if conn.reusable and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()
            return status, answer

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise WafUnavailable(
                f"cannot connect to WAF service {self._authority} ({exc.strerror or exc})"
            ) from None
        self.connects += 1
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class ServiceTransaction:
    """One request: the body is buffered and sent with the request at ``finish()``."""

    engine_seconds = 0.0
    "Not known here: the service measures its own evaluations."

    def __init__(self, client: WafClient, request: WafRequest) -> None:
        self._client = client
        self._request = request
        self._body = bytearray()

    async def headers(self) -> WafDecision | None:
        return None

    async def body_chunk(self, data: bytes) -> None:
        self._body += data

    async def finish(self) -> WafDecision:
        return await self._client.evaluate(self._request, bytes(self._body))

    async def close(self) -> None:
        self._body.clear()
