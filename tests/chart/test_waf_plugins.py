"""waf.plugins: CRS 4 plugins from inline files (a ConfigMap the chart makes) or from a
ConfigMap the user names, mounted as waf.plugins_dir in whichever pod runs the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quicproxy import load_config

from ._chart import ROOT, container

MOUNT = {"name": "waf-plugins", "mountPath": "/etc/quicproxy-plugins", "readOnly": True}
EXAMPLE = ROOT / "examples" / "waf-plugins"
FILES = {p.name: p.read_text() for p in sorted(EXAMPLE.glob("*.conf"))}
"The shipped example plugin, given inline."


def _volume(pod: dict, name: str) -> dict | None:
    hits = [v for v in pod["spec"]["volumes"] if v["name"] == name]
    return hits[0] if hits else None


def _engine_config(text: str, plugins: dict[str, str], tmp_path: Path):
    """The rendered waf config as quicproxy loads it, with the plugins dir the pod would
    mount written out here."""
    data = yaml.safe_load(text)
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, body in plugins.items():
        (folder / name).write_text(body)
    assert data["waf"]["plugins_dir"] == "/etc/quicproxy-plugins"
    data["waf"]["plugins_dir"] = str(folder)
    data["waf"]["mode"] = "inline"  # as `quicproxy waf serve` runs it
    data["waf"].pop("url", None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), env={}).waf


def test_inline_plugin_files_reach_the_waf_service(render, tmp_path):
    m = render(values={"waf": {"plugins": {"files": FILES}}})
    cm = m.get("ConfigMap", "-waf-plugins")
    assert cm["data"] == {name: text.rstrip("\n") + "\n" for name, text in FILES.items()}
    pod = m.get("Deployment", "-waf")["spec"]["template"]
    assert MOUNT in container(pod, "waf")["volumeMounts"]
    volume = _volume(pod, "waf-plugins")
    assert volume == {"name": "waf-plugins", "configMap": {"name": cm["metadata"]["name"]}}
    config = m.get("ConfigMap", "-waf-config")["data"]["config.yaml"]
    waf = _engine_config(config, cm["data"], tmp_path)
    assert waf.plugins_dir == str(tmp_path / "plugins")
    # the proxy calls the service: it neither mounts the plugins nor names a plugins dir
    assert _volume(m.proxy_pod(), "waf-plugins") is None
    assert "plugins_dir" not in m.proxy_config()["waf"]
    # the plugins' text is part of the WAF pods' checksum: a change rolls them
    other = render(values={"waf": {"plugins": {"files": {**FILES, "x-after.conf": "#\n"}}}})
    before = pod["metadata"]["annotations"]["checksum/waf-plugins"]
    after = other.get("Deployment", "-waf")["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/waf-plugins"] != before


def test_the_rendered_example_plugin_compiles_in_the_coraza_engine(render, tmp_path):
    from tests.conftest import require_engine

    require_engine("coraza")
    from quicproxy.waf._coraza import CorazaEngine

    m = render(values={"waf": {"plugins": {"files": FILES}}})
    data = m.get("ConfigMap", "-waf-plugins")["data"]
    waf = _engine_config(m.get("ConfigMap", "-waf-config")["data"]["config.yaml"], data, tmp_path)
    plain = CorazaEngine(load_config(env={}, overrides={"waf": {"mode": "inline"}}).waf, 1)
    engine = CorazaEngine(waf, workers=1)
    try:
        assert engine.rule_count > plain.rule_count  # the plugin's rules are in
    finally:
        engine.close()
        plain.close()


def test_inline_mode_mounts_a_user_configmap_in_the_proxy(render):
    values = {"waf": {"enabled": False, "plugins": {"configMap": "edge-plugins"}}}
    m = render(values=values)
    assert m.find("ConfigMap", "-waf-plugins") is None and m.find("Deployment", "-waf") is None
    pod = m.proxy_pod()
    assert MOUNT in m.proxy_container()["volumeMounts"]
    assert _volume(pod, "waf-plugins") == {
        "name": "waf-plugins",
        "configMap": {"name": "edge-plugins"},
    }
    waf = m.proxy_config()["waf"]
    assert (waf["mode"], waf["plugins_dir"]) == ("inline", "/etc/quicproxy-plugins")
    assert "checksum/waf-plugins" not in pod["metadata"]["annotations"]


def test_inline_mode_with_plugin_files_makes_and_mounts_their_configmap(render):
    m = render(values={"waf": {"enabled": False, "plugins": {"files": FILES}}})
    name = m.get("ConfigMap", "-waf-plugins")["metadata"]["name"]
    assert _volume(m.proxy_pod(), "waf-plugins") == {
        "name": "waf-plugins",
        "configMap": {"name": name},
    }
    assert "checksum/waf-plugins" in m.proxy_pod()["metadata"]["annotations"]


def test_no_plugins_no_mount(profile):
    m = profile("default")
    assert m.find("ConfigMap", "-waf-plugins") is None
    assert _volume(m.get("Deployment", "-waf")["spec"]["template"], "waf-plugins") is None
    assert (
        "plugins_dir"
        not in yaml.safe_load(m.get("ConfigMap", "-waf-config")["data"]["config.yaml"])["waf"]
    )


@pytest.mark.parametrize(
    "values, words",
    [
        (
            {"waf": {"plugins": {"configMap": "p", "files": {"a-before.conf": "#"}}}},
            "waf.plugins: both configMap and files are set",
        ),
        (
            {"waf": {"engine": "modsecurity", "plugins": {"configMap": "p"}}},
            "waf.plugins: CRS plugins need CRS 4",
        ),
        ({"waf": {"plugins": {"files": {"plugin.conf": "#"}}}}, "plugin.conf"),
        ({"waf": {"plugins": {"configMap": "Not_A_Name"}}}, "waf.plugins.configMap"),
    ],
)
def test_bad_plugin_values_are_refused_with_the_key(render_error, values, words):
    err = render_error(values=values)
    assert words in err, err
