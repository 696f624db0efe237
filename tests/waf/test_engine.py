"""Inline engines: Coraza with CRS 4 and libmodsecurity with the Debian CRS, for real."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from quicproxy._config import WafExclusion
from quicproxy.waf import InlineWaf, WafDecision

from .corpus import FORM, JSON, _multipart
from .helpers import evaluate, make_request


def assert_blocked(decision: WafDecision, *rule_ids: str) -> None:
    assert not decision.allowed, decision
    assert decision.status == 403
    assert "949110" in decision.rule_ids  # the CRS anomaly score decided
    for rule_id in rule_ids:
        assert rule_id in decision.rule_ids, decision
    assert decision.severity == "CRITICAL"
    assert len(decision.messages) == len(decision.rule_ids)


def by_crs(waf: Any, crs3: str, crs4: str) -> str:
    """The rule id that reports an attack under the engine's CRS major version."""
    return crs4 if waf.engine.crs_version[0] >= 4 else crs3


def assert_clean(decision: WafDecision) -> None:
    assert decision.allowed, decision
    assert decision.status == 200
    assert decision.rule_ids == []
    assert decision.severity is None


# -- attacks by kind and place ------------------------------------------------------------


async def test_sqli_in_query(waf: InlineWaf) -> None:
    decision = await evaluate(waf, "GET", "/products?id=1%27%20OR%20%271%27=%271")
    assert_blocked(decision, "942100")
    assert decision.messages[0] == "SQL Injection Attack Detected via libinjection"


async def test_xss_in_urlencoded_form(waf: InlineWaf) -> None:
    body = b"name=bob&comment=%3Cscript%3Ealert(document.cookie)%3C%2Fscript%3E"
    assert_blocked(await evaluate(waf, "POST", "/comment", FORM, body), "941100")


async def test_sqli_in_json_body(waf: InlineWaf) -> None:
    body = json.dumps({"user": {"id": "1 UNION SELECT password FROM users--"}}).encode()
    assert_blocked(await evaluate(waf, "POST", "/api/users", JSON, body), "942100")


async def test_json_body_goes_through_the_json_processor(make_waf: Any, tmp_path: Any) -> None:
    # ARGS:json.user.name only exists when ModSecurity parsed the body as JSON.
    rules = tmp_path / "json.conf"
    rules.write_text('SecRule ARGS:json.user.name "@streq mallory" "id:12347,phase:2,deny,log"\n')
    waf = make_waf(extra_rules=[str(rules)])
    body = json.dumps({"user": {"name": "mallory"}}).encode()
    decision = await evaluate(waf, "POST", "/api", JSON, body, chunk=7)
    assert not decision.allowed
    assert decision.rule_ids == ["12347"]
    plain = await evaluate(waf, "POST", "/api", FORM, body)
    assert plain.allowed


async def test_path_traversal(waf: InlineWaf) -> None:
    assert_blocked(await evaluate(waf, "GET", "/download?file=../../../../etc/passwd"), "930100")


async def test_command_injection(waf: InlineWaf) -> None:
    decision = await evaluate(waf, "GET", "/ping?host=127.0.0.1;cat%20/etc/passwd")
    assert_blocked(decision, by_crs(waf, "932100", "932160"))


@pytest.mark.parametrize(
    "agent",
    ["sqlmap/1.7.2#stable (https://sqlmap.org)", "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None)"],
)
async def test_scanner_user_agents(waf: InlineWaf, agent: str) -> None:
    assert_blocked(await evaluate(waf, "GET", "/", [("user-agent", agent)]), "913100")


async def test_sqli_in_header_and_cookie(waf: InlineWaf) -> None:
    referer = [("referer", "http://x/?id=1' UNION SELECT 1,2,3--")]
    assert_blocked(await evaluate(waf, "GET", "/", referer), "942100")
    cookie = [("cookie", "session=abc; uid=1' OR '1'='1")]
    assert_blocked(await evaluate(waf, "GET", "/account", cookie), "942100")


async def test_response_splitting_and_smuggling(waf: InlineWaf) -> None:
    assert_blocked(await evaluate(waf, "GET", "/?x=%0d%0aSet-Cookie:%20evil=1"), "921120")
    body = b"a=x%0d%0a%0d%0aGET%20/admin%20HTTP/1.1%0d%0aHost:%20x"
    assert_blocked(await evaluate(waf, "POST", "/form", FORM, body), "921110")
    both = [("content-length", "5"), ("transfer-encoding", "chunked")]
    assert_blocked(await evaluate(waf, "GET", "/", both), "920171")


async def test_php_file_upload(waf: InlineWaf) -> None:
    ctype, body = _multipart("shell.php", b"<?php system($_GET['c']); ?>")
    assert_blocked(
        await evaluate(waf, "POST", "/upload", [("content-type", ctype)], body), "933110"
    )


# -- ordinary traffic ---------------------------------------------------------------------


async def test_browsing_passes(waf: InlineWaf) -> None:
    assert_clean(await evaluate(waf, "GET", "/"))
    assert_clean(await evaluate(waf, "GET", "/products?category=shoes&size=42&sort=price_asc"))
    assert_clean(await evaluate(waf, "GET", "/search?q=men%27s+jacket"))


async def test_form_post_passes(waf: InlineWaf) -> None:
    body = b"username=jane.doe%40example.com&password=Tr0ub4dor%263&remember=on"
    assert_clean(await evaluate(waf, "POST", "/login", FORM, body))


async def test_json_api_passes(waf: InlineWaf) -> None:
    body = json.dumps({"items": [{"sku": "SHOE-42", "qty": 2}], "note": "ring twice"}).encode()
    assert_clean(await evaluate(waf, "POST", "/api/v1/orders", JSON, body))
    assert_clean(await evaluate(waf, "PUT", "/api/v1/users/1", JSON, b'{"name": "Jane"}'))
    assert_clean(await evaluate(waf, "DELETE", "/api/v1/sessions/1", [("accept", "*/*")]))


async def test_multipart_upload_passes(waf: InlineWaf) -> None:
    ctype, body = _multipart("beach.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 64)
    assert_clean(await evaluate(waf, "POST", "/upload", [("content-type", ctype)], body))


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/3"])
async def test_h2_h3_requests(waf: InlineWaf, protocol: str) -> None:
    # No Content-Length on a body is normal for HTTP/2 and HTTP/3.
    body = b'{"query": "running shoes"}'
    assert_clean(await evaluate(waf, "POST", "/api/search", JSON, body, protocol=protocol))
    attack = await evaluate(waf, "GET", "/?q=%3Cscript%3Ealert(1)%3C/script%3E", protocol=protocol)
    assert_blocked(attack, "941100")


async def test_malformed_json_body_refused(waf: InlineWaf) -> None:
    decision = await evaluate(waf, "POST", "/api", JSON, b'{"q": "unterminated')
    assert not decision.allowed
    assert decision.status == 400
    assert decision.rule_ids == ["99003"]


async def test_body_cut_at_limit_is_not_a_parse_error(make_waf: Any) -> None:
    waf = make_waf(body_limit=64, over_limit="inspect-prefix")
    body = json.dumps({"text": "a long and harmless note " * 20}).encode()
    prefix = body[:64]  # the proxy feeds only body_limit bytes
    headers = JSON + [("content-length", str(len(body)))]
    decision = await evaluate(waf, "POST", "/api", headers, prefix)
    assert decision.allowed, decision
    short = await evaluate(waf, "POST", "/api", JSON, b'{"text": "cut')
    assert short.status == 400


# -- settings -----------------------------------------------------------------------------


async def test_detection_only_reports_without_blocking(make_waf: Any) -> None:
    waf = make_waf(rule_engine="DetectionOnly")
    decision = await evaluate(waf, "GET", "/?id=1%27%20OR%20%271%27=%271")
    assert decision.allowed
    assert decision.status == 200
    assert "942100" in decision.rule_ids
    assert decision.severity == "CRITICAL"


async def test_exclusion_by_id(make_waf: Any) -> None:
    waf = make_waf(exclusions=[WafExclusion(rule_id=913100)])
    decision = await evaluate(waf, "GET", "/", [("user-agent", "sqlmap/1.7")])
    assert_clean(decision)
    # Other rules still apply.
    assert_blocked(await evaluate(waf, "GET", "/?id=1%27%20OR%20%271%27=%271"), "942100")


async def test_exclusion_by_path(make_waf: Any) -> None:
    # Raw CRS: our detection rules also see this SQLi (exclude them too, or by tag).
    waf = make_waf(
        exclusions=[WafExclusion(rule_id=942100, path_prefix="/api/sql")], extra_detection=False
    )
    attack = "?q=1%27%20OR%20%271%27=%271"
    assert_clean(await evaluate(waf, "GET", "/api/sql/run" + attack))
    assert_blocked(await evaluate(waf, "GET", "/api/other" + attack), "942100")
    # A traversal out of the excluded prefix does not keep the exclusion.
    assert_blocked(await evaluate(waf, "GET", "/api/sql/../../admin" + attack), "942100")


async def test_paranoia_level_catches_more(make_waf: Any) -> None:
    uri = "/?q=select%20name%20from%20list"
    pl1, pl2 = make_waf(paranoia_level=1), make_waf(paranoia_level=2)
    assert_clean(await evaluate(pl1, "GET", uri))
    assert_blocked(await evaluate(pl2, "GET", uri), "942260")


async def test_anomaly_threshold(make_waf: Any) -> None:
    agent = [("user-agent", "sqlmap/1.7")]  # one critical match: score 5
    strict, lenient = make_waf(anomaly_threshold=5), make_waf(anomaly_threshold=10)
    assert_blocked(await evaluate(strict, "GET", "/", agent), "913100")
    relaxed = await evaluate(lenient, "GET", "/", agent)
    assert relaxed.allowed
    assert relaxed.rule_ids == ["913100"]


async def test_extra_rules(make_waf: Any, tmp_path: Any) -> None:
    rules = tmp_path / "local.conf"
    rules.write_text(
        'SecRule REQUEST_HEADERS:X-Debug "@streq on" '
        "\"id:12345,phase:1,deny,status:451,log,msg:'debug header refused',severity:'ERROR'\"\n"
    )
    waf = make_waf(extra_rules=[str(rules)])
    decision = await evaluate(waf, "GET", "/", [("x-debug", "on")])
    assert not decision.allowed
    assert decision.status == 451
    assert decision.rule_ids == ["12345"]
    assert decision.messages == ["debug header refused"]
    assert decision.severity == "ERROR"


async def test_headers_phase_can_block(make_waf: Any, tmp_path: Any) -> None:
    rules = tmp_path / "early.conf"
    rules.write_text('SecRule REQUEST_URI "@beginsWith /admin" "id:12346,phase:1,deny,log"\n')
    waf = make_waf(extra_rules=[str(rules)])
    tx = waf.transaction(make_request("GET", "/admin/users"))
    try:
        decision = await tx.headers()
    finally:
        await tx.close()
    assert decision is not None and not decision.allowed
    assert decision.rule_ids == ["12346"]


async def test_concurrent_transactions_keep_their_own_matches(waf: InlineWaf) -> None:
    cases = [
        ("/?id=1%27%20OR%20%271%27=%271", "942100"),
        ("/?q=%3Cscript%3Ealert(1)%3C/script%3E", "941100"),
        ("/download?file=../../../../etc/passwd", "930100"),
        ("/products?page=2", None),
    ] * 25
    decisions = await asyncio.gather(*(evaluate(waf, "GET", uri) for uri, _ in cases))
    for (uri, rule_id), decision in zip(cases, decisions, strict=True):
        if rule_id is None:
            assert_clean(decision)
        else:
            assert_blocked(decision, rule_id)
            others = {"942100", "941100", "930100"} - {rule_id}
            assert not others & set(decision.rule_ids), (uri, decision)


async def test_evaluate_in_one_call(waf: InlineWaf) -> None:
    request = make_request("POST", "/login", FORM, b"user=admin%27--")
    decision = await waf.evaluate(request, b"user=admin%27--")
    assert_blocked(decision, "942100")


async def test_cancelled_call_then_close(waf: InlineWaf) -> None:
    body = b"q=" + b"a%27%20OR%201=1--%20" * 2000
    for _ in range(20):
        tx = waf.transaction(make_request("POST", "/search", FORM, body))
        await tx.headers()
        await tx.body_chunk(body)
        task = asyncio.ensure_future(tx.finish())
        await asyncio.sleep(0)
        task.cancel()
        await tx.close()  # waits for the engine call still running, then frees
        await tx.close()
    assert_blocked(await evaluate(waf, "POST", "/search", FORM, body), "942100")


async def _bodiless(waf: Any, uri: str) -> WafDecision:
    tx = waf.transaction(make_request("GET", uri, has_body=False))
    try:
        decision = await tx.headers()
        return decision if decision is not None else await tx.finish()
    finally:
        await tx.close()


async def test_bodiless_requests_decided_in_one_step_keep_their_own_matches(
    waf: InlineWaf,
) -> None:
    """The proxy's common case (Coraza: evaluated on the library's goroutines, verdicts
    through a pipe; ModSecurity: one pool call), many at once."""
    cases = [
        ("/?id=1%27%20OR%20%271%27=%271", "942100"),
        ("/download?file=../../../../etc/passwd", "930100"),
        ("/products?page=2", None),
    ] * 30
    decisions = await asyncio.gather(*(_bodiless(waf, uri) for uri, _ in cases))
    for (uri, rule_id), decision in zip(cases, decisions, strict=True):
        if rule_id is None:
            assert_clean(decision)
        else:
            assert_blocked(decision, rule_id)
            assert not ({"942100", "930100"} - {rule_id}) & set(decision.rule_ids), uri


async def test_bodiless_request_cancelled_then_closed_is_released(make_waf: Any) -> None:
    """A client gone mid-evaluation: the transaction is freed once its evaluation ends,
    nothing is left running, and the engine closes cleanly."""
    waf = make_waf()
    for _ in range(50):
        tx = waf.transaction(make_request("GET", "/?id=1%27%20OR%20%271%27=%271", has_body=False))
        task = asyncio.ensure_future(tx.headers())
        await asyncio.sleep(0)
        task.cancel()
        await tx.close()
        await tx.close()
    assert_blocked(await _bodiless(waf, "/?id=1%27%20OR%20%271%27=%271"), "942100")
    await waf.aclose()
    if hasattr(waf.engine.lib, "qpc_pending"):  # Coraza: freed only with no goroutine on it
        assert waf.engine.handle is None


async def test_body_access_off_skips_bodies(make_waf: Any) -> None:
    waf = make_waf(body_access=False)
    body = b"username=admin%27%20OR%201%3D1--&password=x"
    assert_clean(await evaluate(waf, "POST", "/login", FORM, body))
    assert_clean(await evaluate(waf, "POST", "/api", JSON, b'{"q": "1 UNION SELECT 1--'))
    ctype, upload = _multipart("shell.php", b"<?php system($_GET['c']); ?>")
    assert_clean(await evaluate(waf, "POST", "/upload", [("content-type", ctype)], upload))
    # Phase 2, where the CRS adds up the score, still runs.
    assert_blocked(await evaluate(waf, "GET", "/login?username=admin%27%20OR%201%3D1--"), "942100")


# -- CRS settings (crs-setup tx.* variables) ----------------------------------------------


async def test_allowed_methods(make_waf: Any) -> None:
    waf = make_waf(allowed_methods=["GET", "HEAD"])
    assert_clean(await evaluate(waf, "GET", "/"))
    decision = await evaluate(waf, "DELETE", "/api/v1/sessions/1")
    assert not decision.allowed and "911100" in decision.rule_ids


async def test_binary_upload_allowed_on_one_path_only(make_waf: Any) -> None:
    waf = make_waf(exclusions=[WafExclusion(rule_id=920420, path_prefix="/upload/raw")])
    binary = [("content-type", "application/octet-stream")]
    data = bytes(range(256)) * 16
    assert_clean(await evaluate(waf, "POST", "/upload/raw/disk.img", binary, data))
    refused = await evaluate(waf, "POST", "/api/import", binary, data)
    assert not refused.allowed and "920420" in refused.rule_ids


async def test_grpc_is_a_known_content_type_its_headers_inspected(make_waf: Any) -> None:
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    message = b""  # the proxy feeds no gRPC body to the engine
    assert_clean(
        await evaluate(waf := make_waf(), "POST", "/pkg.Svc/Call", grpc, message, "HTTP/2")
    )
    proto = [("content-type", "application/grpc+proto")]
    assert_clean(await evaluate(waf, "POST", "/pkg.Svc/Call", proto, message, "HTTP/2"))
    attack = grpc + [("user-agent", "sqlmap/1.7")]
    decision = await evaluate(waf, "POST", "/pkg.Svc/Call", attack, message, "HTTP/2")
    assert not decision.allowed  # metadata still goes through the CRS
    lookalike = [("content-type", "application/grpcx")]
    refused = await evaluate(waf, "POST", "/pkg.Svc/Call", lookalike, message, "HTTP/2")
    assert not refused.allowed and "920420" in refused.rule_ids


async def test_allowed_content_types(make_waf: Any) -> None:
    waf = make_waf(allowed_content_types=["application/json", "application/octet-stream"])
    binary = [("content-type", "application/octet-stream")]
    assert_clean(await evaluate(waf, "POST", "/api/import", binary, b"\x00\x01\x02"))
    decision = await evaluate(waf, "POST", "/login", FORM, b"user=jane")
    assert not decision.allowed and "920420" in decision.rule_ids


async def test_detection_paranoia_level_logs_without_blocking(make_waf: Any) -> None:
    uri = "/?q=select%20name%20from%20list"
    waf = make_waf(paranoia_level=1, detection_paranoia_level=2)
    decision = await evaluate(waf, "GET", uri)
    assert decision.allowed and decision.status == 200
    assert "942260" in decision.rule_ids


@pytest.mark.parametrize("waf_engine", ["coraza"], indirect=True)  # a CRS 4 setting
async def test_early_blocking_decides_on_headers(make_waf: Any) -> None:
    waf = make_waf(early_blocking=True)
    assert waf.engine.crs_version[0] >= 4
    tx = waf.transaction(make_request("POST", "/login", [("user-agent", "sqlmap/1.7")] + FORM))
    try:
        decision = await tx.headers()
    finally:
        await tx.close()
    assert decision is not None and not decision.allowed
    assert "913100" in decision.rule_ids
    late = make_waf()
    tx = late.transaction(make_request("POST", "/login", [("user-agent", "sqlmap/1.7")] + FORM))
    try:
        assert await tx.headers() is None  # without it the score is read in phase 2
    finally:
        await tx.close()


async def test_bodiless_request_is_decided_in_one_call(waf: Any) -> None:
    # The CRS scores query arguments in phase 2: with a body to come, headers() cannot
    # know yet; with none, headers() runs every phase and finish() only reads the verdict.
    uri = "/products?id=1%27%20OR%20%271%27=%271"
    later = waf.transaction(make_request("GET", uri))
    try:
        assert await later.headers() is None
        assert_blocked(await later.finish(), "942100")
    finally:
        await later.close()
    request = make_request("GET", uri)
    request.has_body = False
    now = waf.transaction(request)
    try:
        decision = await now.headers()
        assert decision is not None
        assert_blocked(decision, "942100")
        assert await now.finish() == decision
    finally:
        await now.close()
