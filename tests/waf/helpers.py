"""Build requests the way the proxy hands them to the WAF, and run them through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quicproxy._config import WafConfig
from quicproxy.waf import Waf, WafDecision, WafRequest

__all__ = ["BROWSER", "inline_config", "make_request", "evaluate"]


def inline_config(**extra: Any) -> WafConfig:
    """WafConfig for an inline engine (ModSecurity unless ``engine`` says otherwise)."""
    return WafConfig(mode="inline", **{"engine": "modsecurity", **extra})


BROWSER = [
    ("host", "shop.example.com"),
    (
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    ),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-language", "en-US,en;q=0.5"),
    ("accept-encoding", "gzip, deflate, br"),
]
"Headers a browser sends on every request."


def make_request(
    method: str = "GET",
    uri: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    protocol: str = "HTTP/1.1",
    has_body: bool = True,
) -> WafRequest:
    """A request with browser headers; ``headers`` replace same-named ones. ``has_body``
    False is what the proxy says of a request without one (its verdict in one step)."""
    names = {name for name, _ in headers}
    all_headers = [(n, v) for n, v in BROWSER if n not in names] + list(headers)
    if body and protocol == "HTTP/1.1" and "content-length" not in names:
        all_headers.append(("content-length", str(len(body))))
    return WafRequest(
        method=method,
        uri=uri,
        headers=all_headers,
        protocol=protocol,
        remote_addr="198.51.100.7",
        remote_port=51234,
        server_addr="10.0.0.2",
        server_port=443,
        has_body=has_body,
    )


async def evaluate(
    waf: Waf,
    method: str = "GET",
    uri: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    protocol: str = "HTTP/1.1",
    chunk: int = 4096,
) -> WafDecision:
    """Drive one request through the WafTransaction protocol like the proxy does."""
    tx = waf.transaction(make_request(method, uri, headers, body, protocol))
    try:
        decision = await tx.headers()
        if decision is not None:
            return decision
        for start in range(0, len(body), chunk):
            await tx.body_chunk(body[start : start + chunk])
        return await tx.finish()
    finally:
        await tx.close()
