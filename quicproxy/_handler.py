"""What happens to a request once any protocol adapter has parsed it.

Health, limits, 0-RTT policy, the WAF, routing and forwarding are written once
here; the h1, h2 and h3 adapters only translate events and write responses
through a :class:`ResponseWriter`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from ._config import Config
from ._demo import demo_response
from ._errors import BodyTooLarge, HeadersTooLarge, ProxyError, TooEarly
from ._forward import TrustedProxies, strip_hop_by_hop, upstream_headers
from ._metrics import Metrics
from ._model import Body, Headers, Request, Response
from ._router import DEMO, Router
from ._upstream import UpstreamPool
from .waf._types import Waf, WafDecision, WafRequest, WafTransaction, WafUnavailable

__all__ = ["Handler", "ResponseWriter"]

log = logging.getLogger("quicproxy")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PREFETCH = 65536


class ResponseWriter(Protocol):
    """How an adapter writes one response back on its protocol."""

    async def send_head(self, status: int, headers: Headers) -> None: ...
    async def send_data(self, data: bytes) -> None: ...
    async def send_end(self) -> None: ...
    def abort(self) -> None: ...


async def _limited(body: Body, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        yield chunk


class Handler:
    """Answers requests from every listener; one per worker process."""

    def __init__(self, cfg: Config, router: Router, waf: Waf | None = None) -> None:
        self.cfg = cfg
        self.router = router
        self.waf = waf
        self.metrics = Metrics()
        self.upstream = UpstreamPool(cfg.upstream)
        self.trusted = TrustedProxies(cfg.trusted_proxies)
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.alt_svc: str | None = None
        "Alt-Svc value added to every response (set by the server once ports are known)."

    # ------------------------------------------------------------------ exchange

    async def exchange(self, req: Request, writer: ResponseWriter) -> Response:
        """Handle ``req`` and write the response; returns it once fully sent."""
        self.active += 1
        self.metrics.in_flight += 1
        self._idle.clear()
        started = time.monotonic()
        resp = await self.handle(req)
        self.metrics.observe(req.protocol, resp.status, time.monotonic() - started)
        try:
            headers = resp.headers
            if self.alt_svc:
                headers = headers + [("alt-svc", self.alt_svc)]
            await writer.send_head(resp.status, headers)
            if req.method != "HEAD":
                async for chunk in resp.body:
                    await writer.send_data(chunk)
            await writer.send_end()
        except (ProxyError, OSError, ConnectionError) as exc:
            self.metrics.events["response_aborted"] += 1
            log.info("response to %s %s aborted: %s", req.method, req.path, exc)
            writer.abort()
        finally:
            await resp.body.aclose()
            self.active -= 1
            self.metrics.in_flight -= 1
            if self.active == 0:
                self._idle.set()
        return resp

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def handle(self, req: Request) -> Response:
        """The response for ``req``; errors become small error responses."""
        try:
            return await self._handle(req)
        except ProxyError as exc:
            if exc.status >= 500:
                self.metrics.events["upstream_errors"] += 1
                log.warning("%s %s -> %d: %s", req.method, req.path, exc.status, exc.detail)
            return Response.text(exc.status, f"{exc.status} {exc.reason}: {exc.detail}\n")
        except (ConnectionError, OSError) as exc:
            return Response.text(502, f"502 Bad Gateway: {exc}\n")
        except Exception:
            self.metrics.events["internal_errors"] += 1
            log.exception("internal error on %s %s", req.method, req.path)
            return Response.text(500, "500 Internal Server Error\n")

    # ------------------------------------------------------------------ steps

    async def _handle(self, req: Request) -> Response:
        if req.path == "/_gwhealthz":
            if self.draining:
                return Response.text(503, "draining\n")
            return Response.text(200, "OK")
        if req.scheme == "http":
            if req.path == "/metrics":
                return Response(
                    200,
                    [("content-type", "text/plain; version=0.0.4")],
                    Body.of(self.metrics.render().encode()),
                )
            if self.cfg.listen.plain_http == "redirect":
                return self._redirect(req)
        self._check_limits(req)
        if self.waf is not None:
            blocked = await self._inspect(req)
            if blocked is not None:
                return blocked
        return await self._forward(req)

    def _redirect(self, req: Request) -> Response:
        port = self.cfg.listen.alt_svc_port or self.cfg.listen.https_port or 443
        host = req.host or "localhost"
        location = f"https://{host}{'' if port == 443 else f':{port}'}{req.target}"
        resp = Response.text(308, f"Redirecting to {location}\n")
        resp.headers.append(("location", location))
        return resp

    def _check_limits(self, req: Request) -> None:
        size = len(req.target) + len(req.authority)
        size += sum(len(k) + len(v) + 4 for k, v in req.headers)
        if size > self.cfg.limits.max_header_bytes:
            raise HeadersTooLarge(f"request headers over {self.cfg.limits.max_header_bytes} bytes")
        limit = self.cfg.limits.max_body_bytes
        if limit and req.content_length is not None and req.content_length > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        if req.early_data and req.method not in _SAFE_METHODS:
            raise TooEarly("retry after the handshake completes")

    async def _forward(self, req: Request) -> Response:
        pool = self.router.match(req.host, req.path)
        member = pool.pick() if pool is not None else DEMO
        limit = self.cfg.limits.max_body_bytes
        if req.content_length is None and not req.body.ended:
            await self._measure_small_body(req, limit)
        body = req.body
        if body.ended:
            body = Body.empty()
        elif limit and (req.content_length is None or req.content_length > limit):
            body = Body.from_iter(_limited(body, limit))
        if member == DEMO:
            req.body = body
            return await demo_response(req)
        headers = upstream_headers(req, self.trusted)
        resp = await self.upstream.request(
            member, req.method, req.target, headers, body, req.content_length
        )
        resp.headers = strip_hop_by_hop(resp.headers)
        return resp

    async def _measure_small_body(self, req: Request, limit: int) -> None:
        """Read up to 64 KiB of a body of unknown length before contacting the upstream:
        a small body then goes with a Content-Length, one over ``limit`` never leaves."""
        chunks, complete = await req.body.peek(_PREFETCH)
        total = sum(map(len, chunks))
        if limit and total > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        if complete:
            req.content_length = total

    # ------------------------------------------------------------------ WAF

    async def _inspect(self, req: Request) -> Response | None:
        """Run the WAF; a response when the request must not go on, else None."""
        assert self.waf is not None
        wcfg = self.cfg.waf
        wreq = WafRequest(
            method=req.method,
            uri=req.target,
            headers=[("host", req.authority), *req.headers],
            protocol=req.protocol,
            remote_addr=req.client[0],
            remote_port=req.client[1],
            server_addr=req.server[0],
            server_port=req.server[1],
            has_body=not req.body.ended,
        )
        tx = self.waf.transaction(wreq)
        try:
            decision = await tx.headers()
            if decision is None or decision.allowed:
                await self._inspect_body(req, tx)
                decision = await tx.finish()
        except WafUnavailable as exc:
            if wcfg.fail == "closed":
                self.metrics.events["waf_unavailable"] += 1
                log.error("WAF unavailable, failing closed: %s", exc)
                return Response.text(
                    503, "503 Service Unavailable: the WAF could not check this request\n"
                )
            self.metrics.events["waf_fail_open"] += 1
            log.warning("WAF unavailable, failing open (forwarding unchecked): %s", exc)
            return None
        finally:
            try:
                await tx.close()
            except WafUnavailable:
                pass
        if decision.allowed:
            if decision.rule_ids:
                self._log_decision("waf_detect", req, decision)
            return None
        self.metrics.events["waf_blocked"] += 1
        self._log_decision("waf_block", req, decision)
        status = decision.status if decision.status >= 400 else 403
        rule = ",".join(decision.rule_ids) or "unknown"
        return Response.text(
            status,
            f"{status} Forbidden: request blocked by the web application firewall (rule {rule})\n",
            [("x-waf-rule-id", rule)],
        )

    async def _inspect_body(self, req: Request, tx: WafTransaction) -> None:
        """Stream up to body_limit bytes into the engine; the body is left unread."""
        wcfg = self.cfg.waf
        if not wcfg.body_access or req.body.ended:
            return
        limit = wcfg.body_limit
        too_large = BodyTooLarge(f"request body over the WAF inspection limit ({limit} bytes)")
        if wcfg.over_limit == "reject" and (req.content_length or 0) > limit:
            raise too_large
        chunks, _ = await req.body.peek(limit)
        fed = 0
        for chunk in chunks:
            if fed >= limit:
                break
            part = chunk[: limit - fed]
            await tx.body_chunk(part)
            fed += len(part)
        if wcfg.over_limit == "reject" and sum(map(len, chunks)) > limit:
            raise too_large

    def _log_decision(self, event: str, req: Request, decision: WafDecision) -> None:
        line = {
            "event": event,
            "client": req.client[0],
            "method": req.method,
            "path": req.path,
            "protocol": req.protocol,
            "status": decision.status,
            "rule_ids": decision.rule_ids,
            "severity": decision.severity,
            "messages": decision.messages[:3],
        }
        log.warning(json.dumps(line))
