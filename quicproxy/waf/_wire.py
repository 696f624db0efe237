"""JSON shapes of the WAF service's ``POST /evaluate`` (shared by service and client).

Request: ``{method, uri, headers, body, remote_addr, server_addr, server_port}``
plus optional ``protocol``, ``remote_port`` and ``body_b64`` (binary bodies).
``headers`` is an object name -> value, or a list of [name, value] pairs.

Answer: ``{allowed, status_code, message, rule_id, severity}`` plus
``rule_ids`` and ``messages`` (every rule that matched, in order), and for the
audit log ``matches`` ([{id, message, severity, variable, data}]), ``scores``
(inbound anomaly score per paranoia level 1-4, or null), ``engine``,
``paranoia_level``, ``detection_paranoia_level`` and ``anomaly_threshold``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .._model import Headers, decimal
from ._types import RuleMatch, WafDecision, WafRequest

__all__ = [
    "BadInput",
    "request_to_json",
    "request_from_json",
    "decision_to_json",
    "decision_from_json",
]


class BadInput(ValueError):
    """The JSON does not have the expected shape; the message says what is wrong."""


def _join_headers(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if name in out:
            out[name] += ("; " if name == "cookie" else ", ") + value
        else:
            out[name] = value
    return out


def request_to_json(request: WafRequest, body: bytes) -> dict[str, Any]:
    """What the client POSTs (headers as an object, repeated names joined)."""
    data: dict[str, Any] = {
        "method": request.method,
        "uri": request.uri,
        "headers": _join_headers(request.headers),
        "protocol": request.protocol,
        "remote_addr": request.remote_addr,
        "remote_port": request.remote_port,
        "server_addr": request.server_addr,
        "server_port": request.server_port,
    }
    if body:
        try:
            data["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            data["body_b64"] = base64.b64encode(body).decode("ascii")
    return data


def _text(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise BadInput(f"'{key}' is required")
    if not isinstance(value, str):
        raise BadInput(f"'{key}' must be a string")
    return value


def _port(data: dict[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, str) and (number := decimal(value)) is not None:
        value = number
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise BadInput(f"'{key}' must be a port number")
    return value


def _headers(value: Any) -> Headers:
    if value is None:
        return []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in value
    ):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise BadInput("'headers' must be an object or a list of [name, value] pairs")
    out: Headers = []
    for name, item in pairs:
        values = item if isinstance(item, list) else [item]
        for one in values:
            if not isinstance(name, str) or not isinstance(one, (str, int, float)):
                raise BadInput("header names and values must be strings")
            out.append((name.lower(), str(one)))
    return out


def request_from_json(data: Any) -> tuple[WafRequest, bytes]:
    """The request and body a POST /evaluate describes; BadInput if malformed."""
    if not isinstance(data, dict):
        raise BadInput("expected a JSON object")
    if data.get("body_b64") is not None:
        try:
            body = base64.b64decode(_text(data, "body_b64"), validate=True)
        except binascii.Error:
            raise BadInput("'body_b64' is not valid base64") from None
    else:
        body = _text(data, "body", "").encode("utf-8", "surrogatepass")
    request = WafRequest(
        method=_text(data, "method"),
        uri=_text(data, "uri"),
        headers=_headers(data.get("headers")),
        protocol=_text(data, "protocol", "HTTP/1.1"),
        remote_addr=_text(data, "remote_addr", "0.0.0.0"),
        remote_port=_port(data, "remote_port"),
        server_addr=_text(data, "server_addr", "0.0.0.0"),
        server_port=_port(data, "server_port"),
    )
    if not request.method or not request.uri:
        raise BadInput("'method' and 'uri' must not be empty")
    return request, body


def decision_to_json(decision: WafDecision) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "status_code": decision.status,
        "message": decision.messages[0] if decision.messages else "",
        "rule_id": decision.rule_ids[0] if decision.rule_ids else None,
        "severity": decision.severity,
        "rule_ids": decision.rule_ids,
        "messages": decision.messages,
        "matches": [
            {
                "id": m.rule_id,
                "message": m.message,
                "severity": m.severity,
                "variable": m.variable,
                "data": m.data,
            }
            for m in decision.matches
        ],
        "scores": decision.scores,
        "engine": decision.engine,
        "paranoia_level": decision.paranoia_level,
        "detection_paranoia_level": decision.detection_paranoia_level,
        "anomaly_threshold": decision.anomaly_threshold,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _matches_from_json(value: Any) -> list[RuleMatch]:
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise BadInput("'matches' must hold objects")
        severity = item.get("severity")
        out.append(
            RuleMatch(
                str(item.get("id", "")),
                str(item.get("message", "")),
                severity if isinstance(severity, int) and 0 <= severity <= 7 else None,
                str(item.get("variable", "")),
                str(item.get("data", "")),
            )
        )
    return out


def decision_from_json(data: Any) -> WafDecision:
    """Decision from an /evaluate answer; BadInput if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("allowed"), bool):
        raise BadInput("answer has no boolean 'allowed'")
    allowed: bool = data["allowed"]
    status = data.get("status_code", 200 if allowed else 403)
    if not isinstance(status, int) or isinstance(status, bool):
        raise BadInput("'status_code' is not a number")
    rule_ids = data.get("rule_ids")
    if not isinstance(rule_ids, list):
        rule_ids = [] if data.get("rule_id") in (None, "") else [data["rule_id"]]
    messages = data.get("messages")
    if not isinstance(messages, list):
        messages = [data["message"]] if data.get("message") else []
    severity = data.get("severity")
    scores = data.get("scores")
    if scores is not None and not (
        isinstance(scores, list) and len(scores) == 4 and all(_int(v) == v for v in scores)
    ):
        raise BadInput("'scores' must be 4 numbers or null")
    return WafDecision(
        allowed=allowed,
        status=status,
        rule_ids=[str(r) for r in rule_ids],
        messages=[str(m) for m in messages],
        severity=None if severity in (None, "") else str(severity),
        matches=_matches_from_json(data.get("matches")),
        scores=scores,
        engine=str(data.get("engine") or ""),
        paranoia_level=_int(data.get("paranoia_level")),
        detection_paranoia_level=_int(data.get("detection_paranoia_level")),
        anomaly_threshold=_int(data.get("anomaly_threshold")),
    )
