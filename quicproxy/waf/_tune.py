"""``quicproxy waf tune``: exclusions proposed from the audit log of a detection period.

The operator runs benign traffic only with the WAF detecting (``mode: detect`` or
``detection_paranoia_level``); every rule that scored a request the policy refused, or
would have, is then a false positive. :func:`propose` groups those findings by route,
rule id, matched variable and path, and proposes the narrowest exclusion for each group:
the rule for that one variable (``target``, ``ctl:ruleRemoveTargetById``) under the
longest path prefix the requests shared (cut at a segment), and the whole rule for that
path only when its variable cannot be named (``REQUEST_URI``, ``REQUEST_BODY``...).
Never a tag, never the anomaly-score and verdict rules (949xxx, 959xxx, 980xxx: they
pass once the rules that scored are excluded) nor the proxy's own rules (99000-99199;
its detection rules, 992xx, are proposed like CRS's).
:func:`render` writes the proposals as YAML keyed by where each list goes
(``waf.exclusions`` or ``routes[I].waf.exclusions``), one comment per entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._config import Config, WafExclusion
from .._errors import ConfigError
from ._policy import route_name

__all__ = [
    "Finding",
    "Proposal",
    "TuneReport",
    "propose",
    "read_records",
    "render",
    "VERDICT_RULES",
]

VERDICT_RULES = re.compile(r"^(?:949|959|980)\d{3}$")
"Anomaly-score and blocking-evaluation rules: never excluded (they follow the others)."
_OWN_RULES = re.compile(r"^99[01]\d{2}$")
"""The proxy's own rules (99000-99199: body parse errors, score report): never excluded.
Its detection rules (99200-99299, ``waf.extra_detection``) are proposed like CRS's."""
_TARGETS = re.compile(
    r"^(ARGS|ARGS_GET|ARGS_POST|ARGS_NAMES|REQUEST_HEADERS|REQUEST_COOKIES):(.+)$", re.I
)
_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]$@]{1,256}$")
_WITHIN = re.compile(r" found within [^\s]*?: (.*)$", re.S)
_UNSAFE = re.compile(r"[\"'\\\s%?#;\x00-\x1f\x7f]")
_EXAMPLE = 60
"Characters of an example value shown in a comment."


@dataclass
class Finding:
    """One rule that fired on one refused request."""

    route: str
    "The route's pool name from the record (``*/api``, ``default``)."
    rule_id: str
    message: str
    variable: str
    path: str
    value: str


@dataclass
class Proposal:
    """One exclusion and the findings it would have let through."""

    route: str
    exclusion: WafExclusion
    message: str
    count: int
    example: str
    paths: set[str] = field(default_factory=set)


@dataclass
class TuneReport:
    """What :func:`propose` read and what it proposes."""

    records: int = 0
    "Audit records read."
    refused: int = 0
    "Of them, refused or would have been (at the blocking or the detection level)."
    unreadable: int = 0
    "Lines that were not audit records."
    proposals: list[Proposal] = field(default_factory=list)
    refused_rules: dict[str, tuple[str, int]] = field(default_factory=dict)
    "Rule id -> (message, count) of the verdict rules never proposed."
    below_min: int = 0
    "Groups seen fewer than --min-count times (not proposed)."
    unscored: int = 0
    "Refused records that named no rule but verdict rules (rules omitted or cut)."
    cut: int = 0
    "Refused records whose rules were not all listed (``rules_omitted``)."


def read_records(lines: Iterable[str], report: TuneReport) -> list[dict[str, object]]:
    """The audit records among ``lines`` (JSON objects with ``rules``); others counted."""
    records = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            report.unreadable += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("rules"), list):
            report.unreadable += 1
            continue
        records.append(record)
    report.records += len(records)
    return records


def _refused(record: dict[str, object]) -> bool:
    return bool(
        record.get("verdict") == "block"
        or record.get("would_refuse")
        or record.get("would_refuse_at_detection_level")
    )


def _target(variable: str) -> str | None:
    """The exclusion target naming ``variable``, or None when it names no field."""
    found = _TARGETS.match(variable)
    if found is None or not _NAME.match(found.group(2)):
        return None
    return f"{found.group(1).upper()}:{found.group(2)}"  # the collection the rule read


def _value(data: str) -> str:
    found = _WITHIN.search(data)
    return found.group(1) if found else data


def findings(records: list[dict[str, object]], report: TuneReport) -> list[Finding]:
    """Every rule that fired on a refused record (verdict rules set aside in ``report``)."""
    out: list[Finding] = []
    for record in records:
        if not _refused(record):
            continue
        report.refused += 1
        if record.get("rules_omitted"):
            report.cut += 1
        route = str(record.get("route") or "default")
        path = str(record.get("path") or "/").split("?", 1)[0] or "/"
        named = 0
        for rule in record.get("rules") or []:  # type: ignore[attr-defined]
            if not isinstance(rule, dict):
                continue
            rule_id = str(rule.get("id", ""))
            message = str(rule.get("message") or "")
            if VERDICT_RULES.match(rule_id) or _OWN_RULES.match(rule_id):
                seen = report.refused_rules.get(rule_id, (message, 0))
                report.refused_rules[rule_id] = (seen[0] or message, seen[1] + 1)
                continue
            named += 1
            out.append(
                Finding(
                    route,
                    rule_id,
                    message,
                    str(rule.get("variable") or ""),
                    path,
                    _value(str(rule.get("data") or "")),
                )
            )
        if not named:
            report.unscored += 1
    return out


def common_prefix(paths: Iterable[str]) -> str | None:
    """The longest path prefix ``paths`` share, cut at a segment and before a segment
    holding anything a path prefix may not (quotes, spaces, ``%``); None when that is
    ``/`` (no narrowing)."""
    split = []
    for path in paths:
        bad = _UNSAFE.search(path)
        if bad:
            path = path[: path.rfind("/", 0, bad.start()) + 1]
        split.append(path.split("/")[1:] if path.startswith("/") else [])
    if not split:
        return None
    shared: list[str] = []
    for parts in zip(*split, strict=False):
        if any(part != parts[0] for part in parts):
            break
        shared.append(parts[0])
    prefix = "/" + "/".join(shared)
    return None if prefix == "/" else prefix


def _segment(path: str) -> str:
    return "/" + path.lstrip("/").split("/", 1)[0]


def propose(lines: Iterable[str], config: Config | None = None, min_count: int = 1) -> TuneReport:
    """Read audit lines; the narrowest exclusions that let every refused request pass."""
    report = TuneReport()
    found = findings(read_records(lines, report), report)
    existing = _existing(config)
    groups: dict[tuple[str, str, str, str | None, str], list[Finding]] = {}
    for item in found:
        target = _target(item.variable)
        # a header or cookie is a property of the site; an argument or a path is not:
        # group those by their first path segment so one prefix never spans the site
        where = "" if target and not target.startswith("ARGS") else _segment(item.path)
        groups.setdefault((item.route, item.rule_id, item.variable, target, where), []).append(item)
    for (route, rule_id, _variable, target, _where), items in groups.items():
        if len(items) < min_count:
            report.below_min += 1
            continue
        exclusion = WafExclusion(
            rule_id=int(rule_id) if rule_id.isdigit() else 0,
            path_prefix=common_prefix(i.path for i in items),
            target=target,
        )
        if exclusion.rule_id <= 0:
            continue
        try:
            exclusion.check("proposal")
        except ConfigError:
            exclusion.path_prefix = None if target else exclusion.path_prefix
            exclusion.check("proposal")
        if (route, _key(exclusion)) in existing:
            continue
        example = next((i.value for i in items if i.value), "")
        report.proposals.append(
            Proposal(
                route,
                exclusion,
                items[0].message,
                len(items),
                example,
                {i.path for i in items},
            )
        )
    report.proposals.sort(key=lambda p: (p.route, -p.count, p.exclusion.rule_id))
    return report


def _key(exclusion: WafExclusion) -> tuple[int, str | None, str | None]:
    target = exclusion.target.lower() if exclusion.target else None
    return exclusion.rule_id, exclusion.path_prefix, target


def _existing(config: Config | None) -> set[tuple[str, tuple[int, str | None, str | None]]]:
    """The exclusions ``config`` already has, per route name (global: every route)."""
    if config is None:
        return set()
    found: set[tuple[str, tuple[int, str | None, str | None]]] = set()
    names = ["default", "demo"] + [route_name(r) for r in config.routes]
    for exclusion in config.waf.exclusions:
        found.update((name, _key(exclusion)) for name in names)
    for route in config.routes:
        for exclusion in route.waf.exclusions if route.waf else []:
            found.add((route_name(route), _key(exclusion)))
    return found


def _where(route: str, config: Config | None) -> tuple[str, str]:
    """(YAML key the list goes under, comment naming the route)."""
    if route in ("default", "demo"):
        return "waf.exclusions", "the default route (no routes[] matched)"
    if config is not None:
        for i, item in enumerate(config.routes):
            if route_name(item) == route:
                host = item.host or "any host"
                return (
                    f"routes[{i}].waf.exclusions",
                    f"route {i}: {host}, path_prefix {item.path_prefix}",
                )
    host, _, prefix = route.partition("/")
    return (
        f"routes[{route}].waf.exclusions",
        f"the route with host {host if host != '*' else 'any'} and path_prefix /{prefix} "
        "(give --config to name its index)",
    )


def _comment(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= _EXAMPLE else text[:_EXAMPLE] + "..."


def _scalar(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML flow scalar


def render(report: TuneReport, source: str, config: Config | None = None) -> str:
    """The proposals as YAML with a comment per entry and a header saying what they assume."""
    out = [
        f"# quicproxy waf tune {source}",
        f"# {report.records} audit records read, {report.refused} refused or would have been"
        + (f", {report.unreadable} lines skipped (not audit records)" if report.unreadable else ""),
        "# ASSUMPTION: the audit period saw benign traffic only (the WAF in detect mode, or a",
        "# detection paranoia level). Every rule that fired is taken for a false positive:",
        "# review each entry, then paste each list under the key it is written under.",
    ]
    for rule_id, (message, count) in sorted(report.refused_rules.items()):
        why = (
            "the anomaly-score / blocking evaluation"
            if VERDICT_RULES.match(rule_id)
            else "the proxy's own"
        )
        out.append(
            f"# not proposed: rule {rule_id} ({_comment(message) or 'no message'}, "
            f"{count} requests) is {why} rule; excluding it would switch off the WAF's "
            "verdict; it passes once the rules below are excluded"
        )
    if report.below_min:
        out.append(f"# {report.below_min} findings seen fewer times than --min-count: left out")
    if report.unscored:
        out.append(
            f"# {report.unscored} refused requests named no rule but the verdict rules "
            "(rules_omitted): raise nothing here, look at them by hand"
        )
    if report.cut:
        out.append(
            f"# {report.cut} refused requests listed only their first rules (rules_omitted): "
            "run waf test, and tune again on a new detection period"
        )
    if not report.proposals:
        out.append("# nothing to propose")
        return "\n".join(out) + "\n"
    by_route: dict[str, list[Proposal]] = {}
    for proposal in report.proposals:
        by_route.setdefault(proposal.route, []).append(proposal)
    for route, proposals in by_route.items():
        key, about = _where(route, config)
        out.append("")
        out.append(f"# {about}")
        out.append(f"{key}:")
        for p in proposals:
            ex = p.exclusion
            what = "on " + ex.target if ex.target else "whole rule (its variable has no name)"
            out.append(
                f"  # {ex.rule_id} {_comment(p.message)} - {p.count} requests, {what}"
                + (f", e.g. {_comment(_scalar(p.example))}" if p.example else "")
            )
            parts = [f"rule_id: {ex.rule_id}"]
            if ex.path_prefix:
                parts.append(f"path_prefix: {_scalar(ex.path_prefix)}")
            if ex.target:
                parts.append(f"target: {_scalar(ex.target)}")
            out.append("  - {" + ", ".join(parts) + "}")
    return "\n".join(out) + "\n"
