"""Per-route WAF policy through the running proxy, with both engines: a route at
paranoia level 2 in blocking mode and a detect-only route on one proxy, an
argument-scoped exclusion, the detection paranoia level in the audit log."""

from __future__ import annotations

import json
from typing import Any

import pytest

from quicproxy import load_config
from quicproxy._errors import ConfigError
from quicproxy._metrics import metrics
from tests.helpers import fetch

SQLI = "/search?q=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"
PL2_ONLY = "?q=select+name+from+table"
"Scored 5 by a paranoia level 2 rule (942260), nothing at level 1, on both engines."
JSON = [("content-type", "application/json")]
PAYLOAD = "1' UNION SELECT password FROM users--"


def _route(backend: Any, prefix: str, **waf: Any) -> dict[str, Any]:
    return {"path_prefix": prefix, "backends": [backend.url], "waf": waf}


def _audit(proxy: Any) -> list[str]:
    lines: list[str] = []
    proxy.handler.audit.sink = lines.append
    return lines


async def test_a_pl2_route_blocks_and_a_detect_route_forwards_on_one_proxy(
    make_proxy, backend, certs, waf_engine
):
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine},
        routes=[
            _route(backend, "/strict", paranoia_level=2),
            _route(backend, "/watch", mode="detect"),
            _route(backend, "/open", mode="off"),
        ],
    )
    lines = _audit(proxy)
    # paranoia level 2 on /strict only: the global level 1 lets the same request through
    status, headers, _ = await fetch(proxy, certs, "h3", "GET", "/strict/find" + PL2_ONLY)
    assert status == 403 and "942260" in headers["x-waf-rule-id"].split(",")
    assert (await fetch(proxy, certs, "h2", "GET", "/elsewhere" + PL2_ONLY))[0] == 200
    assert (await fetch(proxy, certs, "h1", "GET", "/strict" + SQLI))[0] == 403
    # detect-only: an attack goes through, and is logged and audited as refusable
    status, headers, _ = await fetch(proxy, certs, "h2", "GET", "/watch" + SQLI)
    assert status == 200 and "x-waf-rule-id" not in headers
    # off: not inspected at all
    assert (await fetch(proxy, certs, "h1", "GET", "/open" + SQLI))[0] == 200
    assert [r[1].split("?")[0] for r in backend.requests] == [
        "/elsewhere",
        "/watch/search",
        "/open/search",
    ]
    records = [json.loads(line) for line in lines]
    assert [(r["path"], r["mode"], r["verdict"]) for r in records] == [
        ("/strict/find", "block", "block"),
        ("/strict/search", "block", "block"),
        ("/watch/search", "detect", "detect"),
    ]
    assert records[0]["paranoia_level"] == 2 and records[0]["scores"]["inbound"] >= 5
    assert records[2]["would_refuse"] is True and records[2]["route"] == "*/watch"
    decisions = "quicproxy_waf_decisions_total"
    assert metrics.value(decisions, engine=waf_engine, verdict="block") == 2
    assert metrics.value(decisions, engine=waf_engine, verdict="detect") == 1
    assert len(proxy.handler.waf_policies.built) == 1  # only /strict needs its own rules


async def test_an_argument_scoped_exclusion_lets_one_json_field_through(
    make_proxy, backend, certs, waf_engine
):
    exclusion = {"tag": "attack-sqli", "target": "ARGS:json.note"}
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine},
        routes=[_route(backend, "/api/notes", exclusions=[exclusion])],
    )

    async def post(path: str, field: str) -> int:
        body = json.dumps({"title": "t", "note": "n", field: PAYLOAD}).encode()
        return (await fetch(proxy, certs, "h2", "POST", path, body, JSON))[0]

    assert await post("/api/notes", "note") == 200  # the noisy field, where it is excluded
    assert await post("/api/notes", "title") == 403  # the same payload in another field
    assert await post("/api/other", "note") == 403  # the same field on another route
    assert [r[1] for r in backend.requests] == ["/api/notes"]


async def test_the_detection_level_shows_what_a_stricter_level_would_refuse(
    make_proxy, backend, certs, waf_engine
):
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine},
        routes=[_route(backend, "/canary", detection_paranoia_level=2)],
    )
    lines = _audit(proxy)
    assert (await fetch(proxy, certs, "h3", "GET", "/canary" + PL2_ONLY))[0] == 200
    assert (await fetch(proxy, certs, "h3", "GET", "/plain" + PL2_ONLY))[0] == 200
    assert len(lines) == 1  # record: refused takes those the detection level would refuse
    record = json.loads(lines[0])
    assert record["path"] == "/canary"
    assert (record["paranoia_level"], record["detection_paranoia_level"]) == (1, 2)
    assert record["scores"]["inbound"] == 0 and record["scores"]["inbound_detection"] >= 5
    assert record["would_refuse"] is False
    assert record["would_refuse_at_detection_level"] is True
    sqli = [r for r in record["rules"] if r["id"] == "942260"]
    assert sqli and sqli[0]["variable"] == "ARGS:q"


@pytest.mark.parametrize(
    "waf, route_waf, key",
    [
        ({"mode": "service", "url": "http://127.0.0.1:9"}, {"paranoia_level": 2}, "routes[0].waf"),
        ({"mode": "inline"}, {"mode": "watch"}, "routes[0].waf.mode"),
        ({"mode": "inline"}, {"paranoia_level": 5}, "routes[0].waf.paranoia_level"),
        (
            {"mode": "inline"},
            {"exclusions": [{"rule_id": 942100, "target": "ARGS"}]},
            "routes[0].waf.exclusions[0].target",
        ),
        (
            {"mode": "inline"},
            {"exclusions": [{"rule_id": 942100, "tag": "attack-sqli"}]},
            "routes[0].waf.exclusions[0].rule_id",
        ),
    ],
)
def test_bad_route_policy_names_the_key(
    waf: dict[str, Any], route_waf: dict[str, Any], key: str
) -> None:
    route = {"path_prefix": "/a", "backends": ["http://127.0.0.1:9"], "waf": route_waf}
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"waf": waf, "routes": [route]})
    assert str(caught.value).startswith(f"config error: {key}: "), str(caught.value)
