"""A route's WAF policy (proxy.config.routes[].waf): typed by the schema, rendered into
the proxy's config as quicproxy reads it, refused at render time where the WAF service
would silently not apply it."""

from __future__ import annotations

import pytest
import yaml

from quicproxy import load_config

from ._chart import stand_in_quic_secret

POLICY = {
    "mode": "block",
    "paranoia_level": 2,
    "detection_paranoia_level": 3,
    "anomaly_threshold": 7,
    "allowed_methods": ["GET", "PUT", "DELETE"],
    "allowed_content_types": ["application/x-ndjson"],
    "body_limit": 4096,
    "exclusions": [
        {"tag": "attack-sqli", "target": "ARGS:json.note", "path_prefix": "/api/notes"},
        {"rule_id": 920420},
    ],
}


def _route(**waf):
    return {"path_prefix": "/api", "backends": ["http://api:8080"], "waf": waf}


def _loaded(m, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stand_in_quic_secret(m.proxy_config(), tmp_path)))
    return load_config(str(path), env={})


def test_a_full_route_policy_loads_in_quicproxy_inline(render, tmp_path):
    values = {"waf": {"enabled": False}, "proxy": {"config": {"routes": [_route(**POLICY)]}}}
    cfg = _loaded(render(values=values), tmp_path)
    assert cfg.waf.mode == "inline"
    policy = cfg.routes[0].waf
    assert (policy.mode, policy.paranoia_level, policy.detection_paranoia_level) == ("block", 2, 3)
    assert (policy.anomaly_threshold, policy.body_limit) == (7, 4096)
    assert policy.allowed_methods == ["GET", "PUT", "DELETE"]
    assert policy.allowed_content_types == ["application/x-ndjson"]
    assert [(e.tag, e.target, e.rule_id) for e in policy.exclusions] == [
        ("attack-sqli", "ARGS:json.note", 0),
        (None, None, 920420),
    ]


def test_an_unquoted_mode_off_in_a_values_file_reaches_quicproxy_as_off(render, tmp_path):
    # YAML 1.1 (helm's and PyYAML's) reads a bare off as false
    values = tmp_path / "values.yaml"
    values.write_text(
        "proxy:\n  config:\n    routes:\n"
        "      - {path_prefix: /health, backends: ['http://api:8080'], waf: {mode: off}}\n"
    )
    assert _loaded(render(values), tmp_path).routes[0].waf.mode == "off"


def test_with_the_waf_service_a_route_may_set_only_its_mode(render, render_error, tmp_path):
    ok = render(values={"proxy": {"config": {"routes": [_route(mode="detect")]}}})
    cfg = _loaded(ok, tmp_path)
    assert cfg.waf.mode == "service" and cfg.routes[0].waf.mode == "detect"
    err = render_error(values={"proxy": {"config": {"routes": [_route(paranoia_level=2)]}}})
    assert "proxy.config.routes[0].waf.paranoia_level: needs the WAF inline" in err, err


@pytest.mark.parametrize(
    "waf, words",
    [
        ({"mode": "watch"}, "mode"),
        ({"paranoia_level": 5}, "paranoia_level"),
        ({"body_limit": 0}, "body_limit"),
        ({"allowed_methods": ["get"]}, "allowed_methods"),
        ({"exclusions": [{"rule_id": 1, "target": "ARGS"}]}, "target"),
        ({"exclusions": [{"path_prefix": "/x"}]}, "exclusions"),
        ({"paranoia": 2}, "paranoia"),
    ],
)
def test_schema_refuses_a_bad_route_policy(render_error, waf, words):
    values = {"waf": {"enabled": False}, "proxy": {"config": {"routes": [_route(**waf)]}}}
    err = render_error(values=values)
    assert "values don't meet the specifications of the schema" in err, err
    assert words in err, err
