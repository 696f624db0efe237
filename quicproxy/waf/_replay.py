"""``quicproxy waf test``: recorded requests replayed through the configured WAF policy.

Each request goes through the real engine in this process, no network: the global
rule set, or with ``route_aware`` the policy of the route the real :class:`Router`
picks for its host and path (the same :class:`._policy.WafPolicies` the proxy
builds). Verdicts are those of blocking mode, whatever ``mode`` says, so a policy is
checked before it enforces; a route in ``detect`` mode is marked as such, one in
``off`` is not inspected (allowed). A body over ``waf.body_limit`` is refused (413)
as the proxy would with ``over_limit: reject``.

A requests file holds JSON lines ``{method, path (with query), headers: {..}, body
(text) or body_b64, host?, protocol?, expect?: allow | block}``. The audit log's
records are read too: a record keeps no query, headers or body, so the request is
rebuilt from what its rules matched (each ``ARGS:``, header and cookie with its
logged value, cut at ``waf.audit.data_limit``), an approximation marked as such.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._config import Config
from .._router import Router
from ._policy import WafPolicies
from ._types import Waf, WafDecision, WafRequest

__all__ = ["Replay", "Outcome", "parse_requests", "replay", "render_outcomes"]

_PROTOCOLS = {"h1": "HTTP/1.1", "h2": "HTTP/2", "h3": "HTTP/3"}
_EXPECT = {"allow": "allow", "allowed": "allow", "block": "block", "refused": "block"}
_BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass
class Replay:
    """One request to evaluate."""

    line: int
    method: str
    uri: str
    "Path and query."
    host: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    expect: str | None = None
    "allow, block or None."
    protocol: str = "HTTP/1.1"
    approximate: bool = False
    "Rebuilt from an audit record (values cut, masked; query, headers, body partial)."


@dataclass
class Outcome:
    """The verdict on one :class:`Replay`."""

    request: Replay
    verdict: str
    "allowed or refused."
    status: int
    rule_ids: list[str] = field(default_factory=list)
    score: int | None = None
    route: str = "default"
    mode: str = "block"
    "The route's mode: block, detect (would be forwarded) or off (not inspected)."
    note: str = ""

    @property
    def matched(self) -> bool | None:
        """Whether the verdict is the expected one (None: no expectation)."""
        want = self.request.expect
        if want is None:
            return None
        return (self.verdict == "refused") == (want == "block")


class BadLine(ValueError):
    """A line of the requests file that is neither a request nor an audit record."""


def _headers(raw: object) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [tuple(pair) for pair in raw if isinstance(pair, (list, tuple)) and len(pair) == 2]
    else:
        raise BadLine("headers must be an object {name: value}")
    return [(str(k).lower(), str(v)) for k, v in items]


def _request(line: int, data: dict[str, object]) -> Replay:
    method = data.get("method")
    path = data.get("path")
    if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
        raise BadLine("needs method and a path starting with /")
    headers = _headers(data.get("headers"))
    if "body_b64" in data:
        try:
            body = base64.b64decode(str(data["body_b64"]), validate=True)
        except (binascii.Error, ValueError):
            raise BadLine("body_b64 is not base64") from None
    else:
        body = str(data.get("body") or "").encode()
    expect = data.get("expect")
    if expect is not None and expect not in _EXPECT:
        raise BadLine(f"expect must be allow or block, not {expect!r}")
    host = dict(headers).get("host") or str(data.get("host") or "localhost")
    return Replay(
        line,
        method.upper(),
        path,
        host,
        [(k, v) for k, v in headers if k != "host"],
        body,
        _EXPECT[expect] if isinstance(expect, str) else None,
        _PROTOCOLS.get(str(data.get("protocol")), "HTTP/1.1"),
    )


def _nest(target: dict[str, object], dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        child = target.get(name)
        if not isinstance(child, dict):
            child = target[name] = {}
        target = child
    target[last] = value


def _from_audit(line: int, data: dict[str, object]) -> Replay:
    """A request rebuilt from an audit record's path and matched values."""
    method = str(data.get("method") or "GET").upper()
    path = str(data.get("path") or "/")
    query: list[tuple[str, str]] = []
    form: list[tuple[str, str]] = []
    document: dict[str, object] = {}
    headers: dict[str, str] = {"accept": "*/*"}
    cookies: dict[str, str] = {}
    uri = path
    for rule in data.get("rules") or []:  # type: ignore[attr-defined]
        if not isinstance(rule, dict):
            continue
        variable = str(rule.get("variable") or "")
        logged = str(rule.get("data") or "")
        collection, _, name = variable.partition(":")
        marker = f" found within {variable}: "
        if marker not in logged or not name:
            if collection == "REQUEST_URI" and marker in logged:
                uri = logged.split(marker, 1)[1]
            continue
        value = logged.split(marker, 1)[1]
        collection = collection.upper()
        if collection in ("ARGS", "ARGS_GET", "ARGS_POST"):
            if name.startswith("json.") and method in _BODY_METHODS:
                _nest(document, name[5:], value)
            elif collection == "ARGS_POST" or (collection == "ARGS" and method in _BODY_METHODS):
                form.append((name, value))
            else:
                query.append((name, value))
        elif collection == "REQUEST_HEADERS":
            headers[name.lower()] = value
        elif collection == "REQUEST_COOKIES":
            cookies[name] = value
    if query and "?" not in uri:
        uri = f"{uri}?{urllib.parse.urlencode(query)}"
    body = b""
    if document:
        body = json.dumps(document).encode()
        headers["content-type"] = "application/json"
    elif form:
        body = urllib.parse.urlencode(form).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    if cookies:
        headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    return Replay(
        line,
        method,
        uri,
        str(data.get("host") or "localhost"),
        list(headers.items()),
        body,
        None,
        _PROTOCOLS.get(str(data.get("protocol")), "HTTP/1.1"),
        approximate=True,
    )


def parse_requests(lines: Iterable[str]) -> tuple[list[Replay], list[str]]:
    """(requests, errors): one request per JSON line, audit records rebuilt."""
    requests: list[Replay] = []
    errors: list[str] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise BadLine("not a JSON object")
            if isinstance(data.get("rules"), list) and "request_id" in data:
                requests.append(_from_audit(number, data))
            else:
                requests.append(_request(number, data))
        except ValueError as exc:  # BadLine and json's errors
            reason = str(exc) if isinstance(exc, BadLine) else "not JSON"
            errors.append(f"line {number}: {reason}")
    return requests, errors


class _Policies:
    """The rule sets of the config, built once, and the route and mode of a request."""

    def __init__(self, config: Config, route_aware: bool) -> None:
        from . import inline_waf

        # blocking verdicts, inline: the engine the config names, with its rule set
        waf = dataclasses.replace(config.waf, mode="inline", rule_engine="On")
        self.config = dataclasses.replace(config, waf=waf)
        self.route_aware = route_aware
        self.default: Waf = inline_waf(waf, workers=1)
        self.default_mode = "detect" if config.waf.rule_engine == "DetectionOnly" else "block"
        self.policies: WafPolicies | None = None
        self.router: Router | None = None
        self.modes: dict[str, str] = {}
        if route_aware:
            self.router = Router(upstream=config.upstream)
            for route in config.routes:
                self.router.add(route)
            self.policies = WafPolicies(
                self.config, self.default, lambda settings: inline_waf(settings, workers=1)
            )
            for route in config.routes:
                mode = route.waf.mode if route.waf and route.waf.mode else self.default_mode
                self.modes[f"{route.host or '*'}{route.path_prefix}"] = mode

    def pick(self, request: Replay) -> tuple[str, str, Waf | None]:
        """(route name, mode, rule set) for ``request``."""
        if self.router is None or self.policies is None:
            return "default", self.default_mode, self.default
        host = request.host.rsplit(":", 1)[0] if "]" not in request.host else request.host
        path = request.uri.split("?", 1)[0]
        pool = self.router.match(host.lower(), path)
        if pool is None:
            return "default", self.default_mode, self.default
        mode = self.modes.get(pool.name, self.default_mode)
        policy = self.policies.get(pool.name)
        return pool.name, mode, policy.waf if mode != "off" else None

    async def aclose(self) -> None:
        if self.policies is not None:
            await self.policies.aclose()
        await self.default.aclose()


async def _evaluate(waf: Waf, request: Replay, config: Config) -> WafDecision:
    headers = [("host", request.host), *request.headers]
    if request.body and not any(k == "content-length" for k, _ in headers):
        headers.append(("content-length", str(len(request.body))))
    tx = waf.transaction(
        WafRequest(
            method=request.method,
            uri=request.uri,
            headers=headers,
            protocol=request.protocol,
            remote_addr="127.0.0.1",
            remote_port=40000,
            server_addr="127.0.0.1",
            server_port=443,
            has_body=bool(request.body),
        )
    )
    try:
        decision = await tx.headers()
        if decision is None or decision.allowed:
            if request.body and config.waf.body_access:
                await tx.body_chunk(request.body[: config.waf.body_limit])
            decision = await tx.finish()
    finally:
        await tx.close()
    return decision


async def replay(config: Config, requests: list[Replay], route_aware: bool) -> list[Outcome]:
    """Every request's verdict under ``config``'s WAF policy."""
    policies = _Policies(config, route_aware)
    outcomes: list[Outcome] = []
    try:
        for request in requests:
            route, mode, waf = policies.pick(request)
            if waf is None:
                outcomes.append(Outcome(request, "allowed", 200, route=route, mode=mode))
                continue
            wcfg = config.waf
            if wcfg.over_limit == "reject" and len(request.body) > wcfg.body_limit:
                outcomes.append(
                    Outcome(request, "refused", 413, route=route, mode=mode, note="body over limit")
                )
                continue
            decision = await _evaluate(waf, request, config)
            outcomes.append(
                Outcome(
                    request,
                    "allowed" if decision.allowed else "refused",
                    decision.status if not decision.allowed else 200,
                    decision.rule_ids,
                    decision.score_at(decision.paranoia_level),
                    route,
                    mode,
                )
            )
    finally:
        await policies.aclose()
    return outcomes


def _cut(text: str, limit: int = 70) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_outcomes(
    outcomes: list[Outcome], errors: list[str], config: Config, route_aware: bool
) -> tuple[str, int]:
    """(report text, exit status): 0 when every expectation held and every line was read."""
    out = []
    for o in outcomes:
        mark = {True: "ok  ", False: "FAIL", None: "-   "}[o.matched]
        r = o.request
        details = [f"route {o.route}"]
        if o.mode != "block":
            details.append(f"mode {o.mode}" + (" (forwarded)" if o.mode == "detect" else ""))
        if o.rule_ids:
            details.append("rules " + ",".join(o.rule_ids))
        if o.score is not None and o.rule_ids:
            details.append(f"score {o.score}")
        if r.expect:
            details.append(f"expected {r.expect}")
        if r.approximate:
            details.append("rebuilt from audit record")
        if o.matched is False and r.body:
            details.append("body " + _cut(r.body.decode("utf-8", "replace"), 60))
        if o.note:
            details.append(o.note)
        out.append(
            f"{mark} {o.verdict:<7} {o.status} {r.method} {_cut(r.uri)}  [{'; '.join(details)}]"
        )
    out.extend(f"ERROR {e}" for e in errors)
    refused = sum(o.verdict == "refused" for o in outcomes)
    expected = [o for o in outcomes if o.matched is not None]
    failed = [o for o in expected if not o.matched]
    out.append(
        f"{len(outcomes)} requests: {len(outcomes) - refused} allowed, {refused} refused; "
        f"{len(expected)} with an expectation: {len(expected) - len(failed)} as expected, "
        f"{len(failed)} not" + (f"; {len(errors)} unreadable lines" if errors else "")
    )
    if not route_aware and any(r.waf for r in config.routes):
        out.append("note: routes[].waf policies were not applied (give --route-aware)")
    return "\n".join(out) + "\n", 1 if failed or errors else 0
