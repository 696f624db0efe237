"""Reading rule matches out of ModSecurity log lines."""

from __future__ import annotations

from quicproxy.waf._matches import make_decision, parse_line

LINE = (
    'ModSecurity: Warning. detected SQLi using libinjection. [file "/usr/share/modsecurity-crs/'
    'rules/REQUEST-942-APPLICATION-ATTACK-SQLI.conf"] [line "46"] [id "942100"] [rev ""] '
    '[msg "SQL Injection Attack Detected via libinjection"] [data "Matched Data: s&1c found '
    'within ARGS:id: 1\' OR 1=1--"] [severity "2"] [ver "OWASP_CRS/3.3.4"] [maturity "0"] '
    '[accuracy "0"] [hostname "10.0.0.1"] [uri "/"] [unique_id "1795.96"] [ref "v9,11"]'
)


def test_parse_line() -> None:
    match = parse_line(LINE)
    assert match is not None
    assert match.rule_id == "942100"
    assert match.message == "SQL Injection Attack Detected via libinjection"
    assert match.severity == 2


def test_request_text_cannot_forge_id_or_lower_severity() -> None:
    forged = LINE.replace("1' OR 1=1--", '"] [id "1"] [msg "fine"] [severity "5"] [x "')
    match = parse_line(forged)
    assert match is not None
    assert match.rule_id == "942100"
    assert match.message == "SQL Injection Attack Detected via libinjection"
    assert match.severity == 2


def test_line_without_rule() -> None:
    assert parse_line("ModSecurity: Warning. something without an id") is None


def test_decision_dedupes_and_ranks_severity() -> None:
    warning = LINE.replace('"942100"', '"920350"').replace('[severity "2"]', '[severity "4"]')
    unset = LINE.replace('"942100"', '"1001"').replace('[severity "2"]', '[severity "0"]')
    decision = make_decision([warning, unset, LINE, LINE], status=403)
    assert not decision.allowed and decision.status == 403
    assert decision.rule_ids == ["942100", "920350", "1001"]  # most severe first
    assert decision.severity == "CRITICAL"
    allowed = make_decision([warning], status=None)
    assert allowed.allowed and allowed.status == 200 and allowed.severity == "WARNING"


def test_variable_and_logged_data_are_read() -> None:
    match = parse_line(LINE)
    assert match is not None
    assert match.variable == "ARGS:id"
    assert match.data == "Matched Data: s&1c found within ARGS:id: 1' OR 1=1--"
