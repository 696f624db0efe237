"""Building the rule set from config, and the errors for missing pieces."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from quicproxy._config import WafConfig, WafExclusion
from quicproxy._errors import ConfigError
from quicproxy.waf import InlineWaf, WafClient, create_waf, engine_version
from quicproxy.waf._rules import base_directives, find_crs, settings_directives

from .helpers import inline_config

CRS = "/usr/share/modsecurity-crs"


def test_installed_versions() -> None:
    assert engine_version().startswith("ModSecurity v3.")
    layout = find_crs(CRS)
    assert layout.version[0] >= 3
    assert layout.setup is not None and layout.setup.endswith(("crs-setup.conf", ".example"))
    names = [os.path.basename(p) for p in layout.rules]
    assert names[0].startswith("REQUEST-90")
    assert "REQUEST-949-BLOCKING-EVALUATION.conf" in names
    assert not any(n.startswith("RESPONSE-95") for n in names)
    # Application exclusion packages are left out unless the setup enables them.
    assert not any(n.startswith("REQUEST-903.9") for n in names)


def test_missing_library_names_the_package() -> None:
    with pytest.raises(ConfigError) as caught:
        InlineWaf(inline_config(library="/nonexistent/libmodsecurity.so.3"))
    message = str(caught.value)
    assert caught.value.key == "waf.library"
    assert "apt-get install libmodsecurity3 modsecurity-crs" in message
    assert "--waf off" in message and "WAF_ENABLED=false" in message
    assert "\n" not in message


def test_missing_rules_dir_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        InlineWaf(inline_config(rules_dir=str(tmp_path / "nowhere")))
    message = str(caught.value)
    assert caught.value.key == "waf.rules_dir"
    assert "apt-get install libmodsecurity3 modsecurity-crs" in message
    assert "WAF_ENABLED=false" in message
    assert "\n" not in message


def test_rule_syntax_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.conf"
    bad.write_text('SecRule ARGS "@rx x" "id:1,phase:2,deny,,,\n')
    with pytest.raises(ConfigError) as caught:
        InlineWaf(inline_config(extra_rules=[str(bad)]))
    assert caught.value.key == "waf.extra_rules[0]"
    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_extra_rules_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        InlineWaf(inline_config(extra_rules=[str(tmp_path / "absent.conf")]))


def test_crs_checkout_without_debian_setup(tmp_path: Path) -> None:
    # A plain CRS tree: rules/ and crs-setup.conf.example side by side.
    shutil.copytree(os.path.join(CRS, "rules"), tmp_path / "rules")
    setup = Path("/etc/modsecurity/crs/crs-setup.conf").read_text()
    setup += 'SecAction "id:900130,phase:1,nolog,pass,setvar:tx.crs_exclusions_wordpress=1"\n'
    (tmp_path / "crs-setup.conf.example").write_text(setup)
    layout = find_crs(str(tmp_path))
    assert layout.setup == str(tmp_path / "crs-setup.conf.example")
    apps = [os.path.basename(p) for p in layout.rules if "REQUEST-903.9" in p]
    assert apps == ["REQUEST-903.9002-WORDPRESS-EXCLUSION-RULES.conf"]
    waf = InlineWaf(inline_config(rules_dir=str(tmp_path)))
    try:
        assert waf.engine.rule_count > 100
    finally:
        waf.engine.close()


def test_paranoia_variable_follows_crs_version() -> None:
    config = WafConfig(paranoia_level=3, anomaly_threshold=7)
    v3 = settings_directives(config, (3, 3, 4))
    v4 = settings_directives(config, (4, 0, 0))
    assert "tx.paranoia_level=3" in v3 and "blocking_paranoia_level" not in v3
    assert "tx.blocking_paranoia_level=3" in v4
    assert "tx.inbound_anomaly_score_threshold=7" in v3 and v4


def test_body_settings() -> None:
    text = base_directives(WafConfig(rule_engine="DetectionOnly", body_limit=5000))
    assert "SecRuleEngine DetectionOnly" in text
    assert "SecRequestBodyLimit 5000" in text
    assert "SecRequestBodyLimitAction ProcessPartial" in text
    off = base_directives(WafConfig(body_access=False))
    assert "REQBODY_ERROR" not in off


@pytest.mark.parametrize("prefix", ['/a"b', "/a b", "relative", "/a\\b"])
def test_unsafe_path_prefix_refused(prefix: str) -> None:
    config = WafConfig(exclusions=[WafExclusion(rule_id=942100, path_prefix=prefix)])
    with pytest.raises(ConfigError) as caught:
        settings_directives(config, (3, 3, 4))
    assert caught.value.key == "waf.exclusions[0].path_prefix"


def test_exclusion_needs_rule_id() -> None:
    config = WafConfig(exclusions=[WafExclusion(path_prefix="/api")])
    with pytest.raises(ConfigError, match="rule_id"):
        settings_directives(config, (3, 3, 4))


async def test_create_waf_by_mode() -> None:
    assert create_waf(WafConfig(mode="off")) is None
    client = create_waf(WafConfig(mode="service", url="http://127.0.0.1:9"))
    assert isinstance(client, WafClient)
    await client.aclose()
    inline = create_waf(inline_config())
    assert isinstance(inline, InlineWaf)
    await inline.aclose()
