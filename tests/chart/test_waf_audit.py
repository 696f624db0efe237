"""waf.audit: the proxy's WAF audit log settings reach its config (inline or with the WAF
service), load in quicproxy, and bad values are refused by the schema."""

from __future__ import annotations

import pytest
import yaml

from quicproxy import load_config
from quicproxy._config import DEFAULT_AUDIT_MASK

from ._chart import stand_in_quic_secret

AUDIT = {
    "log": "/tmp/waf-audit.log",
    "record": "scored",
    "rate": 10,
    "burst": 20,
    "dataLimit": 64,
    "mask": ["authorization", "cookie:*"],
}


def _loaded(m, tmp_path):
    data = stand_in_quic_secret(m.proxy_config(), tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), env={}).waf


@pytest.mark.parametrize("inline", [False, True], ids=["service", "inline"])
def test_audit_values_reach_the_proxy_config(render, tmp_path, inline):
    waf_values = {"audit": AUDIT, **({"enabled": False} if inline else {})}
    waf = _loaded(render(values={"waf": waf_values}), tmp_path)
    assert waf.mode == ("inline" if inline else "service")
    audit = waf.audit
    assert (audit.log, audit.record, audit.rate, audit.burst) == (
        "/tmp/waf-audit.log",
        "scored",
        10,
        20,
    )
    assert audit.data_limit == 64 and audit.mask == ["authorization", "cookie:*"]


def test_default_audit_is_refused_requests_to_stdout_with_the_default_mask(profile, tmp_path):
    audit = _loaded(profile("default"), tmp_path).audit
    assert (audit.log, audit.record, audit.rate, audit.burst) == ("stdout", "refused", 50, 200)
    assert audit.mask == DEFAULT_AUDIT_MASK


def test_off_turns_the_audit_log_off_and_no_waf_means_no_audit(render, tmp_path):
    assert _loaded(render(values={"waf": {"audit": {"log": "off"}}}), tmp_path).audit.log == "off"
    off = render(values={"proxy": {"waf": {"enabled": False}}, "waf": {"enabled": False}})
    assert "audit" not in off.proxy_config()["waf"]


@pytest.mark.parametrize(
    "audit, key, words",
    [
        ({"record": "everything"}, "waf.audit.record", "must be one of"),
        ({"rate": 0}, "waf.audit.rate", "greater than 0"),
        ({"log": "audit.log"}, "waf.audit.log", "pattern"),
        ({"burst": 0}, "waf.audit.burst", "greater than or equal to 1"),
        ({"mask": ["bad header"]}, "waf.audit.mask", "pattern"),
        ({"dataLimit": 1}, "waf.audit.dataLimit", "greater than or equal to 16"),
    ],
)
def test_schema_refuses_bad_audit_values(render_error, audit, key, words):
    err = render_error(values={"waf": {"audit": audit}})
    assert key in err and words in err, err
