"""Typed errors that know the HTTP status to answer with.

The tree::

    Exception
    ├── ConfigError                 bad configuration, one line naming key and fix
    ├── ConnectionError
    │   └── ClientGone              the client cancelled (stream reset, STOP_SENDING) or
    │                               closed its connection: nothing to answer, logged 499
    └── ProxyError (500)            answered to the client with ``status``
        ├── RequestError            the client's request is at fault (also a ValueError)
        │   ├── BadRequest (400)
        │   ├── RequestTimeout (408)
        │   ├── BodyTooLarge (413)
        │   ├── TooEarly (425)
        │   ├── HeadersTooLarge (431)
        │   ├── MethodNotSupported (501)   CONNECT: this is not a forward proxy
        │   └── VersionNotSupported (505)
        ├── UpstreamConnectError (502)
        │   ├── UpstreamTlsError       TLS to an https upstream failed (verification, handshake)
        │   └── UpstreamTruncated      died mid-response: the client's stream is reset
        ├── UpstreamBusy (503)          no upstream connection free in time (caps)
        │   └── RouteDown               every member of the route is down: 503 at once,
        │                               with Retry-After
        └── UpstreamTimeout (504)

``detail`` says what went wrong for the log; the answer to the client carries
only ``status`` and ``reason``. ``retry_safe`` (Pingora's RetryType) says whether the
request may be sent upstream again after this error without being delivered twice
where that would matter; the upstream pool decides on it, never on the message.
``unsent`` says nothing of the request was written (the connect failed): it may go to
another member whatever its method; ``answered`` says bytes of a response came (an
invalid head): it is never sent again (``upstream._retry``).
:class:`RequestError` subclasses ValueError so adapters that catch ValueError from
request parsing keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ClientGone",
    "ProxyError",
    "RequestError",
    "BadRequest",
    "RequestTimeout",
    "BodyTooLarge",
    "TooEarly",
    "HeadersTooLarge",
    "MethodNotSupported",
    "VersionNotSupported",
    "UpstreamConnectError",
    "UpstreamTimeout",
    "UpstreamTlsError",
    "UpstreamTruncated",
    "UpstreamBusy",
    "RouteDown",
]


class ConfigError(Exception):
    """Bad configuration: one line naming the setting and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config error: {key}: {problem}; fix: {fix}")
        self.key = key


class ClientGone(ConnectionError):
    """The client cancelled the request or closed its connection before the response was
    complete. Normal traffic (a page left, a video seeked): the exchange ends quietly, the
    upstream connection is closed, the access log says 499 (nginx's "client closed
    request") and ``quicproxy_client_cancels_total`` counts it."""


class ProxyError(Exception):
    """An error answered to the client with ``status``."""

    status = 500
    reason = "Internal Server Error"

    def __init__(
        self,
        detail: str = "",
        *,
        retry_safe: bool = False,
        unsent: bool = False,
        answered: bool = False,
    ) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        self.retry_safe = retry_safe or unsent
        """Sending the request again cannot deliver it twice where that matters: nothing of
        it was written, or it is a bodiless request with a safe method (``upstream._h1``)."""
        self.unsent = unsent
        "Nothing of the request was written (the connection could not be made)."
        self.answered = answered
        "Bytes of a response came back (an invalid head): the request was processed."
        self.echo = False
        """A copy of another request's failure (they waited for the same connect): it
        counts against the member once, for the request that made the connect."""


class RequestError(ProxyError, ValueError):
    """The request cannot be served as sent."""

    status = 400
    reason = "Bad Request"


class BadRequest(RequestError):
    status = 400
    reason = "Bad Request"


class RequestTimeout(RequestError):
    status = 408
    reason = "Request Timeout"


class BodyTooLarge(RequestError):
    status = 413
    reason = "Content Too Large"


class TooEarly(RequestError):
    status = 425
    reason = "Too Early"


class HeadersTooLarge(RequestError):
    status = 431
    reason = "Request Header Fields Too Large"


class MethodNotSupported(RequestError):
    status = 501
    reason = "Not Implemented"


class VersionNotSupported(RequestError):
    status = 505
    reason = "HTTP Version Not Supported"


class UpstreamConnectError(ProxyError):
    status = 502
    reason = "Bad Gateway"


class UpstreamTlsError(UpstreamConnectError):
    """TLS to an https upstream failed: certificate not verified, handshake refused.
    Never retried, never downgraded to plaintext."""


class UpstreamTruncated(UpstreamConnectError):
    """The upstream died mid-response: the client's stream is reset, not ended."""


class UpstreamBusy(ProxyError):
    """No upstream connection could be had in time (the caps are reached)."""

    status = 503
    reason = "Service Unavailable"


class RouteDown(UpstreamBusy):
    """Every member of the route is down (ejected or failing its health probes): answered
    at once, without trying a connection, with ``Retry-After: retry_after``."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        "Seconds until the first member may be tried again (at least 1)."


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "Gateway Timeout"
