"""Configuration: defaults < YAML file < environment < command line.

Every setting lives in one dataclass tree (:class:`Config`). Loading merges
plain dicts from each source, then builds and validates the tree; any problem
raises :class:`ConfigError` whose message is one line naming the key and fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
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
from .quic._keys import SecretFileError, read_secret_file
from .upstream._member import TlsProfile, client_context

__all__ = [
    "Config",
    "ListenConfig",
    "TlsConfig",
    "TlsCertificate",
    "QuicConfig",
    "LimitsConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "OutlierConfig",
    "HealthConfig",
    "WeightedBackend",
    "WafConfig",
    "WafAuditConfig",
    "RateLimitConfig",
    "LogConfig",
    "MetricsConfig",
    "Route",
    "RouteWaf",
    "WafExclusion",
    "load_config",
    "parse_backend",
    "parse_upstream",
]


@dataclass
class UpstreamTlsConfig:
    """TLS to https:// upstreams (``upstream.tls``, or ``routes[].tls`` over it key by key)."""

    ca: str | None = None
    "PEM CA bundle upstream certificates must chain to; unset: the system store."
    cert: str | None = None
    "PEM client certificate chain presented to upstreams (mTLS), with key."
    key: str | None = None
    "PEM private key of cert (unencrypted)."
    server_name: str | None = None
    "Name sent in SNI and verified in the certificate; unset: the URL's host."
    verify: bool | None = None
    "false skips certificate verification (a warning at start); unset: true."

    def over(self, base: UpstreamTlsConfig) -> UpstreamTlsConfig:
        """These settings with ``base``'s where unset (cert and key go together)."""
        pair = (self.cert, self.key) if self.cert or self.key else (base.cert, base.key)
        return UpstreamTlsConfig(
            ca=self.ca if self.ca is not None else base.ca,
            cert=pair[0],
            key=pair[1],
            server_name=self.server_name if self.server_name is not None else base.server_name,
            verify=self.verify if self.verify is not None else base.verify,
        )

    def profile(self) -> TlsProfile:
        return TlsProfile(self.ca, self.cert, self.key, self.server_name, self.verify is not False)

    def check(self, section: str) -> None:
        """This section's own files load (readable, PEM, cert with its key) and its
        server_name is a host name; ConfigError naming ``section``'s key otherwise."""
        if self.server_name is not None and not _HOSTNAME.match(self.server_name):
            raise ConfigError(
                f"{section}.server_name",
                f"{self.server_name!r} is not a host name",
                "give the name the upstream's certificate holds, e.g. api.internal",
            )
        if self.ca is not None or self.cert is not None or self.key is not None:
            client_context(TlsProfile(self.ca, self.cert, self.key), section)


@dataclass
class WeightedBackend:
    """A backend with a weight (``routes[].backends[]: {url: ..., weight: N}``)."""

    url: str = ""
    "Upstream URL, as a plain backends entry."
    weight: int = 1
    "Share of the route's traffic relative to the other members (1 to 1000)."


@dataclass
class HealthConfig:
    """Active health probes of a route's members (``routes[].health``; off unless set)."""

    path: str = "/"
    "Path requested with GET on each member."
    interval: float = 5.0
    "Seconds between two probes of one member."
    timeout: float = 2.0
    "Seconds a probe may take (connect, head and body); longer is a failure."
    healthy: int = 2
    "Consecutive passing probes that bring a member marked down back."
    unhealthy: int = 3
    "Consecutive failing probes that mark a member down."
    statuses: list[str] = field(default_factory=lambda: ["200-399"])
    "Statuses that pass: codes or ranges, e.g. [200, 204, 300-399]."


@dataclass
class Route:
    """Send requests matching ``host`` (optional) and ``path_prefix`` to ``backends``."""

    backends: list[str | WeightedBackend] = field(default_factory=list)
    "Upstream URLs (http://host:port, https://..., h2c://...), or {url, weight} mappings."
    host: str | None = None
    "Exact host to match (case-insensitive, port ignored); None matches any."
    path_prefix: str = "/"
    "Path prefix to match; the longest matching prefix wins."
    tls: UpstreamTlsConfig | None = None
    "TLS to this route's https backends, over upstream.tls key by key."
    balance: str = "least_request"
    "How a member is chosen: least_request (two random choices), round_robin or hash."
    hash_on: str | None = None
    "With balance: hash, the key: client, header:NAME or cookie:NAME (default client)."
    health: HealthConfig | None = None
    "Active health probes of the members; off unless set."
    waf: RouteWaf | None = None
    "This route's WAF policy (mode, paranoia levels, threshold, exclusions) over waf.*."

    def check(self, key: str = "route") -> None:
        """ConfigError naming ``key``'s setting at fault (also for routes added at run time)."""
        _validate_route(key, self)


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
    bind_wait: float = 0.0
    "Seconds to keep retrying a port in use at start (a previous instance still draining)."
    plain_http: str = "redirect"
    "What the plain HTTP port does: 'redirect' to https (308) or 'proxy'."
    backlog: int = 1024
    "TCP listen backlog handed to the kernel (capped by net.core.somaxconn)."


@dataclass
class TlsCertificate:
    """One more certificate pair (``tls.certificates[]``), served to the names it holds."""

    cert: str | None = None
    "PEM certificate chain; its subjectAltName DNS names (wildcards too) choose it by SNI."
    key: str | None = None
    "PEM private key."


@dataclass
class TlsConfig:
    cert: str | None = None
    "PEM certificate chain; a self-signed one is generated when unset."
    key: str | None = None
    "PEM private key."
    self_signed_dir: str | None = None
    "Where a generated self-signed pair is kept and reused (default: user cache dir)."
    certificates: list[TlsCertificate] = field(default_factory=list)
    "More pairs chosen by SNI; cert/key above is the default (no SNI, unknown name)."

    def check(self) -> None:
        """Every pair given whole and readable; ConfigError naming the key otherwise."""
        if (self.cert is None) != (self.key is None):
            raise ConfigError(
                "tls.cert", "cert and key must be given together", "set both or neither"
            )
        _check_readable("tls.cert", self.cert)
        _check_readable("tls.key", self.key)
        if self.certificates and self.cert is None:
            raise ConfigError(
                "tls.certificates",
                "given without a default pair",
                "set tls.cert and tls.key too (served to clients without SNI or with another name)",
            )
        for i, pair in enumerate(self.certificates):
            for name in ("cert", "key"):
                key = f"tls.certificates[{i}].{name}"
                if not getattr(pair, name):
                    raise ConfigError(key, "missing", "give both cert: FILE and key: FILE")
                _check_readable(key, getattr(pair, name))


@dataclass
class QuicConfig:
    idle_timeout: float = 60.0
    "Seconds of silence before a QUIC connection is closed."
    max_datagram_size: int = 1350
    "Largest UDP payload sent until a larger one is proven (see probe_datagram_size)."
    probe_datagram_size: int = 1452
    "Size probed once a connection sends in bulk, per path; used once acknowledged (0: off)."
    congestion_control: str = "cubic"
    "Congestion control algorithm (the QUIC core, qh3, has CUBIC only)."
    retry: bool = False
    "Always send QUIC Retry to validate client addresses (else only under load)."
    retry_above: int = 100
    "Handshakes in progress above which new clients must first answer a Retry."
    max_connections: int = 10000
    "QUIC connections open at once; new ones beyond are dropped."
    max_connections_per_address: int = 1000
    "QUIC connections open at once from one client address."
    max_handshakes: int = 1000
    "Handshakes in progress at once (with Retry, only validated addresses count)."
    max_handshakes_per_address: int = 128
    "Handshakes in progress at once from one client address."
    handshake_timeout: float = 10.0
    "Seconds a handshake may take before its state is dropped."
    max_handshake_bytes: int = 65536
    "Bytes a client may send before its handshake completes."
    max_new_per_second: int = 1000
    "Initials of new connections examined per second; a flood beyond is dropped unread."
    gso: bool = True
    "Send datagram runs with UDP generic segmentation offload where the kernel allows."
    early_data: bool = False
    "Accept 0-RTT; only safe methods are admitted, others get 425."
    stream_window: int = 1048576
    "Per-stream receive window credit given back as the proxy consumes data."
    stateless_reset_rate: int = 100
    "Stateless resets sent per second at most, a tenth of it per client address (0: none)."
    shared_secret_file: str | None = None
    "File of the QUIC secret shared by workers and replicas (base64 lines, newest first)."
    handover_dir: str | None = None
    """Folder of the Unix sockets through which processes on one port hand each other QUIC
    datagrams (workers; an old and a new process during a restart); one subfolder a port.
    Default: $XDG_RUNTIME_DIR/quicproxy, /run/quicproxy, else the temporary folder's."""


@dataclass
class LimitsConfig:
    max_header_bytes: int = 65536
    "Total request header size; larger gets 431."
    max_body_bytes: int = 104857600
    "Request body size; larger gets 413 (0 = no limit)."
    max_resets: int = 200
    "Streams (h2/h3) reset before their response body began, per abuse_window; more: closed."
    max_control_frames: int = 1000
    "HTTP/2 SETTINGS/PING/PRIORITY/empty frames per abuse_window before the connection is closed."
    abuse_window: float = 10.0
    "Seconds over which resets and control frames are counted."
    max_headers: int = 100
    "Request header fields (Host / :authority included); more gets 431."
    max_connections_per_address: int = 256
    "Open TCP connections per client address (IPv6: per /64); more are closed at once."
    max_tunnels: int = 10000
    "WebSocket tunnels open at once; more get 503."
    max_tunnels_per_client: int = 256
    "WebSocket tunnels open at once from one client address; more get 429."


@dataclass
class TimeoutsConfig:
    header: float = 10.0
    "Seconds to receive a whole request head (h1), from the first byte; 408 and close."
    idle: float = 60.0
    "Seconds a connection may sit with no request in flight (h1 keep-alive, h2)."
    body: float = 30.0
    "Seconds the client may pause while sending a request body; the request then fails."
    send: float = 60.0
    "Seconds a client may leave our response unread (send buffer full) before we drop it."
    h2_preface: float = 10.0
    "Seconds for an h2 client to send its preface and SETTINGS after the TLS handshake."
    tunnel_idle: float = 300.0
    "Seconds a WebSocket tunnel may carry no byte either way before it is closed."


@dataclass
class OutlierConfig:
    """Passive health (``upstream.outlier``): members that keep failing are ejected."""

    enabled: bool = True
    "Eject members after consecutive failures (connect refused or timed out, reset, timeout)."
    consecutive_failures: int = 5
    "Failures in a row that eject a member."
    on_5xx: bool = False
    "Count 5xx responses of a member as failures too."
    base_ejection: float = 5.0
    "Seconds of the first ejection; doubled each time the member fails again on return."
    max_ejection: float = 120.0
    "Longest ejection, in seconds."
    max_ejected_share: float = 0.5
    "Share of a route's members ejected at once at most (at least one); all down: 503."


@dataclass
class UpstreamConfig:
    connect_timeout: float = 5.0
    "Seconds to connect to an upstream; failure gives 502."
    timeout: float = 60.0
    "Seconds to wait for upstream response headers or each body read; gives 504."
    pool_size: int = 64
    "Idle keep-alive connections kept per upstream member."
    max_connections: int = 1024
    "Upstream connections open at once, all members together."
    max_connections_per_member: int = 256
    "Upstream connections open at once to one member."
    queue_timeout: float = 5.0
    "Seconds a request waits for a free upstream connection before a 503."
    tls: UpstreamTlsConfig = field(default_factory=UpstreamTlsConfig)
    "TLS to https:// upstreams: CA, client certificate, server name."
    retries: int = 2
    "Attempts on other members after the first (a request never sent, or an idempotent one)."
    retry_budget: float = 0.2
    "Retries of sent requests per route, as a share of its requests (plus 10, refilled 1/s)."
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    "Passive health: ejection of failing members."


_SAFE_PREFIX = re.compile(r"^/[^\"'\\\s]*$")
_TAG = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_TARGET = re.compile(
    r"^(?:ARGS|ARGS_GET|ARGS_POST|ARGS_NAMES|REQUEST_HEADERS|REQUEST_COOKIES|XML)"
    r":[A-Za-z0-9_.\-\[\]$@]{1,256}$"
)


@dataclass
class WafExclusion:
    """A rule (``rule_id``) or rules (``tag``) switched off, everywhere or under
    ``path_prefix``, whole or for one ``target`` (CRS's ctl:ruleRemoveTargetById)."""

    rule_id: int = 0
    "Rule id to remove (or give ``tag``)."
    path_prefix: str | None = None
    "Only for requests under this path; None removes it everywhere."
    tag: str | None = None
    "Remove the rules with this tag instead (e.g. attack-sqli)."
    target: str | None = None
    "Only for this variable: ARGS:name, REQUEST_HEADERS:name, REQUEST_COOKIES:name."

    def check(self, key: str) -> None:
        """ConfigError naming ``key`` when this exclusion cannot become a rule."""
        if (self.rule_id > 0) == (self.tag is not None):
            raise ConfigError(
                key + ".rule_id", "give exactly one of rule_id and tag", "e.g. rule_id: 942100"
            )
        if self.tag is not None and not _TAG.match(self.tag):
            raise ConfigError(key + ".tag", f"{self.tag!r} is not a tag", "e.g. attack-sqli")
        if self.path_prefix is not None and not _SAFE_PREFIX.match(self.path_prefix):
            raise ConfigError(
                key + ".path_prefix",
                f"{self.path_prefix!r} is not a plain path",
                "start with / and leave out quotes, backslashes and spaces",
            )
        if self.target is not None and not _TARGET.match(self.target):
            raise ConfigError(
                key + ".target",
                f"{self.target!r} is not a variable with a name",
                "e.g. ARGS:json.note, REQUEST_HEADERS:referer or REQUEST_COOKIES:prefs",
            )


@dataclass
class RouteWaf:
    """``routes[].waf``: this route's WAF policy, over the global ``waf.*`` key by key."""

    mode: str | None = None
    "off (not inspected), detect (inspected, logged, never refused) or block; unset: block."
    paranoia_level: int | None = None
    "CRS blocking paranoia level 1-4; unset: waf.paranoia_level."
    detection_paranoia_level: int | None = None
    "CRS 4 detection paranoia level (logged, not enforced); unset: waf's, or paranoia_level."
    anomaly_threshold: int | None = None
    "Inbound anomaly threshold; unset: waf.anomaly_threshold."
    exclusions: list[WafExclusion] = field(default_factory=list)
    "Added to waf.exclusions on this route."
    allowed_methods: list[str] | None = None
    "Request methods the CRS allows on this route (rule 911100); unset: waf.allowed_methods."
    allowed_content_types: list[str] | None = None
    "Request content types the CRS allows on this route (rule 920420), replacing waf's."
    body_limit: int | None = None
    "Bytes of a request body inspected on this route, at most waf.body_limit (over_limit applies)."

    @property
    def changes_rules(self) -> bool:
        """Whether this policy needs a rule set of its own (more than a mode)."""
        return (
            self.paranoia_level is not None
            or self.detection_paranoia_level is not None
            or self.anomaly_threshold is not None
            or bool(self.exclusions)
            or self.allowed_methods is not None
            or self.allowed_content_types is not None
            or self.body_limit is not None
        )


DEFAULT_AUDIT_MASK = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "x-auth-token",
    "cookie:session",
    "cookie:sessionid",
    "cookie:sid",
    "cookie:phpsessid",
    "cookie:jsessionid",
    "cookie:connect.sid",
    "cookie:asp.net_sessionid",
]
"Headers and cookies whose values the WAF audit log masks by default."


@dataclass
class WafAuditConfig:
    """``waf.audit``: one JSON record per request the WAF refused or scored."""

    log: str = "stdout"
    "stdout, a file path (appended to), or off."
    record: str = "refused"
    "refused (refused, or would be: detect mode, detection paranoia level), scored or all."
    rate: float = 50.0
    "Records written per second at most (a token bucket); the rest are dropped and counted."
    burst: int = 200
    "Records that may be written at once before ``rate`` applies."
    data_limit: int = 200
    "Bytes of a rule's matched data kept in a record."
    mask: list[str] = field(default_factory=lambda: list(DEFAULT_AUDIT_MASK))
    "Header names, and cookie:NAME (cookie:* for every cookie), whose values are masked."


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
    extra_detection: bool = True
    "Load the shipped rules that close CRS PL1's gaps (multi-decoding, evasions, more targets)."
    extra_rules: list[str] = field(default_factory=list)
    "Extra rule files loaded after the CRS."
    plugins_dir: str | None = None
    "CRS 4 plugins (*-config.conf, *-before.conf, *-after.conf), loaded in CRS 4's order."
    exclusions: list[WafExclusion] = field(default_factory=list)
    "Rules (by id or tag) removed, everywhere or under a path prefix, whole or for a target."
    pool_size: int = 16
    "Keep-alive connections to the WAF service."
    audit: WafAuditConfig = field(default_factory=WafAuditConfig)
    "The audit log of refused/scored requests."


@dataclass
class RateLimitConfig:
    enabled: bool = False
    "Limit requests per client address (the real one, after trusted_proxies)."
    rate: float = 50.0
    "Tokens added per second to each client's bucket."
    burst: int = 100
    "Bucket size: requests a client may send at once."
    per_route: bool = False
    "One bucket per client and route instead of one per client."
    allow: list[str] = field(default_factory=list)
    "Networks (IPs or CIDRs) never limited, e.g. health checkers."
    max_entries: int = 100000
    "Buckets kept at most (least recently seen dropped first)."


@dataclass
class LogConfig:
    access: str = "json"
    "Access log to stdout: json, common (Apache combined-like) or off."


@dataclass
class MetricsConfig:
    port: int | None = None
    "Separate /metrics listener port; unset: /metrics on the plain HTTP port."
    host: str | None = None
    "Address of the metrics listener; default listen.host."


@dataclass
class Config:
    backend: str | None = None
    "Default upstream (http://host:port or https://host:port); the demo backend when unset."
    routes: list[Route] = field(default_factory=list)
    "Host/path routes tried before the default backend."
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    quic: QuicConfig = field(default_factory=QuicConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    waf: WafConfig = field(default_factory=WafConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
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
        if isinstance(value, Mapping):  # str | SomeSection: a mapping is the section
            args = [a for a in args if dataclasses.is_dataclass(a)] or args
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
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off/on as a boolean
            return "on" if value else "off"
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


_DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80}


def parse_upstream(
    key: str, url: str, schemes: tuple[str, ...] = ("http", "https", "h2c")
) -> tuple[str, str, int]:
    """Split an upstream URL into (scheme, host, port); ConfigError naming ``key`` if unusable."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    use = " or ".join(f"{s}://HOST:PORT" for s in schemes)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"cannot parse backend URL {url!r} ({exc})", f"use {use}") from None
    if parts.scheme not in schemes:
        raise ConfigError(key, f"unsupported scheme in {url!r}", f"use {use}")
    if not parts.hostname:
        raise ConfigError(key, f"no host in backend URL {url!r}", f"use {use}")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(key, f"backend URL {url!r} has a path", f"use {use} only")
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


def parse_backend(key: str, url: str) -> tuple[str, int]:
    """Split a plain http URL (the WAF service's) into (host, port)."""
    _, host, port = parse_upstream(key, url, ("http",))
    return host, port


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


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?$|^[0-9a-fA-F:.]+$")


def _check_positive(cfg: Config, section: str, *names: str) -> None:
    for name in names:
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{section}.{name}", "must be positive", "give a number above 0")


def _validate(cfg: Config) -> None:
    _check_port("listen.http_port", cfg.listen.http_port)
    _check_port("listen.https_port", cfg.listen.https_port)
    _check_port("listen.alt_svc_port", cfg.listen.alt_svc_port)
    _check_choice("listen.plain_http", cfg.listen.plain_http, ("redirect", "proxy"))
    cfg.tls.check()
    if cfg.backend is not None:
        parse_upstream("backend", cfg.backend)
    cfg.upstream.tls.check("upstream.tls")
    for i, route in enumerate(cfg.routes):
        if not route.backends:
            raise ConfigError(f"routes[{i}].backends", "empty", "list at least one upstream URL")
        if not route.path_prefix.startswith("/"):
            raise ConfigError(f"routes[{i}].path_prefix", "must start with /", "e.g. /api")
        route.check(f"routes[{i}]")
    _check_choice("quic.congestion_control", cfg.quic.congestion_control, ("cubic",))
    if not 1200 <= cfg.quic.max_datagram_size <= 65527:
        raise ConfigError("quic.max_datagram_size", "out of range", "use 1200 to 65527")
    if cfg.quic.probe_datagram_size and not 1200 <= cfg.quic.probe_datagram_size <= 65527:
        raise ConfigError(
            "quic.probe_datagram_size", "out of range", "use 0 (off) or 1200 to 65527"
        )
    if cfg.quic.idle_timeout <= 0:
        raise ConfigError("quic.idle_timeout", "must be positive", "give seconds, e.g. 60")
    if cfg.quic.stream_window < 65536:
        raise ConfigError("quic.stream_window", "too small", "use at least 65536")
    _check_positive(cfg, "quic", "max_connections", "max_connections_per_address")
    _check_positive(cfg, "quic", "max_handshakes", "max_handshakes_per_address")
    _check_positive(cfg, "quic", "handshake_timeout", "max_handshake_bytes", "max_new_per_second")
    _check_positive(cfg, "limits", "abuse_window", "max_tunnels", "max_tunnels_per_client")
    _check_positive(cfg, "upstream", "max_connections", "max_connections_per_member")
    _check_positive(cfg, "upstream", "queue_timeout")
    if cfg.listen.bind_wait < 0:
        raise ConfigError("listen.bind_wait", "negative", "give seconds, e.g. 40, or 0")
    if cfg.quic.retry_above < 0:
        raise ConfigError("quic.retry_above", "negative", "use 0 (always Retry) or a count")
    if cfg.quic.shared_secret_file is not None:
        try:
            read_secret_file(cfg.quic.shared_secret_file)
        except SecretFileError as exc:
            raise ConfigError(
                "quic.shared_secret_file",
                f"{cfg.quic.shared_secret_file}: {exc}",
                "write one base64 secret of 32+ bytes a line, newest first "
                "(e.g. openssl rand -base64 32)",
            ) from None
    if cfg.quic.handover_dir is not None and not os.path.isabs(cfg.quic.handover_dir):
        raise ConfigError(
            "quic.handover_dir", "not an absolute path", "give e.g. /run/quicproxy or leave it out"
        )
    if cfg.quic.stateless_reset_rate < 0:
        raise ConfigError(
            "quic.stateless_reset_rate", "negative", "use 0 (none) or a rate, e.g. 100"
        )
    if cfg.limits.max_header_bytes < 1024:
        raise ConfigError("limits.max_header_bytes", "too small", "use at least 1024")
    if cfg.limits.max_body_bytes < 0:
        raise ConfigError("limits.max_body_bytes", "negative", "use 0 (no limit) or a size")
    if not 8 <= cfg.limits.max_headers <= 10000:
        raise ConfigError("limits.max_headers", "out of range", "use 8 to 10000, e.g. 100")
    if cfg.limits.max_connections_per_address < 1:
        raise ConfigError("limits.max_connections_per_address", "must be at least 1", "e.g. 256")
    if not 1 <= cfg.listen.backlog <= 65535:
        raise ConfigError("listen.backlog", "out of range", "use 1 to 65535, e.g. 1024")
    for name in ("header", "idle", "body", "send", "h2_preface", "tunnel_idle"):
        if getattr(cfg.timeouts, name) <= 0:
            raise ConfigError(f"timeouts.{name}", "must be positive", "give seconds, e.g. 10")
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
    _validate_ops(cfg)
    _validate_upstream(cfg)
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
    _check_methods("waf.allowed_methods", waf.allowed_methods)
    _check_content_types("waf.allowed_content_types", waf.allowed_content_types)
    if waf.plugins_dir is not None and waf.mode != "off":
        _check_plugins_dir(waf)
    if waf.timeout_ms <= 0:
        raise ConfigError("waf.timeout_ms", "must be positive", "give milliseconds, e.g. 1000")
    _validate_audit(waf.audit)
    for i, exclusion in enumerate(waf.exclusions):
        exclusion.check(f"waf.exclusions[{i}]")
    for i, route in enumerate(cfg.routes):
        if route.waf is not None:
            _validate_route_waf(f"routes[{i}].waf", route.waf, waf)
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


_STATUS_RANGE = re.compile(r"^([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?$")
_HASH_ON = re.compile(r"^(client|(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")


def _validate_route(key: str, route: Route) -> None:
    """One route: backends (URLs, weights), TLS, balancing and health probes."""
    for j, backend in enumerate(route.backends):
        if isinstance(backend, WeightedBackend):
            parse_upstream(f"{key}.backends[{j}].url", backend.url)
            if not 1 <= backend.weight <= 1000:
                raise ConfigError(
                    f"{key}.backends[{j}].weight", "out of range", "use 1 to 1000 (default 1)"
                )
        else:
            parse_upstream(f"{key}.backends[{j}]", backend)
    if route.tls is not None:
        route.tls.check(f"{key}.tls")
    _check_choice(f"{key}.balance", route.balance, ("least_request", "round_robin", "hash"))
    if route.hash_on is not None:
        if route.balance != "hash":
            raise ConfigError(f"{key}.hash_on", "set without balance: hash", "add balance: hash")
        if not _HASH_ON.match(route.hash_on):
            raise ConfigError(
                f"{key}.hash_on",
                f"invalid value {route.hash_on!r}",
                "use client, header:NAME or cookie:NAME",
            )
    health = route.health
    if health is None:
        return
    if not health.path.startswith("/") or any(c in health.path for c in " \t\r\n#"):
        raise ConfigError(f"{key}.health.path", "not an origin-form path", "e.g. /healthz")
    if not 0 < health.interval <= 3600:
        raise ConfigError(f"{key}.health.interval", "out of range", "give seconds, e.g. 5")
    if not 0 < health.timeout <= 3600:
        raise ConfigError(f"{key}.health.timeout", "out of range", "give seconds, e.g. 2")
    for name in ("healthy", "unhealthy"):
        if not 1 <= getattr(health, name) <= 100:
            raise ConfigError(f"{key}.health.{name}", "out of range", "use 1 to 100, e.g. 2")
    if not health.statuses:
        raise ConfigError(f"{key}.health.statuses", "empty", "e.g. [200-399]")
    for j, item in enumerate(health.statuses):
        found = _STATUS_RANGE.match(item.strip())
        if found is None or int(found.group(2) or found.group(1)) < int(found.group(1)):
            raise ConfigError(
                f"{key}.health.statuses[{j}]",
                f"{item!r} is not a status or range",
                "give codes or ranges, e.g. 200 or 200-399",
            )


def _validate_upstream(cfg: Config) -> None:
    """Retries, the retry budget and passive health (``upstream.*``)."""
    up = cfg.upstream
    if not 0 <= up.retries <= 10:
        raise ConfigError("upstream.retries", "out of range", "use 0 (no retry) to 10, e.g. 2")
    if not 0 <= up.retry_budget <= 1:
        raise ConfigError("upstream.retry_budget", "out of range", "give a share 0 to 1, e.g. 0.2")
    out = up.outlier
    if out.consecutive_failures < 1:
        raise ConfigError("upstream.outlier.consecutive_failures", "must be at least 1", "e.g. 5")
    if not out.base_ejection > 0 or math.isinf(out.base_ejection):
        raise ConfigError("upstream.outlier.base_ejection", "must be positive", "give seconds")
    if not out.base_ejection <= out.max_ejection <= 86400:
        raise ConfigError(
            "upstream.outlier.max_ejection",
            "below base_ejection or over a day",
            "give seconds from base_ejection up, e.g. 120",
        )
    if not 0 <= out.max_ejected_share <= 1:
        raise ConfigError(
            "upstream.outlier.max_ejected_share", "out of range", "give a share 0 to 1, e.g. 0.5"
        )


def _check_methods(key: str, methods: list[str]) -> None:
    for i, method in enumerate(methods):
        if not method.isalpha() or not method.isupper():
            raise ConfigError(f"{key}[{i}]", f"{method!r} is not a method", "e.g. GET")


def _check_content_types(key: str, types: list[str]) -> None:
    for i, ctype in enumerate(types):
        if not _CONTENT_TYPE.match(ctype):
            raise ConfigError(
                f"{key}[{i}]",
                f"{ctype!r} is not a media type",
                "give type/subtype, e.g. application/octet-stream",
            )


PLUGIN_SUFFIXES = ("-config.conf", "-before.conf", "-after.conf")
"The files of a CRS 4 plugin, in the order their kinds load."


def _check_plugins_dir(waf: WafConfig) -> None:
    """``waf.plugins_dir``: a readable directory holding readable plugin files (whether
    they parse is the engine's to say, at start)."""
    key, folder = "waf.plugins_dir", waf.plugins_dir or ""
    if waf.mode == "service":
        raise ConfigError(
            key, "the WAF service loads the rules", "set it in the config of quicproxy waf serve"
        )
    if not os.path.isdir(folder):
        raise ConfigError(key, f"{folder} is not a directory", "give the folder of the plugins")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ConfigError(key, f"cannot read {folder}", "make it readable by the proxy's user")
    names = [n for n in sorted(os.listdir(folder)) if n.endswith(PLUGIN_SUFFIXES)]
    if not names:
        raise ConfigError(
            key,
            f"no plugin files in {folder}",
            "put NAME-config.conf, NAME-before.conf or NAME-after.conf files there",
        )
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                key, f"cannot read {path} ({exc.strerror})", "fix or remove the file"
            ) from None


def _validate_route_waf(key: str, policy: RouteWaf, waf: WafConfig) -> None:
    if policy.mode is not None:
        _check_choice(key + ".mode", policy.mode, ("off", "detect", "block"))
    if policy.changes_rules and waf.mode == "service":
        raise ConfigError(
            key,
            "paranoia levels, threshold, methods, types, body limit and exclusions "
            "need waf.mode inline",
            "set them in the WAF service's own config, or keep only mode here",
        )
    level = policy.paranoia_level if policy.paranoia_level is not None else waf.paranoia_level
    if not 1 <= level <= 4:
        raise ConfigError(key + ".paranoia_level", "out of range", "use 1 to 4")
    detection = policy.detection_paranoia_level
    if detection is not None and not level <= detection <= 4:
        raise ConfigError(
            key + ".detection_paranoia_level", "out of range", "use paranoia_level to 4"
        )
    if policy.anomaly_threshold is not None and policy.anomaly_threshold < 1:
        raise ConfigError(key + ".anomaly_threshold", "must be positive", "give a score, e.g. 5")
    for j, exclusion in enumerate(policy.exclusions):
        exclusion.check(f"{key}.exclusions[{j}]")
    if policy.allowed_methods is not None:
        _check_methods(key + ".allowed_methods", policy.allowed_methods)
    if policy.allowed_content_types is not None:
        _check_content_types(key + ".allowed_content_types", policy.allowed_content_types)
    if policy.body_limit is not None and not 1 <= policy.body_limit <= waf.body_limit:
        raise ConfigError(
            key + ".body_limit",
            f"out of range (1 to waf.body_limit, {waf.body_limit})",
            "lower it, or raise waf.body_limit and set smaller limits on other routes",
        )


_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


def _validate_audit(audit: WafAuditConfig) -> None:
    _check_choice("waf.audit.record", audit.record, ("refused", "scored", "all"))
    if not audit.log:
        raise ConfigError("waf.audit.log", "empty", "use stdout, off or a file path")
    if audit.log not in ("stdout", "off"):
        folder = os.path.dirname(os.path.abspath(audit.log))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ConfigError(
                "waf.audit.log", f"cannot write in {folder}", "give a file in a writable folder"
            )
    if not (audit.rate > 0 and math.isfinite(audit.rate)):
        raise ConfigError("waf.audit.rate", "must be positive", "give records per second, e.g. 50")
    if audit.burst < 1:
        raise ConfigError("waf.audit.burst", "must be at least 1", "e.g. 200")
    if not 16 <= audit.data_limit <= 65536:
        raise ConfigError("waf.audit.data_limit", "out of range", "use 16 to 65536 bytes")
    for i, item in enumerate(audit.mask):
        name = item.lower()
        name = name[7:] if name.startswith("cookie:") else name
        if not name or not (_HEADER_NAME.match(name) or name == "*"):
            raise ConfigError(
                f"waf.audit.mask[{i}]",
                f"{item!r} is not a header name or cookie:NAME",
                "e.g. authorization or cookie:session",
            )


def _validate_ops(cfg: Config) -> None:
    """Access log, metrics listener and rate limit settings."""
    _check_choice("log.access", cfg.log.access, ("json", "common", "off"))
    _check_port("metrics.port", cfg.metrics.port)
    rl = cfg.rate_limit
    if not rl.rate > 0 or math.isinf(rl.rate):
        raise ConfigError("rate_limit.rate", f"{rl.rate} is not a rate", "give requests/s, e.g. 50")
    if rl.burst < 1:
        raise ConfigError("rate_limit.burst", f"{rl.burst} is too small", "use 1 or more")
    if rl.max_entries < 1:
        raise ConfigError("rate_limit.max_entries", "too small", "use e.g. 100000")
    for i, net in enumerate(rl.allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"rate_limit.allow[{i}]", f"{net!r} is not an IP or CIDR", "e.g. 10.0.0.0/8"
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
        ("WAF_PLUGINS_DIR", "plugins_dir"),
        ("WAF_PARANOIA_LEVEL", "paranoia_level"),
        ("WAF_ANOMALY_THRESHOLD", "anomaly_threshold"),
        ("WAF_ENGINE", "engine"),
        ("WAF_RULE_ENGINE", "rule_engine"),
        ("WAF_LIBRARY", "library"),
        ("WAF_BODY_LIMIT", "body_limit"),
        ("WAF_OVER_LIMIT", "over_limit"),
        ("WAF_EXTRA_DETECTION", "extra_detection"),
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
