"""Typed errors that know the HTTP status to answer with (as h11 does)."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ProxyError",
    "HeadersTooLarge",
    "BodyTooLarge",
    "BadRequest",
    "UpstreamConnectError",
    "UpstreamTimeout",
    "UpstreamTruncated",
    "UpstreamBusy",
    "TooEarly",
]


class ConfigError(Exception):
    """Bad configuration: one line naming the setting and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config error: {key}: {problem}; fix: {fix}")
        self.key = key


class ProxyError(Exception):
    """An error answered to the client with ``status``."""

    status = 500
    reason = "Internal Server Error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class BadRequest(ProxyError):
    status = 400
    reason = "Bad Request"


class BodyTooLarge(ProxyError):
    status = 413
    reason = "Content Too Large"


class TooEarly(ProxyError):
    status = 425
    reason = "Too Early"


class HeadersTooLarge(ProxyError):
    status = 431
    reason = "Request Header Fields Too Large"


class UpstreamConnectError(ProxyError):
    status = 502
    reason = "Bad Gateway"


class UpstreamTruncated(UpstreamConnectError):
    """The upstream died mid-response: the client's stream is reset, not ended."""


class UpstreamBusy(ProxyError):
    """No upstream connection could be had in time (the caps are reached)."""

    status = 503
    reason = "Service Unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "Gateway Timeout"
