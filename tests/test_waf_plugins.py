"""CRS 4 plugins (``waf.plugins_dir``) through the running proxy: the shipped example
plugin's exclusion and rule, CRS 4's load order (config, before, rules, after) shown by
what each slot can do, and a plugin that fails to load stopping the start in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from quicproxy import load_config
from quicproxy._config import WafConfig
from quicproxy._errors import ConfigError
from quicproxy._server import Proxy
from tests.conftest import require_engine
from tests.helpers import fetch, proxy_config

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "waf-plugins")
JSON = [("content-type", "application/json")]
CODE = "<pre>SELECT name FROM users WHERE id = 1 UNION SELECT password FROM users--</pre>"
"A wiki page about SQL: refused by the CRS XSS and SQLi rules anywhere it is inspected."
SQLI = "/search?q=1%27%20UNION%20SELECT%20username,password%20FROM%20users--"


def _page(title: str, content: str) -> bytes:
    return json.dumps({"title": title, "content": content}).encode()


@pytest.fixture
def coraza() -> None:
    require_engine("coraza")


async def test_the_example_plugin_excludes_one_field_and_adds_a_rule(
    make_proxy, backend, certs, coraza
):
    proxy = await make_proxy(backend, waf={"mode": "inline", "plugins_dir": EXAMPLE})

    async def post(path: str, title: str, content: str, proto: str = "h2") -> int:
        return (await fetch(proxy, certs, proto, "POST", path, _page(title, content), JSON))[0]

    # the page body may hold code on the editor's path, over h1, h2 and h3 alike
    assert await post("/wiki/api/pages", "SQL joins", CODE, "h1") == 200
    assert await post("/wiki/api/pages/7", "SQL joins", CODE, "h3") == 200
    # the same text in another field, or on another path, is still refused
    assert await post("/wiki/api/pages", CODE, "plain") == 403
    assert await post("/blog/api/posts", "SQL joins", CODE) == 403
    # the plugin's own rule: markup in a title (CRS PL1 lets "<b>" alone through)
    status, headers, _ = await fetch(
        proxy, certs, "h2", "POST", "/wiki/api/pages", _page("<b>News</b>", "x"), JSON
    )
    assert status == 403 and "9510130" in headers["x-waf-rule-id"].split(",")
    assert [r[1] for r in backend.requests] == ["/wiki/api/pages", "/wiki/api/pages/7"]


async def test_without_the_plugin_the_same_requests_are_judged_by_the_crs_alone(
    make_proxy, backend, certs, coraza
):
    proxy = await make_proxy(backend, waf={"mode": "inline"})
    page = _page("<b>News</b>", "x")
    assert (await fetch(proxy, certs, "h2", "POST", "/wiki/api/pages", page, JSON))[0] == 200
    code = _page("SQL joins", CODE)
    assert (await fetch(proxy, certs, "h2", "POST", "/wiki/api/pages", code, JSON))[0] == 403


def _plugin(folder: Path, name: str, kind: str, text: str) -> None:
    (folder / f"{name}-{kind}.conf").write_text(text)


async def test_each_kind_of_plugin_file_loads_in_its_crs4_slot(
    make_proxy, backend, certs, coraza, tmp_path
):
    # config: sets a variable the before file reads (config loads first)
    _plugin(
        tmp_path,
        "order",
        "config",
        "SecAction \"id:9520001,phase:1,pass,nolog,setvar:'tx.order-plugin_path=/closed'\"\n",
    )
    _plugin(
        tmp_path,
        "order",
        "before",
        "SecRule REQUEST_FILENAME "
        '"@beginsWith %{tx.order-plugin_path}" "id:9520002,phase:1,deny,status:403,'
        "log,msg:'closed by a plugin'\"\n",
    )
    # after: removing rules only works once they are loaded, i.e. after the CRS
    _plugin(tmp_path, "order", "after", "SecRuleRemoveByTag attack-sqli\n")
    # a second plugin's config sorts after this before file by name, yet loads before it
    _plugin(tmp_path, "a-first", "before", "# nothing\n")
    proxy = await make_proxy(backend, waf={"mode": "inline", "plugins_dir": str(tmp_path)})
    status, headers, _ = await fetch(proxy, certs, "h1", "GET", "/closed/x")
    assert status == 403 and headers["x-waf-rule-id"] == "9520002"
    assert (await fetch(proxy, certs, "h3", "GET", SQLI))[0] == 200
    assert [r[1].split("?")[0] for r in backend.requests] == ["/search"]


async def test_the_waf_service_loads_the_plugins_it_is_given(make_proxy, backend, certs, coraza):
    from quicproxy.waf import start_waf_service

    config = WafConfig(mode="inline", plugins_dir=EXAMPLE)
    service = await start_waf_service(config, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{service.port}"
        proxy = await make_proxy(backend, waf={"mode": "service", "url": url})
        code = _page("SQL joins", CODE)
        assert (await fetch(proxy, certs, "h3", "POST", "/wiki/api/p", code, JSON))[0] == 200
        status, headers, _ = await fetch(
            proxy, certs, "h2", "POST", "/wiki/api/p", _page("<i>x</i>", "x"), JSON
        )
        assert status == 403 and "9510130" in headers["x-waf-rule-id"].split(",")
        assert [r[1] for r in backend.requests] == ["/wiki/api/p"]
    finally:
        await service.aclose()


def test_modsecurity_sources_put_plugins_in_crs4_order(tmp_path):
    """The ModSecurity rule list for a CRS 4 layout (none is installed here to run)."""
    from quicproxy.waf._rules import CrsLayout, rule_sources

    for kind in ("after", "before", "config"):
        _plugin(tmp_path, "p", kind, "\n")
    rules = [f"/crs/rules/REQUEST-{n}.conf" for n in (901, 942, 949, 980)]
    layout = CrsLayout(
        "/crs", (4, 25, 0), "/crs/crs-setup.conf", ["/crs/x-BEFORE-CRS.conf"], rules, []
    )
    cfg = load_config(env={}, overrides={"waf": {"mode": "inline", "plugins_dir": str(tmp_path)}})
    names = [os.path.basename(s.name) for s in rule_sources(cfg.waf, layout)]
    assert names[names.index("crs-setup.conf") :] == [
        "crs-setup.conf",
        "WAF settings",
        "x-BEFORE-CRS.conf",
        "p-config.conf",
        "p-before.conf",
        "REQUEST-901.conf",
        "REQUEST-942.conf",
        "quicproxy-detection.conf",  # waf.extra_detection (on by default)
        "anomaly score report",
        "REQUEST-949.conf",
        "REQUEST-980.conf",
        "p-after.conf",
    ]
    keys = {os.path.basename(s.name): s.key for s in rule_sources(cfg.waf, layout)}
    assert keys["p-before.conf"] == "waf.plugins_dir"


def test_the_directives_put_plugins_in_crs4_order(tmp_path):
    require_engine("coraza")
    from quicproxy.waf._coraza import coraza_directives

    for kind in ("after", "before", "config"):
        _plugin(tmp_path, "b", kind, "\n")
        _plugin(tmp_path, "a", kind, "\n")
    cfg = load_config(env={}, overrides={"waf": {"mode": "inline", "plugins_dir": str(tmp_path)}})
    text = coraza_directives(cfg.waf, (4, 25, 0))
    order = [
        "@crs-setup.conf.example",
        "a-config.conf",
        "b-config.conf",
        "a-before.conf",
        "b-before.conf",
        "@owasp_crs/REQUEST-9[0-3]",
        "@owasp_crs/REQUEST-949",
        "@owasp_crs/REQUEST-9[5-9]",
        "a-after.conf",
        "b-after.conf",
    ]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)


async def test_a_plugin_that_fails_to_load_stops_the_start_naming_the_file(certs, tmp_path):
    require_engine("coraza")
    _plugin(tmp_path, "good", "config", 'SecAction "id:9530001,phase:1,pass,nolog"\n')
    _plugin(tmp_path, "bad", "before", 'SecRule ARGS "@nosuchop x" "id:9530002,phase:1,deny"\n')
    proxy = Proxy(proxy_config(certs, None, waf={"mode": "inline", "plugins_dir": str(tmp_path)}))
    with pytest.raises(ConfigError) as caught:
        await proxy.start()
    await proxy.stop(grace=0)
    text = str(caught.value)
    assert text.startswith("config error: waf.plugins_dir: ")
    assert str(tmp_path / "bad-before.conf") in text and "\n" not in text
    assert "Traceback" not in text


def test_modsecurity_with_crs3_refuses_plugins_in_one_line():
    require_engine("modsecurity")
    from quicproxy.waf import inline_waf

    cfg = load_config(
        env={},
        overrides={"waf": {"mode": "inline", "engine": "modsecurity", "plugins_dir": EXAMPLE}},
    )
    with pytest.raises(ConfigError) as caught:
        inline_waf(cfg.waf, workers=1)
    text = str(caught.value)
    assert text.startswith("config error: waf.plugins_dir: CRS plugins need CRS 4"), text


@pytest.mark.parametrize(
    "make, waf, reason",
    [
        (lambda d: str(d / "missing"), {}, "is not a directory"),
        (lambda d: str(d), {}, "no plugin files"),
        (lambda d: EXAMPLE, {"mode": "service", "url": "http://127.0.0.1:9"}, "WAF service"),
    ],
)
def test_a_bad_plugins_dir_names_the_key(
    tmp_path: Path, make: Any, waf: dict[str, Any], reason: str
) -> None:
    (tmp_path / "README.md").write_text("not a plugin\n")
    overrides = {"waf": {"mode": "inline", "plugins_dir": make(tmp_path), **waf}}
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides=overrides)
    assert str(caught.value).startswith("config error: waf.plugins_dir: "), str(caught.value)
    assert reason in str(caught.value)


def test_an_unreadable_plugin_file_names_the_key(tmp_path: Path) -> None:
    # a link to nothing (as a ConfigMap key removed under a running pod): unreadable even by root
    (tmp_path / "gone-before.conf").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"waf": {"mode": "inline", "plugins_dir": str(tmp_path)}})
    text = str(caught.value)
    assert text.startswith("config error: waf.plugins_dir: cannot read ")
    assert "gone-before.conf" in text


def test_the_plugins_dir_can_come_from_the_environment() -> None:
    cfg = load_config(env={"WAF_ENABLED": "true", "WAF_PLUGINS_DIR": EXAMPLE})
    assert (cfg.waf.mode, cfg.waf.plugins_dir) == ("inline", EXAMPLE)
