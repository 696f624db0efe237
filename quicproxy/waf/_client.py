"""The proxy's client for the WAF service (mode 'service').

One ``POST /evaluate`` per request at ``finish()``, over the upstream HTTP/1.1 pool
(:class:`~quicproxy.upstream._h1.UpstreamPool`, a pool of its own with the service as
its one member): keep-alive connections, at most ``pool_size`` open and kept idle
(an evaluation beyond waits for one to come free), an idle one checked before it is
used, and the evaluation sent once more on a new connection when a kept-alive one
failed under it (the verdict is a pure function of the request: it may be asked
twice). ``timeout_ms`` bounds the whole evaluation (waiting for a connection included).
Anything but a timely, well-formed answer raises :class:`WafUnavailable`; the proxy
applies fail-open/closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .._config import UpstreamConfig, WafConfig, parse_backend
from .._errors import ProxyError
from .._model import Body
from ..upstream._h1 import UpstreamPool
from ..upstream._member import Member
from ._types import WafDecision, WafRequest, WafUnavailable
from ._wire import BadInput, decision_from_json, request_to_json

__all__ = ["WafClient", "ServiceTransaction"]

MAX_ANSWER = 1 << 20
"Largest answer accepted from the service."


class WafClient:
    """The ``Waf`` for mode 'service'."""

    def __init__(self, config: WafConfig) -> None:
        host, port = parse_backend("waf.url", config.url or "")
        self.member = Member(host, port)
        self.timeout = config.timeout_ms / 1000
        self.pool_size = max(1, config.pool_size)
        self._authority = f"{host}:{port}"
        self.pool = UpstreamPool(
            UpstreamConfig(
                connect_timeout=self.timeout,
                timeout=self.timeout,
                pool_size=self.pool_size,
                max_connections=self.pool_size,
                max_connections_per_member=self.pool_size,
                queue_timeout=self.timeout,
            )
        )
        "The service's connections: the upstream pool, with the service as its one member."

    @property
    def connects(self) -> int:
        """TCP connections opened so far."""
        return self.pool.connections_opened

    def transaction(self, request: WafRequest) -> ServiceTransaction:
        return ServiceTransaction(self, request)

    async def evaluate(self, request: WafRequest, body: bytes = b"") -> WafDecision:
        """The service's verdict; WafUnavailable when there is none in time."""
        if self.pool.closed:
            raise WafUnavailable("WAF client is closed")
        payload = json.dumps(request_to_json(request, body)).encode()
        where = f"WAF service {self._authority}"
        try:
            async with asyncio.timeout(self.timeout):
                status, answer = await self._post(payload)
        except TimeoutError:
            raise WafUnavailable(
                f"{where} gave no answer within {self.timeout * 1000:g} ms"
            ) from None
        except ProxyError as exc:
            raise WafUnavailable(f"{where} failed: {exc.detail}") from None
        return self._decision(status, answer)

    async def _post(self, payload: bytes) -> tuple[int, bytes]:
        headers = [("host", self._authority), ("content-type", "application/json")]
        resp = await self.pool.request(
            self.member, "POST", "/evaluate", headers, Body.of(payload), len(payload), payload
        )
        try:
            if resp.content_length is not None and resp.content_length > MAX_ANSWER:
                raise WafUnavailable(f"WAF service {self._authority} answer too large")
            answer = bytearray()
            async for chunk in resp.body:
                answer += chunk
                if len(answer) > MAX_ANSWER:
                    raise WafUnavailable(f"WAF service {self._authority} answer too large")
        finally:
            await resp.body.aclose()  # read to its end: kept; else closed, never pooled
        return resp.status, bytes(answer)

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

    async def aclose(self) -> None:
        await self.pool.aclose()


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
