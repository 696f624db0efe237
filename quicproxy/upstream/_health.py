"""Member health of one route: passive outlier detection, the verdicts of active probes,
and which members may be chosen.

Passive (``upstream.outlier``, on by default), after Envoy's outlier detection: a member
whose requests fail ``consecutive_failures`` times in a row (connect refused or timed
out, closed or reset before a response, a response timeout; 5xx too with ``on_5xx``)
is *ejected* for ``base_ejection`` seconds. When that time is over it is tried again;
a success brings it back, a failure ejects it at once for twice as long (up to
``max_ejection``). TLS failures (a certificate refused) and the proxy's own caps do not
count: they are not the member failing.

Active (``routes[].health``, off unless set): :class:`Prober` sends ``GET path`` to each
member every ``interval``; ``unhealthy`` failures in a row (a status outside
``statuses``, no answer within ``timeout``) mark it down until ``healthy`` passes in
a row, which also end a passive ejection (Envoy's default).

Choosing (:meth:`RouteHealth.candidates`): never more than ``max_ejected_share`` of
the route's members (at least one) are kept out at once; beyond that share, the
members whose ejection ends first are chosen again (Envoy's panic threshold, in
kind). When every member is down the route is down: :class:`RouteDown` (503 with
Retry-After, the seconds until the first member may be tried) at once, with no
connection attempted.

Each transition is one log line (ejected, back, marked down by probes, up again) and
the ``quicproxy_upstream_member_up``, ``quicproxy_upstream_ejections_total`` and
``quicproxy_health_probes_total`` metrics follow them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from .._config import HealthConfig, OutlierConfig
from .._errors import (
    ClientGone,
    ProxyError,
    RequestError,
    RouteDown,
    UpstreamBusy,
    UpstreamConnectError,
    UpstreamTimeout,
    UpstreamTlsError,
)
from .._metrics import metrics
from ._member import Member

__all__ = ["MemberHealth", "RouteHealth", "Prober", "counts_against", "passes"]

log = logging.getLogger("quicproxy")


def counts_against(exc: BaseException) -> bool:
    """Whether an exchange's error is the member failing (passive health)."""
    if isinstance(exc, (RequestError, UpstreamBusy, UpstreamTlsError, ClientGone)):
        return False  # the client's fault or its leaving, our caps, a TLS setting
    if getattr(exc, "echo", False):
        return False  # one connect that failed for many waiting requests is one failure
    return isinstance(exc, (UpstreamConnectError, UpstreamTimeout, ConnectionError, OSError))


def passes(status: int, statuses: Sequence[str]) -> bool:
    """Whether ``status`` is in ``statuses`` (codes and ranges as ``200-399``)."""
    for item in statuses:
        low, _, high = item.strip().partition("-")
        if int(low) <= status <= int(high or low):
            return True
    return False


class MemberHealth:
    """What is known of one member's health in one route."""

    __slots__ = ("member", "failures", "ejections", "until", "down", "probe_down", "_streak")

    def __init__(self, member: Member) -> None:
        self.member = member
        self.failures = 0
        "Requests failed in a row."
        self.ejections = 0
        "Ejections in a row (the back-off doubles with each)."
        self.until = 0.0
        "time.monotonic() at which the current ejection ends."
        self.down = False
        "Ejected by passive health and not yet back (a success after its ejection ended)."
        self.probe_down = False
        "Marked down by the active probes."
        self._streak = 0
        "Probe results in a row: > 0 passing, < 0 failing."

    def out(self, now: float) -> bool:
        """Kept out of the choice now (ejection running, or probes failing)."""
        return self.probe_down or (self.down and now < self.until)

    def back_in(self, now: float, interval: float) -> float:
        """Seconds until it may be tried again."""
        if self.probe_down:
            return interval
        return max(0.0, self.until - now)


class RouteHealth:
    """The health of one route's members; the pool asks it who may be chosen."""

    def __init__(
        self,
        route: str,
        members: Sequence[Member],
        outlier: OutlierConfig | None = None,
        probe: HealthConfig | None = None,
    ) -> None:
        self.route = route
        self.outlier = outlier or OutlierConfig()
        self.probe = probe
        self.members = [MemberHealth(m) for m in members]
        for state in self.members:
            self._gauge(state, 1)

    # ------------------------------------------------------------------ choosing

    def candidates(self, now: float | None = None) -> list[int]:
        """Indexes of the members that may be chosen now; empty: the route is down."""
        now = time.monotonic() if now is None else now
        out = [i for i, s in enumerate(self.members) if s.out(now)]
        if not out:
            return list(range(len(self.members)))
        if len(out) == len(self.members):
            return []
        share = self.outlier.max_ejected_share
        cap = max(1, math.floor(share * len(self.members))) if share > 0 else 0
        if len(out) > cap:  # too many out at once: those back soonest are chosen anyway
            interval = self.probe.interval if self.probe else 0.0
            out.sort(key=lambda i: self.members[i].back_in(now, interval))
            out = out[len(out) - cap :] if cap else []
        return [i for i in range(len(self.members)) if i not in out]

    def route_down(self, now: float | None = None) -> RouteDown:
        """The error of a route whose members are all out."""
        now = time.monotonic() if now is None else now
        interval = self.probe.interval if self.probe else 1.0
        wait = min((s.back_in(now, interval) for s in self.members), default=1.0)
        return RouteDown(
            f"every member of route {self.route} is down", max(1, math.ceil(wait - 1e-3))
        )

    # ------------------------------------------------------------------ passive

    def failed(self, index: int, exc: BaseException, now: float | None = None) -> None:
        """An exchange with member ``index`` failed with ``exc`` (not every error counts)."""
        if self.outlier.enabled and counts_against(exc):
            self._failure(index, _why(exc), now)

    def answered(self, index: int, status: int, now: float | None = None) -> None:
        """Member ``index`` answered with ``status``."""
        if self.outlier.on_5xx and status >= 500 and self.outlier.enabled:
            self._failure(index, f"status {status}", now)
            return
        state = self.members[index]
        state.failures = 0
        now = time.monotonic() if now is None else now
        if state.down and now >= state.until:
            state.down = False
            state.ejections = 0
            log.info("upstream %s (route %s) is back in rotation", state.member.label, self.route)
            if not state.probe_down:
                self._gauge(state, 1)

    def _failure(self, index: int, why: str, now: float | None) -> None:
        state = self.members[index]
        state.failures += 1
        now = time.monotonic() if now is None else now
        if state.down and now < state.until:
            return  # already out (a request that started before the ejection)
        if not state.down and state.failures < self.outlier.consecutive_failures:
            return
        state.ejections += 1
        seconds = min(
            self.outlier.base_ejection * 2 ** min(state.ejections - 1, 30),
            self.outlier.max_ejection,
        )
        again = " again" if state.down else ""
        state.down = True
        state.until = now + seconds
        log.warning(
            "upstream %s (route %s) ejected%s for %.1f s after %d failures in a row (last: %s)",
            state.member.label,
            self.route,
            again,
            seconds,
            state.failures,
            why,
        )
        _safe(lambda: metrics.upstream_ejections.labels(self.route, state.member.label).inc())
        self._gauge(state, 0)

    # ------------------------------------------------------------------ active

    def probed(self, index: int, ok: bool, why: str = "") -> None:
        """One probe of member ``index`` passed (``ok``) or failed (``why``)."""
        assert self.probe is not None
        state = self.members[index]
        result = "pass" if ok else "fail"
        _safe(lambda: metrics.health_probes.labels(self.route, state.member.label, result).inc())
        if ok:
            state._streak = max(state._streak, 0) + 1
            if (state.probe_down or state.down) and state._streak >= self.probe.healthy:
                state.probe_down = False  # an ejected member passing its probes is back too
                state.down, state.failures, state.ejections = False, 0, 0
                log.info(
                    "upstream %s (route %s) passed %d health checks: up",
                    state.member.label,
                    self.route,
                    state._streak,
                )
                self._gauge(state, 1)
            return
        state._streak = min(state._streak, 0) - 1
        if not state.probe_down and -state._streak >= self.probe.unhealthy:
            state.probe_down = True
            log.warning(
                "upstream %s (route %s) failed %d health checks: down (last: %s)",
                state.member.label,
                self.route,
                -state._streak,
                why,
            )
            self._gauge(state, 0)

    def _gauge(self, state: MemberHealth, value: int) -> None:
        _safe(lambda: metrics.upstream_up.labels(self.route, state.member.label).set(value))


Fetch = Callable[[Member, str, float], Awaitable[int]]
"Sends ``GET path`` to a member within a timeout; returns the status (raises on failure)."


class Prober:
    """Active health probes of one route: one task probing each member in turn."""

    def __init__(self, health: RouteHealth, fetch: Fetch) -> None:
        assert health.probe is not None
        self.health = health
        self.cfg: HealthConfig = health.probe
        self.fetch = fetch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.gather(*(self.probe_once(i) for i in range(len(self.health.members))))
            await asyncio.sleep(max(0.0, self.cfg.interval - (loop.time() - started)))

    async def probe_once(self, index: int) -> None:
        """Probe member ``index`` once and record the verdict."""
        member = self.health.members[index].member
        try:
            async with asyncio.timeout(self.cfg.timeout):
                status = await self.fetch(member, self.cfg.path, self.cfg.timeout)
        except TimeoutError:
            self.health.probed(index, False, f"no answer in {self.cfg.timeout:g} s")
        except (ProxyError, ConnectionError, OSError) as exc:
            self.health.probed(index, False, _why(exc))
        except Exception:  # a probe never ends the prober
            log.exception("health probe of %s failed", member.label)
            self.health.probed(index, False, "internal error")
        else:
            ok = passes(status, self.cfg.statuses)
            self.health.probed(index, ok, "" if ok else f"status {status}")


def _why(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    return str(detail) if detail else type(exc).__name__


def _safe(record: Callable[[], object]) -> None:
    try:
        record()
    except Exception:
        log.exception("recording a metric failed")
