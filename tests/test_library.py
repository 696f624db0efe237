"""The library surface: `import quicproxy`, config precedence, the runnable example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import quicproxy
from quicproxy import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_public_surface_is_small():
    assert set(quicproxy.__all__) == {
        "Config",
        "ConfigError",
        "Proxy",
        "Route",
        "UpstreamTlsConfig",
        "WafConfig",
        "load_config",
        "__version__",
    }


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "backend: http://file:1\nlisten:\n  http_port: 1001\n  https_port: 1002\n"
        "quic:\n  idle_timeout: 7\n"
    )
    env = {"BACKEND_HOST": "envhost", "BACKEND_PORT": "2", "HTTPS_PORT": "2002"}
    cfg = load_config(str(f), env=env, overrides={"listen": {"https_port": 3003}})
    assert cfg.backend == "http://envhost:2"
    assert cfg.listen.http_port == 1001
    assert cfg.listen.https_port == 3003
    assert cfg.quic.idle_timeout == 7.0
    assert cfg.quic.max_datagram_size == 1350


def test_legacy_environment_variables_map_to_settings():
    env = {
        "TLS_CERT_FILE": __file__,
        "TLS_KEY_FILE": __file__,
        "WAF_ENABLED": "true",
        "WAF_HOST": "waf",
        "WAF_PORT": "9001",
        "WAF_TIMEOUT_MS": "250",
        "HTTP_PORT": "81",
    }
    cfg = load_config(env=env)
    assert (cfg.tls.cert, cfg.tls.key) == (__file__, __file__)
    assert (cfg.waf.mode, cfg.waf.url, cfg.waf.timeout_ms) == ("service", "http://waf:9001", 250)
    assert cfg.listen.http_port == 81
    assert load_config(env={"WAF_ENABLED": "false"}).waf.mode == "off"
    assert load_config(env={"WAF_ENABLED": "true"}).waf.mode == "inline"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"listen": {"http_port": -1}}, "listen.http_port"),
        ({"quic": {"congestion_control": "bbr9"}}, "quic.congestion_control"),
        ({"quic": {"probe_datagram_size": 900}}, "quic.probe_datagram_size"),
        ({"routes": [{"path_prefix": "api", "backends": ["http://a:1"]}]}, "routes[0].path_prefix"),
        ({"routes": [{"backends": ["ftp://a:1"]}]}, "routes[0].backends[0]"),
        ({"trusted_proxies": ["not-an-ip"]}, "trusted_proxies[0]"),
        ({"waf": {"fail": "sideways"}}, "waf.fail"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert info.value.key == key
    assert "fix:" in str(info.value) and "\n" not in str(info.value)


def test_example_script_runs_and_proxies_over_h3(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library_use.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "HTTP/3 200: hello from the example backend" in proc.stdout


def test_wheel_is_tagged_for_the_platform_only_when_it_carries_the_coraza_engine(tmp_path):
    """The built Coraza engine is a Linux shared library: a wheel that packs it must not
    claim to be pure Python (py3-none-any), one without it must."""
    src = tmp_path / "src"  # a copy of what git tracks; the engine is added for the second
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in [f.decode() for f in files if f]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    engine = Path("quicproxy/waf/coraza/libquicproxy-coraza.so")
    for with_engine in (False, True):
        if with_engine:
            built = ROOT / engine
            (src / engine).write_bytes(built.read_bytes() if built.exists() else b"\x7fELF")
        out = tmp_path / f"wheel-{with_engine}"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
            check=True,
            capture_output=True,
            timeout=300,
            # the tag alone: no build step (tests/test_packaging.py builds the engine)
            env={**os.environ, "QUICPROXY_BUILD_CORAZA": "0"},
        )
        (wheel,) = out.glob("*.whl")
        if with_engine:
            assert wheel.name.endswith(
                ("-py3-none-linux_x86_64.whl", "-py3-none-linux_aarch64.whl")
            )
            listing = subprocess.run(
                [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True
            ).stdout
            assert str(engine) in listing and ".data/" not in listing
        else:
            assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
