"""values.schema.json rejects bad values before anything renders, naming the key."""

from __future__ import annotations

import json

import pytest

from ._chart import CHART

BAD_VALUES = [
    ({"proxy": {"kind": "statefulset"}}, "proxy.kind", "must be one of"),
    ({"proxy": {"ports": {"http": 70000}}}, "proxy.ports.http", "less than or equal to 65535"),
    ({"proxy": {"ports": {"https": 0}}}, "proxy.ports.https", "greater than or equal to 1"),
    ({"proxy": {"ports": {"useHostPorts": "yes"}}}, "proxy.ports.useHostPorts", "boolean"),
    ({"proxy": {"replicaCount": -1}}, "proxy.replicaCount", "greater than or equal to 0"),
    ({"proxy": {"backend": {"port": 99999}}}, "proxy.backend.port", "65535"),
    ({"proxy": {"waf": {"fail": "maybe"}}}, "proxy.waf.fail", "must be one of"),
    ({"proxy": {"tls": {"certFile": "tls.crt"}}}, "proxy.tls.certFile", "pattern"),
    ({"proxy": {"livenessProbe": {"httpGet": {"path": "/"}}}}, "httpGet", "not allowed"),
    ({"global": {"imagePullPolicy": "Sometimes"}}, "global.imagePullPolicy", "must be one of"),
    ({"service": {"type": "Ingress"}}, "service.type", "must be one of"),
    ({"daemonset": {"dnsPolicy": "HostFirst"}}, "daemonset.dnsPolicy", "must be one of"),
    ({"daemonset": {"updateStrategy": {"type": "Recreate"}}}, "updateStrategy.type", "one of"),
    ({"podDisruptionBudget": {"proxy": {"minAvailable": "half"}}}, "minAvailable", ""),
    ({"securityContext": {"fsGroup": 1000}}, "fsGroup", "not allowed"),
    ({"waf": {"service": {"port": 70000}}}, "waf.service.port", "65535"),
    ({"proxy": {"config": {"listn": {}}}}, "listn", "not allowed"),
    ({"proxy": {"waf": {"url": "https://waf:9000"}}}, "proxy.waf.url", "pattern"),
    ({"proxyy": {}}, "proxyy", "not allowed"),
    ({"waf": {"engine": "libinjection"}}, "waf.engine", "must be one of"),
    ({"waf": {"crs": {"paranoiaLevel": 5}}}, "waf.crs.paranoiaLevel", "less than or equal to 4"),
    ({"waf": {"crs": {"exclusions": [{"pathPrefix": "/x"}]}}}, "ruleId", "required"),
    ({"waf": {"crs": {"allowedMethods": ["get"]}}}, "waf.crs.allowedMethods", "pattern"),
]


@pytest.mark.parametrize("values,key,words", BAD_VALUES, ids=[case[1] for case in BAD_VALUES])
def test_schema_rejects_bad_value_with_readable_message(render_error, values, key, words):
    err = render_error(values=values)
    assert "values don't meet the specifications of the schema" in err, err
    assert key in err, err
    assert words in err, err


def test_schema_error_is_one_readable_line_per_problem(render_error):
    err = render_error(values={"proxy": {"kind": "statefulset", "ports": {"http": 70000}}})
    problems = [line for line in err.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 2, err
    assert any(
        'proxy.kind must be one of the following: "deployment", "daemonset"' in p for p in problems
    ), err


def test_chart_rejects_missing_certificate_with_fix(render_error):
    err = render_error(values={"proxy": {"tls": {"secretName": "", "selfSigned": False}}})
    assert "proxy.tls.secretName" in err and "selfSigned=true" in err, err


def test_chart_rejects_same_http_and_https_port(render_error):
    err = render_error(values={"proxy": {"ports": {"http": 8443, "https": 8443}}})
    assert "http and https are both 8443" in err, err


def test_every_values_key_is_typed_in_the_schema():
    import yaml

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v, s, path):
        props = s.get("properties", {})
        assert s.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        assert set(v) <= set(props), f"{path}: {set(v) - set(props)} missing from the schema"
        for key, sub in props.items():
            if isinstance(v.get(key), dict) and sub.get("additionalProperties") is False:
                walk(v[key], sub, f"{path}.{key}")

    walk(values, schema, "")


def test_default_values_pass_the_schema_and_render(render):
    assert render().proxy_workload()["kind"] == "Deployment"
