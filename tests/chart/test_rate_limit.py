"""proxy.rateLimit and proxy.accessLog become the proxy's rate_limit and log keys."""

from __future__ import annotations

import pytest


def test_rate_limit_off_by_default(profile):
    assert "rate_limit" not in profile("default").proxy_config()


def test_rate_limit_values_reach_the_config(render, tmp_path):
    from quicproxy import load_config

    rl = {"enabled": True, "rate": 2.5, "burst": 10, "perRoute": True}
    rl |= {"allow": ["10.0.0.0/8"], "maxEntries": 5000}
    m = render(values={"proxy": {"rateLimit": rl, "accessLog": "common"}})
    cfg = m.proxy_config()
    assert cfg["rate_limit"] == {
        "enabled": True,
        "rate": 2.5,
        "burst": 10,
        "per_route": True,
        "allow": ["10.0.0.0/8"],
        "max_entries": 5000,
    }
    assert cfg["log"] == {"access": "common"}
    loaded = load_config(env={}, overrides={"rate_limit": cfg["rate_limit"], "log": cfg["log"]})
    assert (loaded.rate_limit.rate, loaded.rate_limit.burst) == (2.5, 10)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"proxy": {"rateLimit": {"rate": 0}}}, "proxy.rateLimit.rate"),
        ({"proxy": {"rateLimit": {"burst": 0}}}, "proxy.rateLimit.burst"),
        ({"proxy": {"rateLimit": {"maxEntries": -1}}}, "proxy.rateLimit.maxEntries"),
        ({"proxy": {"rateLimit": {"limit": 5}}}, "limit"),
        ({"proxy": {"accessLog": "xml"}}, "proxy.accessLog"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
        ({"metrics": {"dashboard": {"enabled": "yes"}}}, "metrics.dashboard.enabled"),
    ],
)
def test_schema_rejects_bad_values(render_error, values, key):
    err = render_error(values=values)
    assert "values don't meet the specifications of the schema" in err and key in err, err
