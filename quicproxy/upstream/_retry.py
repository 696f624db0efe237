"""Retries on another member, and the retry budget of a route.

A failed request is sent again on a member not tried yet for it, at most
``upstream.retries`` more times (default 2):

- always when nothing of it was written (the error is ``unsent``: connect refused or
  timed out): its body, if any, is untouched, whatever its method;
- when its method is safe (GET, HEAD, OPTIONS, TRACE: ``_h1``'s replayable methods), it
  has no body, and it failed before any byte of a response came back (the connection
  closed or reset under it, no response head within ``upstream.timeout``), and only
  within the route's retry budget. PUT and DELETE, idempotent in RFC 9110, are left out
  for the reason ``_h1`` gives (a DELETE sent again answers 404 for a delete that
  happened; backends attach side effects to both).

Never sent again: a request whose body was being sent (its bytes are gone), a request
of another method (POST, PATCH, PUT, DELETE...) whose bytes may have reached the upstream (``_h1``'s
at-most-once rule, which also keeps its own stale keep-alive replay), a request that
got response bytes (an invalid head: it was processed), a TLS failure (a setting, not
a member), the proxy's own caps (503) and the client's errors.

The budget (Finagle's RetryBudget; Envoy's retry budget in kind) keeps retries from
multiplying an overload: each request deposits ``retry_budget`` tokens (default 0.2)
and each budgeted retry takes one; the balance starts at, and is capped at,
:data:`RESERVE` tokens and refills at one a second, so a quiet route can still retry.
Over any run of requests, budgeted retries stay under ``retry_budget`` × requests +
:data:`RESERVE` + the seconds elapsed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .._errors import ClientGone, ProxyError, RequestError, UpstreamBusy, UpstreamTlsError
from .._metrics import metrics
from .._model import Response
from ._h1 import REPLAYABLE_METHODS
from ._health import counts_against
from ._member import Member

if TYPE_CHECKING:
    from ._balance import Load, Pool

__all__ = ["IDEMPOTENT", "RESERVE", "RetryBudget", "retry_reason", "send_with_retries"]

log = logging.getLogger("quicproxy")

IDEMPOTENT = REPLAYABLE_METHODS
"Methods whose bodiless request may go to another member after it failed unanswered."
RESERVE = 10.0
"Retry tokens a route starts with, and holds at most."


class RetryBudget:
    """Tokens for retries of requests that were sent: ``share`` per request, one per retry."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.tokens = RESERVE
        self._stamp = time.monotonic()

    def deposit(self) -> None:
        """A request arrived."""
        self._refill()
        self.tokens = min(RESERVE, self.tokens + self.share)

    def withdraw(self) -> bool:
        """Take a token for one retry; False when the budget is spent."""
        self._refill()
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(RESERVE, self.tokens + (now - self._stamp))
        self._stamp = now


def retry_reason(exc: ProxyError, method: str, bodiless: bool) -> str | None:
    """Why the failed request may go to another member: ``connect`` (nothing of it was
    written), ``unanswered`` (a safe method, bodiless, no response byte; budgeted), or None."""
    if isinstance(exc, (RequestError, UpstreamBusy, UpstreamTlsError)):
        return None
    if exc.unsent:
        return "connect"
    if exc.answered or not bodiless or method not in IDEMPOTENT:
        return None
    return "unanswered"


Send = Callable[[Member], Awaitable[Response]]
"Sends the request to one member; the response once its head came."


async def send_with_retries(
    pool: Pool,
    send: Send,
    *,
    method: str,
    bodiless: bool,
    key: str | None = None,
    attempts: list[str] | None = None,
) -> Response:
    """Send a request to a member of ``pool``, again on another after a failure when
    :func:`retry_reason` allows it. Each member tried is appended to ``attempts`` (its
    label, for the access log). The response's member counts it in flight until its
    body is closed. RouteDown when every member is down."""
    pool.budget.deposit()
    tried: list[int] = []
    last: ProxyError | None = None
    while True:
        try:
            index = pool.choose(key, tried)
        except LookupError:
            assert last is not None  # nothing tried yet: choose() found a member or raised
            raise last from None  # every member up was tried
        member = pool.members[index]
        tried.append(index)
        if attempts is not None:
            attempts.append(member.label)
        load = pool.loads[index]
        load.active += 1
        started = time.monotonic()
        try:
            resp = await send(member)
        except ClientGone:
            load.active -= 1
            raise
        except ProxyError as exc:
            load.active -= 1
            pool.health.failed(index, exc)
            took = time.monotonic() - started
            if counts_against(exc) and took > load.latency(started + took):
                load.observe(took)  # a failure that took long (a timeout) makes it look slow
            reason = retry_reason(exc, method, bodiless)
            if reason is None or len(tried) > pool.retries:
                raise
            if reason == "unanswered" and not pool.budget.withdraw():
                _count(metrics.upstream_retries_refused.labels(pool.name).inc)
                raise
            _count(metrics.upstream_retries.labels(pool.name, reason).inc)
            log.debug("%s %s failed (%s): retrying on another member", method, member.label, exc)
            last = exc
            continue
        except (ConnectionError, OSError) as exc:
            load.active -= 1
            pool.health.failed(index, exc)
            raise
        except BaseException:
            load.active -= 1
            raise
        if resp.status < 500:  # a fast error page is no sign of a fast member
            load.observe(time.monotonic() - started)
        pool.health.answered(index, resp.status)
        _release_on_close(resp, load)
        return resp


def _release_on_close(resp: Response, load: Load) -> None:
    """The member's count of requests in flight drops when the response body is closed."""
    previous = resp.body.on_close

    def closed() -> None:
        load.active -= 1
        if previous is not None:
            previous()

    resp.body.on_close = closed


def _count(record: Callable[[], object]) -> None:
    try:
        record()
    except Exception:
        log.exception("recording a metric failed")
