"""Configuration: defaults < YAML file < environment < command line.

Every setting lives in one dataclass tree (:class:`Config`). Loading merges
plain dicts from each source, then builds and validates the tree; any problem
raises :class:`ConfigError` whose message is one line naming the key and fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from ._errors import ConfigError

__all__ = [
    "Config",
    "ListenConfig",
    "TlsConfig",
    "QuicConfig",
    "LimitsConfig",
    "UpstreamConfig",
    "WafConfig",
    "Route",
    "load_config",
    "parse_backend",
]


@dataclass
class Route:
    """Send requests matching ``host`` (optional) and ``path_prefix`` to ``backends``."""

    backends: list[str] = field(default_factory=list)
    "Upstream URLs (http://host:port), balanced round-robin."
    host: str | None = None
    "Exact host to match (case-insensitive, port ignored); None matches any."
    path_prefix: str = "/"
    "Path prefix to match; the longest matching prefix wins."


@dataclass
class ListenConfig:
    host: str = ""
    "Address to bind every listener to; empty means every address, IPv4 and IPv6."
    http_port: int | None = None
    "Plain HTTP port; default 80 as root, 8080 otherwise."
    https_port: int | None = None
    "TLS TCP (h2, http/1.1) and QUIC UDP (h3) port; default 443 as root, 8443 otherwise."
    alt_svc_port: int | None = None
    "Port advertised in Alt-Svc (public port behind a hostPort/Service); default https_port."
    plain_http: str = "redirect"
    "What the plain HTTP port does: 'redirect' to https (308) or 'proxy'."


@dataclass
class TlsConfig:
    cert: str | None = None
    "PEM certificate chain; a self-signed one is generated when unset."
    key: str | None = None
    "PEM private key."
    self_signed_dir: str | None = None
    "Where a generated self-signed pair is kept and reused (default: user cache dir)."


@dataclass
class QuicConfig:
    idle_timeout: float = 60.0
    "Seconds of silence before a QUIC connection is closed."
    max_datagram_size: int = 1350
    "Largest UDP payload sent."
    congestion_control: str = "reno"
    "Congestion control algorithm known to aioquic (reno, cubic)."
    retry: bool = False
    "Send QUIC Retry to validate client addresses."
    early_data: bool = False
    "Accept 0-RTT; only safe methods are admitted, others get 425."
    stream_window: int = 1048576
    "Per-stream receive window credit given back as the proxy consumes data."


@dataclass
class LimitsConfig:
    max_header_bytes: int = 65536
    "Total request header size; larger gets 431."
    max_body_bytes: int = 104857600
    "Request body size; larger gets 413 (0 = no limit)."


@dataclass
class UpstreamConfig:
    connect_timeout: float = 5.0
    "Seconds to connect to an upstream; failure gives 502."
    timeout: float = 60.0
    "Seconds to wait for upstream response headers or each body read; gives 504."
    pool_size: int = 64
    "Idle keep-alive connections kept per upstream member."


@dataclass
class WafExclusion:
    rule_id: int = 0
    "Rule id to remove."
    path_prefix: str | None = None
    "Only for requests under this path; None removes it everywhere."


@dataclass
class WafConfig:
    mode: str = "off"
    "off, inline (engine in this process) or service (remote WAF service)."
    engine: str = "coraza"
    "coraza (Coraza + OWASP CRS 4, quicproxy/waf/coraza) or modsecurity (libmodsecurity3)."
    url: str | None = None
    "WAF service base URL for mode 'service', e.g. http://waf:9000."
    timeout_ms: int = 1000
    "How long to wait for the WAF service."
    fail: str = "closed"
    "When the WAF service is unreachable or slow: 'closed' (503) or 'open' (forward)."
    rules_dir: str = "/usr/share/modsecurity-crs"
    "OWASP CRS directory for ModSecurity (coraza uses the CRS 4 built into its library)."
    library: str | None = None
    "Engine library; default libmodsecurity.so.3, or $QUICPROXY_CORAZA_LIB / the built one."
    rule_engine: str = "On"
    "SecRuleEngine: On or DetectionOnly."
    paranoia_level: int = 1
    "CRS blocking paranoia level 1-4."
    detection_paranoia_level: int | None = None
    "CRS 4 detection paranoia level (rules run and logged, not scored); default paranoia_level."
    anomaly_threshold: int = 5
    "CRS inbound anomaly score threshold."
    outbound_anomaly_threshold: int = 4
    "CRS outbound anomaly score threshold (responses are not inspected by the proxy)."
    early_blocking: bool = False
    "CRS 4: block at the end of the headers phase once the score is reached."
    allowed_methods: list[str] = field(
        default_factory=lambda: ["GET", "HEAD", "POST", "OPTIONS", "PUT", "PATCH", "DELETE"]
    )
    "Request methods the CRS allows (rule 911100)."
    allowed_content_types: list[str] = field(default_factory=list)
    "Request content types the CRS allows (rule 920420); empty: the CRS default list."
    body_access: bool = True
    "Inspect request bodies."
    body_limit: int = 131072
    "Bytes of a request body inspected (and held back until the decision)."
    over_limit: str = "reject"
    "Bodies over body_limit: 'reject' (413) or 'inspect-prefix' (inspect the start, forward all)."
    extra_rules: list[str] = field(default_factory=list)
    "Extra rule files loaded after the CRS."
    exclusions: list[WafExclusion] = field(default_factory=list)
    "Rules removed, everywhere or under a path prefix."
    pool_size: int = 16
    "Keep-alive connections to the WAF service."


@dataclass
class Config:
    backend: str | None = None
    "Default upstream (http://host:port); the built-in demo backend when unset."
    routes: list[Route] = field(default_factory=list)
    "Host/path routes tried before the default backend."
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    quic: QuicConfig = field(default_factory=QuicConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    waf: WafConfig = field(default_factory=WafConfig)
    trusted_proxies: list[str] = field(default_factory=list)
    "Peers (IPs or CIDRs) whose X-Forwarded-* headers are kept."
    shutdown_grace: float = 30.0
    "Seconds in-flight requests get to finish after SIGTERM."
    workers: int = 1
    "Worker processes sharing the ports (SO_REUSEPORT)."
    log_level: str = "info"
    "debug, info, warning or error."

    def validate(self) -> Config:
        _validate(self)
        return self


_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")

# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, args[0], value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}", "give a YAML list")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}", "give a YAML mapping")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"expected true/false, got {value!r}", "use true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}", "give a number")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(
                key, f"expected {_type_name(tp)}, got {value!r}", "give a number"
            ) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected a string, got {value!r}", "give a string")
        return str(value)
    return value


def _build(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(
                prefix + str(key), "unknown key", f"remove it or use one of: {', '.join(names)}"
            )
        kwargs[name] = _coerce(prefix + name, hints[name], value)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_backend(key: str, url: str) -> tuple[str, int]:
    """Split an upstream URL into (host, port); ConfigError naming ``key`` if unusable."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            key, f"cannot parse backend URL {url!r} ({exc})", "use http://HOST:PORT"
        ) from None
    if parts.scheme != "http":
        raise ConfigError(
            key, f"unsupported scheme in {url!r}", "upstreams are plain http://HOST:PORT"
        )
    if not parts.hostname:
        raise ConfigError(key, f"no host in backend URL {url!r}", "use http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(key, f"backend URL {url!r} has a path", "use http://HOST:PORT only")
    return parts.hostname, port or 80


def _check_port(key: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise ConfigError(key, f"port {value} out of range", "use a port from 1 to 65535")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"invalid value {value!r}", f"use one of: {', '.join(choices)}")


def _check_readable(key: str, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path} ({exc.strerror})", "give a readable PEM file"
        ) from None


def _validate(cfg: Config) -> None:
    _check_port("listen.http_port", cfg.listen.http_port)
    _check_port("listen.https_port", cfg.listen.https_port)
    _check_port("listen.alt_svc_port", cfg.listen.alt_svc_port)
    _check_choice("listen.plain_http", cfg.listen.plain_http, ("redirect", "proxy"))
    if (cfg.tls.cert is None) != (cfg.tls.key is None):
        raise ConfigError("tls.cert", "cert and key must be given together", "set both or neither")
    _check_readable("tls.cert", cfg.tls.cert)
    _check_readable("tls.key", cfg.tls.key)
    if cfg.backend is not None:
        parse_backend("backend", cfg.backend)
    for i, route in enumerate(cfg.routes):
        if not route.backends:
            raise ConfigError(f"routes[{i}].backends", "empty", "list at least one upstream URL")
        if not route.path_prefix.startswith("/"):
            raise ConfigError(f"routes[{i}].path_prefix", "must start with /", "e.g. /api")
        for j, url in enumerate(route.backends):
            parse_backend(f"routes[{i}].backends[{j}]", url)
    _check_choice("quic.congestion_control", cfg.quic.congestion_control, ("reno", "cubic"))
    if not 1200 <= cfg.quic.max_datagram_size <= 65527:
        raise ConfigError("quic.max_datagram_size", "out of range", "use 1200 to 65527")
    if cfg.quic.idle_timeout <= 0:
        raise ConfigError("quic.idle_timeout", "must be positive", "give seconds, e.g. 60")
    if cfg.quic.stream_window < 65536:
        raise ConfigError("quic.stream_window", "too small", "use at least 65536")
    if cfg.limits.max_header_bytes < 1024:
        raise ConfigError("limits.max_header_bytes", "too small", "use at least 1024")
    if cfg.limits.max_body_bytes < 0:
        raise ConfigError("limits.max_body_bytes", "negative", "use 0 (no limit) or a size")
    if cfg.upstream.connect_timeout <= 0 or cfg.upstream.timeout <= 0:
        raise ConfigError("upstream.timeout", "must be positive", "give seconds, e.g. 60")
    if cfg.workers < 1:
        raise ConfigError("workers", f"{cfg.workers} is not a worker count", "use 1 or more")
    if cfg.shutdown_grace < 0:
        raise ConfigError("shutdown_grace", "negative", "give seconds, e.g. 30")
    _check_choice("log_level", cfg.log_level, ("debug", "info", "warning", "error"))
    for i, net in enumerate(cfg.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies[{i}]", f"{net!r} is not an IP or CIDR", "e.g. 10.0.0.0/8"
            ) from None
    waf = cfg.waf
    _check_choice("waf.mode", waf.mode, ("off", "inline", "service"))
    _check_choice("waf.fail", waf.fail, ("closed", "open"))
    _check_choice("waf.engine", waf.engine, ("coraza", "modsecurity"))
    _check_choice("waf.rule_engine", waf.rule_engine, ("On", "DetectionOnly"))
    _check_choice("waf.over_limit", waf.over_limit, ("reject", "inspect-prefix"))
    if not 1 <= waf.paranoia_level <= 4:
        raise ConfigError("waf.paranoia_level", "out of range", "use 1 to 4")
    detection = waf.detection_paranoia_level
    if detection is not None and not waf.paranoia_level <= detection <= 4:
        raise ConfigError("waf.detection_paranoia_level", "out of range", "use paranoia_level to 4")
    for key in ("anomaly_threshold", "outbound_anomaly_threshold"):
        if getattr(waf, key) < 1:
            raise ConfigError(f"waf.{key}", "must be positive", "give a score, e.g. 5")
    for i, method in enumerate(waf.allowed_methods):
        if not method.isalpha() or not method.isupper():
            raise ConfigError(
                f"waf.allowed_methods[{i}]", f"{method!r} is not a method", "e.g. GET"
            )
    for i, ctype in enumerate(waf.allowed_content_types):
        if not _CONTENT_TYPE.match(ctype):
            raise ConfigError(
                f"waf.allowed_content_types[{i}]",
                f"{ctype!r} is not a media type",
                "give type/subtype, e.g. application/octet-stream",
            )
    if waf.timeout_ms <= 0:
        raise ConfigError("waf.timeout_ms", "must be positive", "give milliseconds, e.g. 1000")
    if waf.mode == "service":
        if not waf.url:
            raise ConfigError(
                "waf.url", "mode is 'service' but no URL", "set --waf-url or WAF_HOST/WAF_PORT"
            )
        try:
            parse_backend("waf.url", waf.url)
        except ConfigError as exc:
            raise ConfigError(
                "waf.url", str(exc).split(": ", 2)[-1], "use http://HOST:PORT"
            ) from None


# --------------------------------------------------------------------------- sources


def _env_dict(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the environment variables of the image this replaces."""
    out: dict[str, Any] = {}
    if env.get("BACKEND_HOST"):
        port = env.get("BACKEND_PORT", "80")
        out["backend"] = f"http://{env['BACKEND_HOST']}:{port}"
    listen: dict[str, Any] = {}
    for var, key in (("HTTP_PORT", "http_port"), ("HTTPS_PORT", "https_port")):
        if env.get(var):
            try:
                listen[key] = int(env[var])
            except ValueError:
                raise ConfigError(var, f"{env[var]!r} is not a port", "use a number") from None
    if env.get("ALT_SVC_PORT"):
        listen["alt_svc_port"] = env["ALT_SVC_PORT"]
    if listen:
        out["listen"] = listen
    tls: dict[str, Any] = {}
    if env.get("TLS_CERT_FILE"):
        tls["cert"] = env["TLS_CERT_FILE"]
    if env.get("TLS_KEY_FILE"):
        tls["key"] = env["TLS_KEY_FILE"]
    if tls:
        out["tls"] = tls
    waf: dict[str, Any] = {}
    if env.get("WAF_HOST"):
        waf["url"] = f"http://{env['WAF_HOST']}:{env.get('WAF_PORT', '9000')}"
    if "WAF_ENABLED" in env:
        enabled = _coerce("WAF_ENABLED", bool, env["WAF_ENABLED"])
        waf["mode"] = ("service" if env.get("WAF_HOST") else "inline") if enabled else "off"
    for var, key in (
        ("WAF_TIMEOUT_MS", "timeout_ms"),
        ("WAF_FAIL", "fail"),
        ("WAF_RULES_DIR", "rules_dir"),
        ("WAF_PARANOIA_LEVEL", "paranoia_level"),
        ("WAF_ANOMALY_THRESHOLD", "anomaly_threshold"),
        ("WAF_ENGINE", "engine"),
        ("WAF_RULE_ENGINE", "rule_engine"),
        ("WAF_LIBRARY", "library"),
        ("WAF_BODY_LIMIT", "body_limit"),
        ("WAF_OVER_LIMIT", "over_limit"),
    ):
        if env.get(var):
            waf[key] = env[var]
    if waf.get("engine") in ("On", "DetectionOnly"):
        # WAF_ENGINE used to hold the SecRuleEngine value.
        waf.setdefault("rule_engine", waf.pop("engine"))
    if waf:
        out["waf"] = waf
    return out


def _file_dict(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(
            "--config", f"cannot read {path} ({exc.strerror})", "give a readable file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            "--config", f"{path} is not valid YAML{where}", "fix the YAML syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} is not a mapping", "write key: value pairs")
    return data


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a validated Config: defaults < file ``path`` < ``env`` < ``overrides``.

    ``overrides`` uses the same nested keys as the file (the CLI passes its flags
    this way). ``env`` defaults to ``os.environ``.
    """
    data: dict[str, Any] = {}
    if path:
        data = _merge(data, _file_dict(path))
    data = _merge(data, _env_dict(os.environ if env is None else env))
    if overrides:
        data = _merge(data, overrides)
    cfg: Config = _build(Config, data)
    return cfg.validate()
