"""The rule set the inline WAF loads, in order, built from :class:`WafConfig`.

Order: base directives (engine, body handling), the CRS setup file, our
settings (paranoia level, threshold, path exclusions), the plugins' config then
before files (``waf.plugins_dir``, CRS 4 only), the CRS request rules with our
detection rules (:data:`EXTRA_DETECTION`, unless ``waf.extra_detection`` is off)
and our score report just before the blocking evaluation (REQUEST-949), the
after-CRS exclusion files and the plugins' after files, ``extra_rules``, then
global rule removals.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from .._config import PLUGIN_SUFFIXES, WafConfig
from .._errors import ConfigError

__all__ = [
    "CrsLayout",
    "Plugins",
    "find_plugins",
    "RuleSource",
    "find_crs",
    "rule_sources",
    "base_directives",
    "settings_directives",
    "removal_directives",
    "score_directives",
    "INSTALL_HINT",
    "EXTRA_DETECTION",
]

INSTALL_HINT = (
    "apt-get install libmodsecurity3 modsecurity-crs, or disable the WAF with --waf off "
    "(WAF_ENABLED=false)"
)

EXTRA_DETECTION = os.path.join(os.path.dirname(__file__), "rules", "quicproxy-detection.conf")
"""Our rules that close CRS PL1's gaps (shipped with the package, ids 99200-99299), read
by both engines and both CRS major versions; loaded before REQUEST-949 so they score."""

DEBIAN_SETUP_DIR = "/etc/modsecurity/crs"
"Where Debian's modsecurity-crs package keeps crs-setup.conf and the exclusion files."

_VERSION = re.compile(rb"ver:'OWASP_CRS/(\d+)\.(\d+)\.(\d+)'")
_SETUP_VERSION = re.compile(rb"(?m)^[^#\n]*crs_setup_version=(\d+)")
_APP_FILE = re.compile(r"^REQUEST-903\.\d+-(\w+)-EXCLUSION-RULES\.conf$")
_APP_ENABLED = re.compile(rb"(?mi)^[^#\n]*tx\.crs_exclusions_(\w+)=1")

# Rule ids 99000-99999 sit in ModSecurity's "local use" range, away from CRS ids.
_ID_BASE = 99001
_ID_SETTINGS = 99010
_ID_SCORES = 99030
_ID_PATH_EXCLUSIONS = 99100


@dataclass
class CrsLayout:
    """Where the pieces of an OWASP CRS installation are."""

    rules_dir: str
    "Directory holding rules/."
    version: tuple[int, int, int]
    "CRS version read from the rule files."
    setup: str | None
    "crs-setup.conf(.example) used, or None for the built-in minimal setup."
    before: list[str]
    "Files loaded before the CRS rules (exclusions, plugin config)."
    rules: list[str]
    "REQUEST-*.conf rule files, in order."
    after: list[str]
    "Files loaded after the CRS rules (exclusions, plugins)."


@dataclass
class Plugins:
    """The files of the CRS 4 plugins in one directory, by kind, each sorted by name."""

    config: list[str]
    "NAME-config.conf: the plugins' settings, after the CRS setup."
    before: list[str]
    "NAME-before.conf: before the CRS rules (exclusions, early rules)."
    after: list[str]
    "NAME-after.conf: after the CRS rules."

    def __bool__(self) -> bool:
        return bool(self.config or self.before or self.after)


def find_plugins(config: WafConfig, version: tuple[int, int, int]) -> Plugins:
    """``waf.plugins_dir``'s plugins (none when unset); ConfigError on a CRS before 4,
    which has no plugin slots."""
    folder = config.plugins_dir
    if not folder:
        return Plugins([], [], [])
    if version[0] < 4:
        raise ConfigError(
            "waf.plugins_dir",
            f"CRS plugins need CRS 4, the rules are CRS {'.'.join(map(str, version))}",
            "use waf.engine coraza, or point waf.rules_dir at a CRS 4",
        )
    folder = os.path.abspath(folder)
    return Plugins(
        *(
            sorted(glob.glob(os.path.join(glob.escape(folder), "*" + kind)))
            for kind in PLUGIN_SUFFIXES
        )
    )


@dataclass
class RuleSource:
    """One piece of the rule set: a file to load or directives text."""

    name: str
    "File path, or a label for generated text."
    key: str
    "Config key to blame when it fails to load."
    text: str | None = None
    "Directives to add; None means load the file ``name``."


def _existing(*paths: str) -> list[str]:
    return [p for p in paths if os.path.isfile(p)]


def _read_version(paths: list[str]) -> tuple[int, int, int] | None:
    for path in paths:
        try:
            with open(path, "rb") as fh:
                match = _VERSION.search(fh.read())
        except OSError:
            continue
        if match:
            major, minor, patch = (int(g) for g in match.groups())
            return major, minor, patch
    return None


def _find_setup(rules_dir: str, version: tuple[int, int, int]) -> str | None:
    own = _existing(
        os.path.join(rules_dir, "crs-setup.conf"),
        os.path.join(rules_dir, "crs-setup.conf.example"),
    )
    if own:
        return own[0]
    # Debian layout: rules under /usr/share, setup under /etc; use it if it is
    # written for the same major CRS version.
    debian = os.path.join(DEBIAN_SETUP_DIR, "crs-setup.conf")
    try:
        with open(debian, "rb") as fh:
            match = _SETUP_VERSION.search(fh.read())
    except OSError:
        return None
    if match and match.group(1).decode().startswith(str(version[0])):
        return debian
    return None


def _without_disabled_apps(rules: list[str], settings: list[str]) -> list[str]:
    """Drop CRS 3 application exclusion packages (Drupal, WordPress...) not enabled
    in the setup: they would only skip themselves, at a cost on every request."""
    enabled: set[str] = set()
    for path in settings:
        try:
            with open(path, "rb") as fh:
                enabled.update(m.decode().lower() for m in _APP_ENABLED.findall(fh.read()))
        except OSError:
            continue
    kept = []
    for path in rules:
        app = _APP_FILE.match(os.path.basename(path))
        if app is None or app.group(1).lower() in enabled:
            kept.append(path)
    return kept


def find_crs(rules_dir: str) -> CrsLayout:
    """Locate the CRS under ``rules_dir``; ConfigError with the install hint if absent."""
    rules = sorted(glob.glob(os.path.join(rules_dir, "rules", "REQUEST-*.conf")))
    if not rules:
        raise ConfigError(
            "waf.rules_dir",
            f"no OWASP CRS rules in {rules_dir}/rules",
            f"{INSTALL_HINT}, or point waf.rules_dir (WAF_RULES_DIR) at a CRS checkout",
        )
    version = _read_version(rules) or (3, 3, 0)
    setup = _find_setup(rules_dir, version)
    setup_dir = os.path.dirname(setup) if setup else rules_dir
    before: list[str] = []
    after: list[str] = []
    if setup_dir != rules_dir:
        # Debian keeps the user-edited exclusion files next to crs-setup.conf.
        before += _existing(os.path.join(setup_dir, "REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf"))
        after += _existing(os.path.join(setup_dir, "RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf"))
    after += sorted(glob.glob(os.path.join(rules_dir, "rules", "RESPONSE-999-*.conf")))
    rules = _without_disabled_apps(rules, ([setup] if setup else []) + before)
    plugins = os.path.join(rules_dir, "plugins")
    before += sorted(glob.glob(os.path.join(plugins, "*-config.conf")))
    before += sorted(glob.glob(os.path.join(plugins, "*-before.conf")))
    after += sorted(glob.glob(os.path.join(plugins, "*-after.conf")))
    return CrsLayout(rules_dir, version, setup, before, rules, after)


def base_directives(config: WafConfig) -> str:
    """Engine switches and request body handling (what modsecurity.conf would hold)."""
    limit = max(1, config.body_limit)
    lines = [
        f"SecRuleEngine {config.rule_engine}",
        # Off would also skip phase 2, where the CRS decides; with body_access
        # false the engine simply feeds no body.
        "SecRequestBodyAccess On",
        f"SecRequestBodyLimit {limit}",
        f"SecRequestBodyNoFilesLimit {limit}",
        # The proxy feeds at most body_limit bytes; a longer body is inspected in part.
        "SecRequestBodyLimitAction ProcessPartial",
        "SecResponseBodyAccess Off",
        "SecAuditEngine Off",
        "SecArgumentSeparator &",
        f'SecRule REQUEST_HEADERS:Content-Type "@rx ^(?:application(?:/soap\\+|/)|text/)xml" '
        f'"id:{_ID_BASE},phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"',
        f'SecRule REQUEST_HEADERS:Content-Type "@rx ^application/(?:[a-z0-9.-]+\\+)?json" '
        f'"id:{_ID_BASE + 1},phase:1,t:none,t:lowercase,pass,nolog,'
        f'ctl:requestBodyProcessor=JSON"',
        # gRPC (application/grpc, +proto, +json): a known content type (CRS 920420 would
        # refuse it); headers and metadata are inspected, the length-prefixed protobuf
        # body is not (the proxy feeds none: ctl:requestBodyAccess=Off would also skip
        # phase 2 in libmodsecurity, where the CRS decides).
        f'SecRule REQUEST_HEADERS:Content-Type "@rx ^application/grpc(?:[+;]|$)" '
        f'"id:{_ID_BASE + 5},phase:1,t:none,t:lowercase,pass,nolog,ctl:ruleRemoveById=920420"',
    ]
    if config.body_access:
        # A body that fails to parse is refused, unless it was cut at the limit
        # (then only a prefix was fed and the parse error is expected).
        # MULTIPART_UNMATCHED_BOUNDARY is 2 for well-formed bodies in 3.0.x; 1 is the finding.
        for offset, (check, message) in enumerate(
            (
                ('REQBODY_ERROR "!@eq 0"', "Failed to parse request body"),
                ('MULTIPART_STRICT_ERROR "!@eq 0"', "Multipart body failed strict validation"),
                (
                    'MULTIPART_UNMATCHED_BOUNDARY "@eq 1"',
                    "Multipart body has an unmatched boundary",
                ),
            ),
            start=2,
        ):
            lines.append(
                f'SecRule {check} "id:{_ID_BASE + offset},phase:2,t:none,log,deny,'
                f"status:400,msg:'{message}',logdata:'%{{reqbody_error_msg}}',"
                f"severity:'CRITICAL',chain\""
            )
            lines.append(f'    SecRule REQUEST_BODY_LENGTH "@lt {limit}" "t:none"')
    return "\n".join(lines) + "\n"


def minimal_setup(version: tuple[int, int, int]) -> str:
    """What crs-setup.conf must hold at least, for when none is installed."""
    return (
        'SecDefaultAction "phase:1,log,auditlog,pass"\n'
        'SecDefaultAction "phase:2,log,auditlog,pass"\n'
        f'SecAction "id:{_ID_BASE + 8},phase:1,nolog,pass,t:none,'
        f'setvar:tx.crs_setup_version={version[0]}{version[1]}{version[2]}"\n'
    )


def settings_directives(config: WafConfig, version: tuple[int, int, int]) -> str:
    """CRS settings (crs-setup ``tx.*`` variables) and per-path exclusions, set after the
    setup file and before the CRS rules, whose defaults only fill in what is unset."""
    v4 = version[0] >= 4
    level_var = "tx.blocking_paranoia_level" if v4 else "tx.paranoia_level"
    detection_var = "tx.detection_paranoia_level" if v4 else "tx.executing_paranoia_level"
    detection = config.detection_paranoia_level or config.paranoia_level
    values = [
        f"{level_var}={config.paranoia_level}",
        f"{detection_var}={max(detection, config.paranoia_level)}",
        f"tx.inbound_anomaly_score_threshold={config.anomaly_threshold}",
        f"tx.outbound_anomaly_score_threshold={config.outbound_anomaly_threshold}",
        f"tx.allowed_methods={' '.join(config.allowed_methods)}",
    ]
    if v4:
        values.append(f"tx.early_blocking={int(config.early_blocking)}")
    if config.allowed_content_types:
        types = " ".join(f"|{t.lower()}|" for t in config.allowed_content_types)
        values.append(f"tx.allowed_request_content_type={types}")
    setvars = ",".join(f"setvar:'{v}'" for v in values)
    lines = [f'SecAction "id:{_ID_SETTINGS},phase:1,pass,nolog,t:none,{setvars}"']
    for i, exclusion in enumerate(config.exclusions):
        key = f"waf.exclusions[{i}]"
        if exclusion.rule_id <= 0 and exclusion.tag is None:
            raise ConfigError(key + ".rule_id", "missing or not positive", "give a rule id")
        exclusion.check(key)
        prefix = exclusion.path_prefix
        if prefix is None and exclusion.target is None and exclusion.tag is None:
            continue  # removed from the rule set (removal_directives)
        if exclusion.tag is not None:
            what = f"ruleRemoveByTag={exclusion.tag}"
            if exclusion.target is not None:
                what = f"ruleRemoveTargetByTag={exclusion.tag};{exclusion.target}"
        elif exclusion.target is not None:
            what = f"ruleRemoveTargetById={exclusion.rule_id};{exclusion.target}"
        else:
            what = f"ruleRemoveById={exclusion.rule_id}"
        rule_id = _ID_PATH_EXCLUSIONS + i
        if prefix is None:
            lines.append(f'SecAction "id:{rule_id},phase:1,pass,nolog,t:none,ctl:{what}"')
        else:
            lines.append(
                f'SecRule REQUEST_FILENAME "@beginsWith {prefix}" '
                f'"id:{rule_id},phase:1,t:none,t:normalizePath,pass,nolog,ctl:{what}"'
            )
    return "\n".join(lines) + "\n"


def score_directives(version: tuple[int, int, int]) -> str:
    """Two rules placed before the CRS blocking evaluation (REQUEST-949): when any
    inbound anomaly score is set, rule 99031 logs the score of each paranoia level
    1-4 in its message (the audit log's scores; :func:`._matches.decide` reads it).
    Rules above the detection paranoia level do not run, so their level scores 0."""
    var = "tx.inbound_anomaly_score_pl" if version[0] >= 4 else "tx.anomaly_score_pl"
    levels = [f"%{{{var}{n}}}" for n in range(1, 5)]
    total = ",".join(f"setvar:'tx.qp_score_total=+{level}'" for level in levels)
    return (
        f'SecAction "id:{_ID_SCORES},phase:2,pass,nolog,t:none,'
        f"setvar:'tx.qp_score_total=0',{total}\"\n"
        f'SecRule TX:QP_SCORE_TOTAL "@gt 0" "id:{_ID_SCORES + 1},phase:2,pass,log,t:none,'
        f"msg:'quicproxy anomaly scores {' '.join(levels)}'\"\n"
    )


def removal_directives(config: WafConfig) -> str:
    ids = [
        str(e.rule_id)
        for e in config.exclusions
        if e.path_prefix is None and e.target is None and e.tag is None
    ]
    return "".join(f"SecRuleRemoveById {rule_id}\n" for rule_id in ids)


def rule_sources(config: WafConfig, layout: CrsLayout) -> list[RuleSource]:
    """Everything to load, in order."""
    sources = [RuleSource("base directives", "waf", base_directives(config))]
    if layout.setup:
        sources.append(RuleSource(layout.setup, "waf.rules_dir"))
    else:
        sources.append(RuleSource("built-in CRS setup", "waf", minimal_setup(layout.version)))
    sources.append(
        RuleSource("WAF settings", "waf.exclusions", settings_directives(config, layout.version))
    )
    scores: RuleSource | None = RuleSource(
        "anomaly score report", "waf", score_directives(layout.version)
    )
    plugins = find_plugins(config, layout.version)
    for path in layout.before:
        sources.append(RuleSource(path, "waf.rules_dir"))
    for path in plugins.config + plugins.before:
        sources.append(RuleSource(path, "waf.plugins_dir"))
    for path in layout.rules + layout.after:
        if scores is not None and os.path.basename(path).startswith("REQUEST-949"):
            if config.extra_detection:
                sources.append(RuleSource(EXTRA_DETECTION, "waf.extra_detection"))
            sources.append(scores)
            scores = None
        sources.append(RuleSource(path, "waf.rules_dir"))
    if scores is not None:
        sources.append(scores)
    for path in plugins.after:
        sources.append(RuleSource(path, "waf.plugins_dir"))
    for i, path in enumerate(config.extra_rules):
        sources.append(RuleSource(path, f"waf.extra_rules[{i}]"))
    removals = removal_directives(config)
    if removals:
        sources.append(RuleSource("rule removals", "waf.exclusions", removals))
    return sources
