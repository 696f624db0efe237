"""Turn ModSecurity log lines into a :class:`WafDecision`.

A line looks like ``ModSecurity: Warning. ... [id "942100"] [rev ""] [msg "SQL
Injection Attack Detected via libinjection"] [data "..."] [severity "2"] ...``.
``id`` and ``msg`` come before ``data`` (which quotes the request, unescaped),
so their first occurrence is trusted. ``severity`` comes after ``data``; taking
the most severe value on the line means request text can only raise, never
hide, the reported severity. ModSecurity 3 prints ``[severity "0"]`` for rules
that set none, so 0 (EMERGENCY, which the CRS never uses) counts as "not given".
The matched variable is read from the CRS logdata (``found within VAR: ``) or the
operator text (``against variable `VAR'``); request text can only shorten it.

Both engines report the anomaly scores per paranoia level through our rule
:data:`SCORE_RULE` (see :func:`._rules.score_directives`): :func:`decide` takes
its numbers out of the matches.
"""

from __future__ import annotations

import re

from ._types import RuleMatch, WafDecision

__all__ = ["Match", "SEVERITIES", "SCORE_RULE", "parse_line", "make_decision", "decide"]

SCORE_RULE = "99031"
"Our rule whose message carries the inbound anomaly score of each paranoia level."

Match = RuleMatch

SEVERITIES = ("EMERGENCY", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
"ModSecurity severity names by number (0 is the most severe)."

_ID = re.compile(r'\[id "(\d+)"\]')
_MSG = re.compile(r'\[msg "(.*?)"\] \[(?:data|severity|ver|tag|hostname|maturity)')
_SEVERITY = re.compile(r'\[severity "([1-7])"\]')
_DATA = re.compile(r'\[data "(.*?)"\] \[severity "')
_AGAINST = re.compile(r"against variable `(.*?)' \(Value: `")
_WITHIN = re.compile(r" found within ([^\s]*?): ")
_SCORES = re.compile(r"scores (\d+) (\d+) (\d+) (\d+)$")


def parse_line(line: str) -> Match | None:
    """The rule a log line reports, or None when it names no rule."""
    found = _ID.search(line)
    if not found:
        return None
    msg = _MSG.search(line, found.end())
    levels = [int(m) for m in _SEVERITY.findall(line, found.end())]
    data = _DATA.search(line, found.end())
    logdata = data.group(1) if data else ""
    within = _WITHIN.search(logdata)
    against = _AGAINST.search(line, 0, found.start())
    variable = within.group(1) if within else against.group(1) if against else ""
    return Match(
        found.group(1),
        msg.group(1) if msg else "",
        min(levels) if levels else None,
        variable,
        logdata,
    )


def make_decision(lines: list[str], status: int | None) -> WafDecision:
    """Decision from the ModSecurity log lines of one transaction; ``status`` set when blocked."""
    return decide([m for m in map(parse_line, lines) if m is not None], status)


def decide(matches: list[Match], status: int | None) -> WafDecision:
    """Decision from the rules that matched, in match order; ``status`` set when blocked.

    Rules are listed most severe first, in match order among equals, so the
    first one is the attack that mattered (the CRS verdict rule 949110 comes last
    among the critical ones because it runs last).
    """
    found: dict[str, Match] = {}
    scores: list[int] | None = None
    for match in matches:
        if match.rule_id == SCORE_RULE:
            numbers = _SCORES.search(match.message)
            if numbers:
                scores = [int(n) for n in numbers.groups()]
        elif match.rule_id not in found:
            found[match.rule_id] = match
    ordered = sorted(found.values(), key=lambda m: 8 if m.severity is None else m.severity)
    levels = [m.severity for m in ordered if m.severity is not None]
    return WafDecision(
        allowed=status is None,
        status=200 if status is None else status,
        rule_ids=[m.rule_id for m in ordered],
        messages=[m.message for m in ordered],
        severity=SEVERITIES[min(levels)] if levels else None,
        matches=ordered,
        scores=scores if scores is not None else ([0, 0, 0, 0] if status is None else None),
    )
