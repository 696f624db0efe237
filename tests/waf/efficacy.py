"""Detection efficacy through the running proxy: block rate per attack class and the
share of benign requests refused, per engine, with the extra detection rules on and off.

The corpora are the text files in ``tests/waf/corpus/`` (written for this project: one
payload per line, as sent on the wire). Each line is placed in each part of a request a
WAF must read: query parameter, path segment, a custom header, a cookie, the User-Agent,
an urlencoded form, a multipart field and a JSON field (XXE also as an XML body).
Requests go over HTTP/1.1 on real sockets to a proxy with the inline WAF in front of a
real backend; a request counts as refused when the backend's 200 does not come back (the
WAF's 403, or the proxy's 400 for a request it cannot parse).

Run: ``python -m tests.waf.efficacy [--engine coraza|modsecurity|both] [--extra on|off|both]
[--verbose]``. It prints a markdown table (the README's) and, with ``--verbose``, what
each configuration let through or refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")
ATTACK_CLASSES = [
    "sqli",
    "xss",
    "traversal",
    "cmdi",
    "log4shell",
    "shellshock",
    "xxe",
    "ssti",
]
PLACES = ["query", "path", "header", "cookie", "user-agent", "form", "multipart", "json"]
_HEX = re.compile(r"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")
BOUNDARY = "----qpCorpusBoundary0d1c62a3"


@dataclass
class Probe:
    kind: str
    "Attack class, or 'benign'."
    place: str
    payload: str
    raw: bytes
    "The whole HTTP/1.1 request."


def load(name: str) -> list[str]:
    with open(os.path.join(CORPUS, f"{name}.txt"), encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.strip() and not line.startswith("#")]


def _url_part(payload: str, keep: str) -> str:
    """The payload as a client puts it in a URL: percent escapes the line already holds
    stay as they are, everything a URL cannot carry raw is escaped."""
    out = []
    i = 0
    while i < len(payload):
        if _HEX.match(payload, i):
            out.append(payload[i])
        else:
            ch = payload[i]
            if ch.isascii() and (ch.isalnum() or ch in keep):
                out.append(ch)
            else:
                out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        i += 1
    return "".join(out)


QUERY_KEEP = "-._~!$'()*+,;:@/?[]|`^{}\\<>\""
PATH_KEEP = "-._~!$'()*+,;:@/&=|`^{}\\<>\"[]"


def _request(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: shop.example.com"]
    if not any(n == "user-agent" for n, _ in headers):
        lines.append(
            "user-agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
        )
    lines += [
        "accept: text/html,application/xhtml+xml,*/*;q=0.8",
        "accept-language: en-US,en;q=0.5",
    ]
    lines += [f"{n}: {v}" for n, v in headers]
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def place(payload: str, where: str) -> bytes | None:
    """One request carrying ``payload`` in ``where`` (None if it cannot be carried there)."""
    if where == "query":
        return _request("GET", "/search?lang=en&q=" + _url_part(payload, QUERY_KEEP), [], b"")
    if where == "path":
        return _request("GET", "/files/" + _url_part(payload, PATH_KEEP), [], b"")
    if where == "header":
        if not payload.isascii() or any(ord(c) < 0x20 for c in payload):
            return None  # a header value carries printable ASCII (clients encode the rest)
        return _request("GET", "/account", [("x-note", payload)], b"")
    if where in ("cookie", "user-agent"):
        if not payload.isascii() or any(ord(c) < 0x20 for c in payload):
            return None
        if where == "cookie":
            value = "theme=dark; note=" + payload.replace(";", "%3B")
            return _request("GET", "/account", [("cookie", value)], b"")
        return _request("GET", "/account", [("user-agent", payload)], b"")
    if where == "form":
        value = _url_part(payload, QUERY_KEEP.replace("+", "")).replace("%20", "+")
        body = f"name=Jane&comment={value}".encode()
        return _request(
            "POST", "/comment", [("content-type", "application/x-www-form-urlencoded")], body
        )
    if where == "multipart":
        body = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nJane\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="comment"\r\n\r\n'
            f"{payload}\r\n--{BOUNDARY}--\r\n"
        ).encode()
        ctype = f"multipart/form-data; boundary={BOUNDARY}"
        return _request("POST", "/comment", [("content-type", ctype)], body)
    if where == "json":
        body = json.dumps({"name": "Jane", "comment": payload}).encode()
        return _request("POST", "/api/comments", [("content-type", "application/json")], body)
    if where == "xml":
        return _request(
            "POST", "/api/import", [("content-type", "application/xml")], payload.encode()
        )
    raise ValueError(where)


def probes() -> Iterator[Probe]:
    for kind in [*ATTACK_CLASSES, "benign"]:
        places = PLACES + (["xml"] if kind == "xxe" else [])
        for payload in load(kind):
            for where in places:
                raw = place(payload, where)
                if raw is not None:
                    yield Probe(kind, where, payload, raw)


async def send(port: int, raw: bytes) -> tuple[int, str]:
    """Send one request, read its answer (by Content-Length); the status (0 if none)
    and the rules the WAF named."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length:
            await asyncio.wait_for(reader.readexactly(int(length.group(1))), 30)
    except (OSError, asyncio.IncompleteReadError):
        return 0, ""
    finally:
        writer.close()
    parts = head.split(b"\r\n", 1)[0].split()
    rules = re.search(rb"(?im)^x-waf-rule-id:\s*([0-9,]+)", head)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, rules.group(1).decode() if rules else ""


async def measure(
    engine: str, extra: bool, source: Iterable[Probe] | None = None, workers: int = 8
) -> dict[tuple[str, str], list]:
    """{(class, place): [(payload, status, rules), ...]} for one configuration, over
    ``source`` (default: the corpus)."""
    from quicproxy import Proxy
    from quicproxy._tls import self_signed
    from tests.backend import Backend
    from tests.helpers import proxy_config

    folder = pathlib.Path(tempfile.mkdtemp(prefix="qp-efficacy-"))
    cert, key = folder / "c.pem", folder / "k.pem"
    self_signed(cert, key)
    backend = await Backend().start()
    waf = {
        "mode": "inline",
        "engine": engine,
        "extra_detection": extra,
        "audit": {"log": "off"},
    }
    proxy = Proxy(
        proxy_config(
            (str(cert), str(key)),
            backend,
            waf=waf,
            listen={"plain_http": "proxy"},
            log={"access": "off"},
            log_level="error",
        )
    )
    await proxy.start()
    results: dict[tuple[str, str], list] = defaultdict(list)
    gate = asyncio.Semaphore(workers)

    async def one(probe: Probe) -> None:
        async with gate:
            status, rules = await send(proxy.http_port, probe.raw)
        results[(probe.kind, probe.place)].append((probe.payload, status, rules))

    try:
        await asyncio.gather(*(one(p) for p in (probes() if source is None else source)))
    finally:
        await proxy.stop(grace=1)
        await backend.stop()
    return results


def summarize(results: dict[tuple[str, str], list]) -> dict[str, tuple[int, int]]:
    """{class: (refused, total)}."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (kind, _), rows in results.items():
        out[kind][0] += sum(1 for _, status, _ in rows if status != 200)
        out[kind][1] += len(rows)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _pct(pair: tuple[int, int]) -> str:
    return f"{100 * pair[0] / max(1, pair[1]):.1f} %"


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("quicproxy").setLevel(logging.ERROR)  # one line per refusal otherwise
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["coraza", "modsecurity", "both"], default="both")
    parser.add_argument("--extra", choices=["on", "off", "both"], default="both")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    engines = ["coraza", "modsecurity"] if args.engine == "both" else [args.engine]
    extras = {"on": [True], "off": [False], "both": [False, True]}[args.extra]
    columns: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for engine in engines:
        for extra in extras:
            label = f"{engine} {'+extra' if extra else 'CRS only'}"
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            results = asyncio.run(measure(engine, extra))
            columns.append((label, summarize(results)))
            if args.verbose:
                for (kind, where), rows in sorted(results.items()):
                    for payload, status, rules in rows:
                        wrong = status == 200 if kind != "benign" else status != 200
                        if wrong:
                            print(f"  {label} {kind}/{where} {status} [{rules}]: {payload}")
    header = "| class | " + " | ".join(label for label, _ in columns) + " |"
    print(header)
    print("|---|" + "---:|" * len(columns))
    for kind in [*ATTACK_CLASSES, "benign"]:
        name = "benign refused" if kind == "benign" else f"{kind} blocked"
        total = columns[0][1].get(kind, (0, 0))[1]
        cells = " | ".join(_pct(col.get(kind, (0, 0))) for _, col in columns)
        print(f"| {name} ({total}) | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
