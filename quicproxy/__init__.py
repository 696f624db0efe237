"""quic-proxy-waf: an HTTP/3 (QUIC) edge reverse proxy with an OWASP CRS WAF.

Run it inside your own asyncio program::

    import quicproxy

    config = quicproxy.load_config(overrides={"backend": "http://127.0.0.1:9000"})
    async with quicproxy.Proxy(config) as proxy:
        proxy.add_route(quicproxy.Route(backends=["http://127.0.0.1:9001"], path_prefix="/api"))
        ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._config import Config, Route, UpstreamTlsConfig, WafConfig, load_config
from ._errors import ConfigError
from ._server import Proxy

__all__ = [
    "Config",
    "ConfigError",
    "Proxy",
    "Route",
    "UpstreamTlsConfig",
    "WafConfig",
    "load_config",
    "__version__",
]
