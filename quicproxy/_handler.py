"""What happens to a request once any protocol adapter has parsed it.

Health, limits, rate limits, 0-RTT policy, the WAF, routing and forwarding,
the request id, the access log line and the request metrics are written once
here; the h1, h2 and h3 adapters only translate events and write responses
through a :class:`ResponseWriter`.

Everything a request reads of the configuration (its config, router, WAF, rate
limiter, access log, trusted proxies) comes from one :class:`Runtime`: the one in force
when its exchange began, handed down the pipeline to its access-log line, whatever
:meth:`Handler.swap` puts in force meanwhile. ``Handler.cfg``, ``.router`` and the like
are the runtime in force now (for the protocol adapters' connection settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from ._access import AccessLog, AccessRecord, request_id
from ._config import Config, WafConfig
from ._demo import demo_response
from ._errors import (
    BodyTooLarge,
    ClientGone,
    HeadersTooLarge,
    ProxyError,
    RequestError,
    RouteDown,
    TooEarly,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
)
from ._forward import (
    TrustedProxies,
    real_client,
    response_fields,
    upstream_headers,
)
from ._grpc import grpc_error, grpc_timeout, grpc_trailers, is_grpc
from ._h1wire import reason as wire_reason
from ._metrics import CONTENT_TYPE, metrics
from ._model import Body, Headers, Request, Response, header_value
from ._ratelimit import RateLimiter
from ._router import DEMO, Pool, Router
from ._runtime import Runtime, build_runtime
from ._target import check_request, options_response
from .upstream._balance import hash_key
from .upstream._h1 import UpstreamPool
from .upstream._h2 import H2Pool
from .upstream._health import Prober
from .upstream._member import AlpnChanged, Member
from .upstream._retry import send_with_retries
from .upstream._tunnel import TunnelCaps, open_websocket
from .waf._audit import AuditEntry, WafAudit
from .waf._policy import WafPolicies
from .waf._types import Waf, WafDecision, WafRequest, WafTransaction, WafUnavailable

__all__ = ["Handler", "ResponseWriter", "error_response"]

log = logging.getLogger("quicproxy")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PREFETCH = 65536


class ResponseWriter(Protocol):
    """How an adapter writes one response back on its protocol."""

    async def send_head(self, status: int, headers: Headers, end: bool = False) -> None:
        """The head; ``end``: there is no body (h2/h3: one HEADERS frame with END_STREAM)."""

    async def send_data(self, data: bytes) -> None: ...
    async def send_end(self, trailers: Headers | None = None) -> None:
        """The end of the body, with trailer fields if the response has some."""

    def abort(self) -> None: ...


async def _limited(body: Body, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        yield chunk


def error_response(status: int, reason: str) -> Response:
    """An error answer: the status and a short reason, nothing internal."""
    return Response.text(status, f"{status} {reason}\n")


def _error(req: Request, status: int, reason: str) -> Response:
    """The error answer in the request's form: gRPC's for a gRPC request."""
    return grpc_error(status, reason) if is_grpc(req) else error_response(status, reason)


class Handler:
    """Answers requests from every listener; one per worker process."""

    def __init__(self, cfg: Config, router: Router, waf: Waf | None = None) -> None:
        self.runtime = build_runtime(cfg, waf, router=router)
        "The configuration in force for requests that begin now (see :meth:`swap`)."
        self.upstream = UpstreamPool(cfg.upstream)
        self.tunnels = TunnelCaps(cfg.limits.max_tunnels, cfg.limits.max_tunnels_per_client)
        "Open WebSocket tunnels, in total and per client address."
        self.upstream_h2 = H2Pool(self.upstream)
        "HTTP/2 (h2c://) upstream connections, under the same connection caps."
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.alt_svc: str | None = None
        "Alt-Svc value added to every response (set by the server once ports are known)."
        self.probers: list[Prober] = []
        "Active health probes of the routes that set ``health``, once started."

    # ------------------------------------------------------------------ health probes

    def start_probes(self) -> None:
        """Probe the members of every route with ``health`` set, and of routes added later."""
        for pool in self.router.pools:
            self._probe(pool)
        self.router.on_add = self._probe

    def _probe(self, pool: Pool) -> None:
        if pool.health.probe is not None:
            prober = Prober(pool.health, self._probe_fetch)
            prober.start()
            self.probers.append(prober)

    async def stop_probes(self) -> None:
        self.router.on_add = None
        for prober in self.probers:
            await prober.stop()
        self.probers.clear()

    async def _probe_fetch(self, member: Member, path: str, timeout: float) -> int:
        """``GET path`` to ``member`` through the upstream pools (their caps, TLS and
        keep-alive); the status once the body (up to 64 KiB) was read."""
        host = f"[{member.host}]" if ":" in member.host else member.host
        headers = [("host", f"{host}:{member.port}"), ("user-agent", "quicproxy-health-check")]
        if member.scheme == "h2c":
            head = ("GET", "http", path)
            resp = await self.upstream_h2.request(member, head, headers, Body.empty())
        else:
            resp = await self.upstream.request(member, "GET", path, headers, Body.empty(), None)
        try:
            await resp.body.discard(timeout, _PREFETCH)
        finally:
            await resp.body.aclose()
        return resp.status

    # ------------------------------------------------------------------ runtime

    @property
    def cfg(self) -> Config:
        return self.runtime.cfg

    @property
    def router(self) -> Router:
        return self.runtime.router

    @property
    def waf(self) -> Waf | None:
        return self.runtime.waf

    @property
    def limiter(self) -> RateLimiter | None:
        return self.runtime.limiter

    @property
    def access(self) -> AccessLog:
        "Access log; its ``sink`` (a callable taking one line) can be replaced."
        return self.runtime.access

    @property
    def trusted(self) -> TrustedProxies:
        return self.runtime.trusted

    @property
    def waf_engine(self) -> str:
        "Engine label of the WAF metrics: coraza or modsecurity inline, else 'service'."
        return self.runtime.waf_engine

    @property
    def waf_policies(self) -> WafPolicies:
        "Each route's WAF mode and rule set (routes[].waf)."
        return self.runtime.policies

    @property
    def audit(self) -> WafAudit | None:
        "The WAF audit log (waf.audit); its ``sink`` can be replaced."
        return self.runtime.audit

    def swap(self, runtime: Runtime) -> Runtime:
        """Put ``runtime`` in force for requests that begin from now on; requests in
        flight finish on theirs. Returns the runtime it replaced."""
        old, self.runtime = self.runtime, runtime
        if old.router.on_add is not None:  # probing: the new router's routes from now on
            old.router.on_add = None
            retired, self.probers = self.probers, []
            for prober in retired:
                asyncio.ensure_future(prober.stop())
            self.start_probes()
        limits = runtime.cfg.limits
        self.tunnels.total = limits.max_tunnels
        self.tunnels.per_client = limits.max_tunnels_per_client
        return old

    # ------------------------------------------------------------------ exchange

    async def exchange(self, req: Request, writer: ResponseWriter) -> Response | None:
        """Handle ``req`` and write the response; returns it once fully sent.

        A response that cannot be finished (the upstream died mid-body) is aborted
        on its protocol: the client sees a reset or a closed connection, never a
        clean end. Cancellation (the client reset the stream) stops the upstream
        request at once. A client that cancels or leaves (this task cancelled, or
        :class:`ClientGone` from the writer or the request body) is normal traffic:
        nothing is logged above DEBUG, the upstream connection is closed, the access
        log says 499 and ``client_cancels`` counts it."""
        rt = self.runtime  # this request's, to its end
        rt.uses.enter()
        self.active += 1
        self._idle.clear()
        started = time.monotonic()
        rec = self._begin(req, rt)
        body_in = req.body
        resp: Response | None = None
        gone = False
        try:
            resp = await self.handle(req, rec, rt)
            headers = response_fields(req.method, resp.status, resp.headers, resp.content_length)
            headers = [(k, v) for k, v in headers if k != "x-request-id"]
            headers.append(("x-request-id", rec.request_id))
            if self.alt_svc:
                headers.append(("alt-svc", self.alt_svc))
            if req.method == "HEAD" or (resp.body.ended and resp.body.trailers is None):
                await writer.send_head(resp.status, headers, end=True)  # e.g. gRPC trailers-only
            else:
                await writer.send_head(resp.status, headers)
                await self._send_body(req, resp, writer, rec)
        except (asyncio.CancelledError, ClientGone) as exc:
            gone = True  # the client's stream or connection is gone: nothing to answer
            log.debug("%s %s: client went away (%s)", req.method, req.path, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (ProxyError, OSError, ConnectionError) as exc:
            _safe(lambda: metrics.response_aborted.labels(protocol=rec.protocol).inc())
            log.info("response to %s %s aborted: %s", req.method, req.path, exc)
            writer.abort()
        except Exception:
            _safe(lambda: metrics.response_aborted.labels(protocol=rec.protocol).inc())
            log.exception("response to %s %s failed", req.method, req.path)
            writer.abort()
        finally:
            if resp is not None:
                with contextlib.suppress(Exception):
                    await resp.body.aclose()
            # 499 (nginx's "client closed request"): the client cancelled or left
            rec.status = resp.status if resp is not None and not gone else 499
            if gone:
                _safe(lambda: metrics.client_cancels.labels(protocol=rec.protocol).inc())
            rec.bytes_in = body_in.received
            rec.duration = time.monotonic() - started
            # Metrics and the access log after the protocol's flush of the response (h2
            # and h3 send once per loop turn): the answer does not wait for bookkeeping.
            asyncio.get_running_loop().call_soon(self._settle, rec, rt)
        return resp

    async def _send_body(
        self, req: Request, resp: Response, writer: ResponseWriter, rec: AccessRecord
    ) -> None:
        """The body and its end. A gRPC response whose upstream failed mid-way (died,
        reset, over its grpc-timeout) ends with that failure as gRPC status trailers
        (UNAVAILABLE, DEADLINE_EXCEEDED): what a gRPC client understands, where a
        stream reset would read as INTERNAL or CANCELLED."""
        try:
            async for chunk in resp.body:
                rec.bytes_out += len(chunk)
                await writer.send_data(chunk)
        except ProxyError as exc:
            if not is_grpc(req):
                raise
            _safe(lambda: metrics.response_aborted.labels(protocol=rec.protocol).inc())
            log.info("gRPC response to %s ended early: %s", req.path, exc)
            await writer.send_end(grpc_trailers(exc.status, exc.reason))
            return
        await writer.send_end(resp.body.trailers)

    def _settle(self, rec: AccessRecord, rt: Runtime) -> None:
        try:
            self._finish(rec, rt)
        finally:
            rt.uses.leave()
            self.active -= 1
            _safe(lambda: metrics.in_flight.dec())
            if self.active == 0:
                self._idle.set()

    def _begin(self, req: Request, rt: Runtime) -> AccessRecord:
        """Request id (kept from a trusted proxy, else new; sent upstream) and log record."""
        _safe(lambda: metrics.in_flight.inc())
        rid = request_id(req, rt.trusted)
        req.headers = [(k, v) for k, v in req.headers if k != "x-request-id"]
        req.headers.append(("x-request-id", rid))
        return rt.access.start(req, real_client(req, rt.trusted), rid)

    def _finish(self, rec: AccessRecord, rt: Runtime) -> None:
        try:
            metrics.request_done(
                rec.protocol,
                rec.status,
                rec.route or "-",
                rec.duration,
                rec.bytes_in,
                rec.bytes_out,
                rec.upstream_time,
            )
        except Exception:  # metrics must never break a request
            log.exception("recording metrics failed")
        rt.access.write(rec)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def handle(
        self, req: Request, rec: AccessRecord | None = None, rt: Runtime | None = None
    ) -> Response:
        """The response for ``req`` under ``rt`` (default: the runtime in force); errors
        become small error responses."""
        rt = rt or self.runtime
        if rec is None:
            rec = rt.access.start(req, req.client[0], "-")
        try:
            resp = await self._handle(req, rec, rt)
            if resp.generated and resp.status >= 400 and is_grpc(req):
                return grpc_error(resp.status, wire_reason(resp.status))
            return resp
        except ClientGone:
            raise  # not the upstream's fault: the exchange ends quietly
        except ProxyError as exc:
            if isinstance(exc, RequestError):
                log.info("%r %r -> %d: %s", req.method, req.path[:200], exc.status, exc.detail)
            elif isinstance(exc, RouteDown):  # its members' transitions were logged
                _safe(lambda: metrics.upstream_errors.labels(kind="route_down").inc())
                log.debug("%s %s -> 503: %s", req.method, req.path, exc.detail)
                resp = _error(req, exc.status, exc.reason)
                resp.headers.append(("retry-after", str(exc.retry_after)))
                return resp
            else:
                kind = _error_kind(exc)
                _safe(lambda: metrics.upstream_errors.labels(kind=kind).inc())
                log.warning("%s %s -> %d: %s", req.method, req.path, exc.status, exc.detail)
            return _error(req, exc.status, exc.reason)
        except (ConnectionError, OSError) as exc:
            _safe(lambda: metrics.upstream_errors.labels(kind="connect").inc())
            log.warning("%s %s -> 502: %r", req.method, req.path, exc)
            return _error(req, 502, "Bad Gateway")
        except Exception:
            _safe(lambda: metrics.upstream_errors.labels(kind="internal").inc())
            log.exception("internal error on %s %s", req.method, req.path)
            return _error(req, 500, "Internal Server Error")

    # ------------------------------------------------------------------ steps

    async def _handle(self, req: Request, rec: AccessRecord, rt: Runtime) -> Response:
        cfg = rt.cfg
        check_request(req, cfg.limits.max_headers)
        if req.target == "*":
            return options_response()
        if req.path == "/_gwhealthz":
            if self.draining:
                return Response.text(503, "draining\n")
            return Response.text(200, "OK")
        if req.scheme == "http":
            if req.path == "/metrics" and cfg.metrics.port is None:
                return Response(200, [("content-type", CONTENT_TYPE)], Body.of(metrics.render()))
            if cfg.listen.plain_http == "redirect":
                return self._redirect(req, cfg)
        pool = rt.router.match(req.host, req.path)
        rec.route = pool.name if pool is not None else "demo"
        if rt.limiter is not None:
            limited = self._rate_limit(rec, rt.limiter)
            if limited is not None:
                return limited
        self._check_limits(req, cfg)
        policy = rt.policies.get(pool.name if pool is not None else None)
        waf = rt.waf if policy is rt.policies.default else policy.waf
        if waf is None:
            return await self._forward(req, rec, self._target(req, pool, rt.trusted), cfg)
        started = time.perf_counter()
        tx = waf.transaction(self._waf_request(req))  # may start evaluating (bodiless)
        target = self._target(req, pool, rt.trusted)  # prepared while the engine evaluates
        blocked = await self._inspect(req, rec, tx, started, rt, policy.mode)
        if blocked is not None:
            return blocked
        return await self._forward(req, rec, target, cfg)

    def _rate_limit(self, rec: AccessRecord, limiter: RateLimiter) -> Response | None:
        """429 with Retry-After when the client is over its rate; never raises."""
        try:
            wait = limiter.check(rec.client, rec.route or "")
            metrics.rate_limit_buckets.set(len(limiter))
            if wait is None:
                return None
            metrics.rate_limited.labels(route=rec.route or "-").inc()
        except Exception:
            log.exception("rate limiter failed; request let through")
            return None
        rec.rate_limited = True
        return Response.text(
            429,
            "429 Too Many Requests: slow down and retry later\n",
            [("retry-after", RateLimiter.retry_after(wait))],
        )

    def _redirect(self, req: Request, cfg: Config) -> Response:
        port = cfg.listen.alt_svc_port or cfg.listen.https_port or 443
        host = req.host or "localhost"
        location = f"https://{host}{'' if port == 443 else f':{port}'}{req.target}"
        resp = Response.text(308, f"Redirecting to {location}\n")
        resp.headers.append(("location", location))
        return resp

    def _check_limits(self, req: Request, cfg: Config) -> None:
        size = len(req.target) + len(req.authority)
        size += sum(len(k) + len(v) + 4 for k, v in req.headers)
        if size > cfg.limits.max_header_bytes:
            raise HeadersTooLarge(f"request headers over {cfg.limits.max_header_bytes} bytes")
        limit = cfg.limits.max_body_bytes
        if limit and req.content_length is not None and req.content_length > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        if req.early_data and (req.method not in _SAFE_METHODS or req.upgrade):
            raise TooEarly("retry after the handshake completes")

    def _target(
        self, req: Request, pool: Pool | None, trusted: TrustedProxies
    ) -> tuple[Pool | None, Headers]:
        """Where the request goes (None: the demo backend) and the headers it goes with."""
        if pool is None:
            return None, []
        return pool, upstream_headers(req, trusted)

    async def _forward(
        self, req: Request, rec: AccessRecord, target: tuple[Pool | None, Headers], cfg: Config
    ) -> Response:
        pool, headers = target
        if req.upgrade:
            return await self._tunnel(req, rec, pool.pick() if pool else DEMO, headers, cfg)
        limit = cfg.limits.max_body_bytes
        grpc = is_grpc(req)
        if req.content_length is None and not req.body.ended and not grpc:
            await self._measure_small_body(req, limit)  # a gRPC stream may wait for answers
        body = req.body
        if body.ended:
            body = Body.empty()
        elif limit and (req.content_length is None or req.content_length > limit):
            body = Body.from_iter(_limited(body, limit))
        if pool is None:
            req.body = body
            return await demo_response(req)

        async def send(member: Member) -> Response:
            return await self._send(req, member, headers, body, limit)

        attempts: list[str] = []
        sent = time.monotonic()
        try:
            resp = await send_with_retries(
                pool,
                send,
                method=req.method,
                bodiless=body.ended,
                key=hash_key(pool.hash_on, rec.client, req.headers),
                attempts=attempts,
            )
        finally:
            rec.upstream = ",".join(attempts) or None  # every member tried, in order
        rec.upstream_time = time.monotonic() - sent
        return resp  # hop-by-hop fields go in ``exchange`` (``response_fields``)

    async def _send(
        self, req: Request, member: Member, headers: Headers, body: Body, limit: int
    ) -> Response:
        """``req`` to ``member`` in its protocol: HTTP/2 for h2c and for an https member
        whose ALPN chose h2, else HTTP/1.1 (``body``: the client's, limited). A new https
        connection that chose the other protocol hands the request back untouched
        (AlpnChanged), and it goes by the choice just learned."""
        for attempt in (1, 2):
            try:
                if not await self.upstream_h2.speaks_h2(member):
                    return await self.upstream.request(
                        member, req.method, req.target, headers, body, req.content_length
                    )
                # The client's body itself (the h2 pool applies the limit): it carries the
                # trailers, and a read from it can be stopped and the request sent again.
                grpc = header_value(req.headers, "grpc-timeout") if is_grpc(req) else None
                te = "trailers" in (header_value(req.headers, "te") or "").lower()
                head = (req.method, req.scheme, req.target)
                return await self.upstream_h2.request(
                    member, head, headers, req.body, limit, grpc_timeout(grpc), te
                )
            except AlpnChanged:
                if attempt == 2:
                    raise UpstreamConnectError(f"{member.label} keeps changing its ALPN") from None
        raise AssertionError("unreachable")

    async def _tunnel(
        self, req: Request, rec: AccessRecord, member: Member, headers: Headers, cfg: Config
    ) -> Response:
        """A WebSocket handshake: the backend's answer, whose body is the tunnel."""
        if member == DEMO:
            return error_response(501, "Not Implemented: no WebSocket backend on this route")
        rec.upstream = member.label
        sent = time.monotonic()
        resp = await open_websocket(
            cfg, self.upstream.dial, member, req, headers, self.tunnels, rec.client
        )
        rec.upstream_time = time.monotonic() - sent
        return resp  # hop-by-hop fields go in ``exchange``; h1's 101 gets its Upgrade back

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

    async def _inspect(
        self,
        req: Request,
        rec: AccessRecord,
        tx: WafTransaction,
        started: float,
        rt: Runtime,
        mode: str,
    ) -> Response | None:
        """The WAF's verdict on ``req``: a response when it must not go on, else None.
        ``mode`` is the route's: detect forwards what block would refuse."""
        bodiless = req.body.ended
        label = rt.waf_engine
        try:
            return await self._decide(req, rec, tx, rt, mode)
        finally:
            seconds = time.perf_counter() - started
            engine = getattr(tx, "engine_seconds", 0.0)  # a Waf of the library's user may not say
            # Recorded one loop step later: the request goes upstream first.
            asyncio.get_running_loop().call_soon(
                _safe, lambda: self._record_waf(label, rec.waf, seconds, engine, bodiless)
            )

    @staticmethod
    def _record_waf(
        label: str, verdict: str, seconds: float, engine: float, bodiless: bool
    ) -> None:
        """The decision and its time; with the engine's own share when the engine ran here
        (what remains of a bodiless request's time is the WAF's hand-over and queueing)."""
        metrics.waf_decisions.labels(label, verdict).inc()
        metrics.waf_duration.labels(label).observe(seconds)
        if engine > 0:
            metrics.waf_engine.labels(label).observe(engine)
            if bodiless:
                metrics.waf_wait.labels(label).observe(max(0.0, seconds - engine))

    @staticmethod
    def _waf_request(req: Request) -> WafRequest:
        return WafRequest(
            method=req.method,
            uri=req.target,
            headers=[("host", req.authority), *req.headers],
            protocol=req.protocol,
            remote_addr=req.client[0],
            remote_port=req.client[1],
            server_addr=req.server[0],
            server_port=req.server[1],
            has_body=not req.body.ended and req.upgrade is None,
        )

    async def _decide(
        self, req: Request, rec: AccessRecord, tx: WafTransaction, rt: Runtime, mode: str
    ) -> Response | None:
        wcfg = rt.cfg.waf
        rec.waf = "error"
        try:
            decision = await tx.headers()
            if decision is None or decision.allowed:
                await self._inspect_body(req, tx, wcfg)
                decision = await tx.finish()
        except WafUnavailable as exc:
            if wcfg.fail == "closed":
                rec.waf = "unavailable"
                log.error("WAF unavailable, failing closed: %s", exc)
                return Response.text(
                    503, "503 Service Unavailable: the WAF could not check this request\n"
                )
            rec.waf = "fail_open"
            log.warning("WAF unavailable, failing open (forwarding unchecked): %s", exc)
            return None
        finally:
            try:
                await tx.close()
            except WafUnavailable:
                pass
        rule = ",".join(decision.rule_ids) or "unknown"
        if decision.allowed or mode == "detect":
            rec.waf = "allow"
            if decision.rule_ids or not decision.allowed:
                rec.waf, rec.waf_rule = "detect", rule
                self._log_decision("waf_detect", req, decision)
            self._audit(req, rec, decision, mode, rt.audit)
            return None
        rec.waf, rec.waf_rule = "block", rule
        self._log_decision("waf_block", req, decision)
        self._audit(req, rec, decision, mode, rt.audit)
        status = decision.status if decision.status >= 400 else 403
        return Response.text(
            status,
            f"{status} Forbidden: request blocked by the web application firewall (rule {rule})\n",
            [("x-waf-rule-id", rule)],
        )

    async def _inspect_body(self, req: Request, tx: WafTransaction, wcfg: WafConfig) -> None:
        """Stream up to body_limit bytes into the engine; the body is left unread."""
        if not wcfg.body_access or req.body.ended or req.upgrade or is_grpc(req):
            # a WebSocket's body is its tunnel (only the handshake is inspected); a gRPC
            # body is protobuf, and a stream that may wait for answers
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

    def _audit(
        self,
        req: Request,
        rec: AccessRecord,
        decision: WafDecision,
        mode: str,
        audit: WafAudit | None,
    ) -> None:
        """The decision's audit record (waf.audit), if one is due, written one loop step
        later (the request goes upstream first); never raises."""
        if audit is None:
            return
        entry = AuditEntry(
            request_id=rec.request_id,
            started=rec.started,
            client=rec.client,
            host=rec.host,
            method=rec.method,
            path=rec.path,
            protocol=rec.protocol,
            route=rec.route,
            mode=mode,
            verdict=rec.waf,
            headers=req.headers,
        )
        asyncio.get_running_loop().call_soon(_safe, lambda: audit.write(entry, decision))

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


def _safe(record: Callable[[], object]) -> None:
    """Run one metric update; a failure is logged, never raised into a request."""
    try:
        record()
    except Exception:
        log.exception("recording a metric failed")


def _error_kind(exc: ProxyError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, RouteDown):
        return "route_down"
    if isinstance(exc, UpstreamBusy):
        return "busy"
    if isinstance(exc, UpstreamTlsError):
        return "tls"
    if isinstance(exc, UpstreamConnectError):
        return "closed" if "closed" in exc.detail else "connect"
    return "other"
