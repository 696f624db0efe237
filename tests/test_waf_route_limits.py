"""Per-route allowed methods, content types and body limits (``routes[].waf``) through
the running proxy, with both engines: each route's verdict beside the default's on one
proxy, and nothing refused reaching the backend."""

from __future__ import annotations

from typing import Any

import pytest

from quicproxy import load_config
from quicproxy._errors import ConfigError
from tests.helpers import fetch

NDJSON = [("content-type", "application/x-ndjson")]
FORM = [("content-type", "application/x-www-form-urlencoded")]


def _route(backend: Any, prefix: str, **waf: Any) -> dict[str, Any]:
    return {"path_prefix": prefix, "backends": [backend.url], "waf": waf}


async def test_a_route_allows_methods_the_default_refuses(make_proxy, backend, certs, waf_engine):
    proxy = await make_proxy(
        backend,
        waf={
            "mode": "inline",
            "engine": waf_engine,
            "allowed_methods": ["GET", "HEAD", "POST", "OPTIONS"],
        },
        routes=[
            _route(backend, "/files", allowed_methods=["GET", "HEAD", "PUT", "DELETE"]),
            _route(backend, "/api", paranoia_level=1),
        ],
    )
    assert (await fetch(proxy, certs, "h3", "PUT", "/files/a", b"a=1", FORM))[0] == 200
    assert (await fetch(proxy, certs, "h2", "DELETE", "/files/a"))[0] == 200
    for proto, method in (("h1", "PUT"), ("h3", "DELETE")):
        status, headers, _ = await fetch(proxy, certs, proto, method, "/api/a", b"a=1", FORM)
        assert status == 403 and "911100" in headers["x-waf-rule-id"].split(","), headers
    # the route's list replaces the global one: POST is no longer allowed there
    status, headers, _ = await fetch(proxy, certs, "h2", "POST", "/files/a", b"x=1", FORM)
    assert status == 403 and "911100" in headers["x-waf-rule-id"].split(",")
    assert (await fetch(proxy, certs, "h2", "POST", "/api/a", b"x=1", FORM))[0] == 200
    assert [(r[0], r[1]) for r in backend.requests] == [
        ("PUT", "/files/a"),
        ("DELETE", "/files/a"),
        ("POST", "/api/a"),
    ]


async def test_a_route_accepts_a_content_type_the_default_refuses(
    make_proxy, backend, certs, waf_engine
):
    accepted = ["application/x-ndjson", "application/json"]
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine},
        routes=[_route(backend, "/ingest", allowed_content_types=accepted)],
    )
    body = b'{"event":"click","n":1}\n{"event":"view","n":2}\n'
    assert (await fetch(proxy, certs, "h3", "POST", "/ingest/events", body, NDJSON))[0] == 200
    for proto in ("h1", "h2"):
        status, headers, _ = await fetch(proxy, certs, proto, "POST", "/events", body, NDJSON)
        assert status == 403 and "920420" in headers["x-waf-rule-id"].split(","), headers
    # not in the route's own list (which replaces the default one): refused there too
    form = b"a=1"
    status, headers, _ = await fetch(proxy, certs, "h2", "POST", "/ingest/x", form, FORM)
    assert status == 403 and "920420" in headers["x-waf-rule-id"].split(",")
    assert (await fetch(proxy, certs, "h2", "POST", "/events", form, FORM))[0] == 200
    assert [r[1] for r in backend.requests] == ["/ingest/events", "/events"]


async def test_a_route_with_a_smaller_body_limit_refuses_what_the_default_accepts(
    make_proxy, backend, certs, waf_engine
):
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine, "body_limit": 65536},
        routes=[
            _route(backend, "/avatar", body_limit=1024),
            _route(backend, "/notes", body_limit=1024, paranoia_level=1),
        ],
    )
    big = b"a=" + b"x" * 4000
    small = b"a=" + b"x" * 500
    for proto in ("h1", "h2", "h3"):
        assert (await fetch(proxy, certs, proto, "POST", "/avatar", big, FORM))[0] == 413
        assert (await fetch(proxy, certs, proto, "POST", "/profile", big, FORM))[0] == 200
    assert (await fetch(proxy, certs, "h3", "POST", "/avatar", small, FORM))[0] == 200
    assert (await fetch(proxy, certs, "h2", "POST", "/notes", big, FORM))[0] == 413
    assert [r[1] for r in backend.requests] == ["/profile"] * 3 + ["/avatar"]
    # /avatar and /notes have the same effective settings: one rule set for both
    assert len(proxy.handler.waf_policies.built) == 1


async def test_inspect_prefix_on_a_route_forwards_and_inspects_only_its_limit(
    make_proxy, backend, certs, waf_engine
):
    proxy = await make_proxy(
        backend,
        waf={"mode": "inline", "engine": waf_engine, "over_limit": "inspect-prefix"},
        routes=[_route(backend, "/echo", body_limit=1024)],
    )
    attack = b"&q=1%27%20UNION%20SELECT%20password%20FROM%20users--"
    late = b"a=" + b"x" * 2000 + attack  # the attack lies past the route's 1024 bytes
    status, _, echoed = await fetch(proxy, certs, "h2", "POST", "/echo", late, FORM)
    assert status == 200 and echoed == late  # forwarded whole
    assert (await fetch(proxy, certs, "h2", "POST", "/other", late, FORM))[0] == 403
    assert [r[1] for r in backend.requests] == ["/echo"]


@pytest.mark.parametrize(
    "route_waf, key",
    [
        ({"allowed_methods": ["get"]}, "routes[0].waf.allowed_methods[0]"),
        ({"allowed_content_types": ["json"]}, "routes[0].waf.allowed_content_types[0]"),
        ({"body_limit": 0}, "routes[0].waf.body_limit"),
        ({"body_limit": 10**9}, "routes[0].waf.body_limit"),
    ],
)
def test_bad_route_limits_name_the_key(route_waf: dict[str, Any], key: str) -> None:
    route = {"path_prefix": "/a", "backends": ["http://127.0.0.1:9"], "waf": route_waf}
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"waf": {"mode": "inline"}, "routes": [route]})
    assert str(caught.value).startswith(f"config error: {key}: "), str(caught.value)


def test_route_limits_need_the_inline_engine() -> None:
    route = {"path_prefix": "/a", "backends": ["http://127.0.0.1:9"], "waf": {"body_limit": 10}}
    waf = {"mode": "service", "url": "http://127.0.0.1:9"}
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"waf": waf, "routes": [route]})
    assert str(caught.value).startswith("config error: routes[0].waf: ")


def test_an_unquoted_off_in_a_yaml_file_means_off(tmp_path) -> None:
    # YAML 1.1 reads a bare off as false; every key whose value may be "off" takes it
    path = tmp_path / "config.yaml"
    path.write_text(
        "waf: {mode: off, audit: {log: off}}\nlog: {access: off}\n"
        "routes: [{path_prefix: /a, backends: ['http://127.0.0.1:9'], waf: {mode: off}}]\n"
    )
    cfg = load_config(str(path), env={})
    assert (cfg.waf.mode, cfg.waf.audit.log, cfg.log.access) == ("off", "off", "off")
    assert cfg.routes[0].waf is not None and cfg.routes[0].waf.mode == "off"
