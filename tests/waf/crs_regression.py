"""The CRS's own regression inputs as a second, independent measurement (never tuned on).

Reads the go-ftw test files of a coreruleset checkout (``tests/regression/tests``, the
CRS repository's, read-only, not copied here): each test whose expected log names a rule
of an attack file (930-944) is an attack sample of that file's class; each test that
only expects a rule *not* to match is a benign sample. Every sample goes through the
proxy like :mod:`tests.waf.efficacy` (HTTP/1.1, inline WAF, PL1); tests given as raw
encoded requests are skipped.

Run: ``python -m tests.waf.crs_regression CRS_CHECKOUT [--engine ...] [--extra ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import logging
import os
import sys
from collections.abc import Iterator

import yaml

from .efficacy import Probe, measure, summarize

CLASSES = {
    "930": "traversal",
    "931": "rfi",
    "932": "cmdi",
    "933": "php",
    "934": "generic",
    "941": "xss",
    "942": "sqli",
    "943": "session",
    "944": "java",
}


def _request(stage: dict) -> bytes | None:
    data = stage.get("input", {})
    if "encoded_request" in data or "raw_request" in data:
        return None
    method = data.get("method", "GET")
    uri = data.get("uri", "/")
    headers = {str(k): str(v) for k, v in (data.get("headers") or {}).items()}
    body = data.get("data", "")
    if isinstance(body, list):
        body = "\r\n".join(body)
    raw_body = str(body or "").encode("utf-8", "surrogateescape")
    lines = [f"{method} {uri} HTTP/1.1"]
    names = {k.lower() for k in headers}
    if "host" not in names:
        lines.append("Host: localhost")
    for name, value in headers.items():
        if name.lower() in ("content-length", "connection", "transfer-encoding"):
            continue
        lines.append(f"{name}: {value}")
    if raw_body and "content-type" not in names:
        lines.append("Content-Type: application/x-www-form-urlencoded")  # as go-ftw sends
    if raw_body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(raw_body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + raw_body


def samples(checkout: str) -> Iterator[Probe]:
    pattern = os.path.join(checkout, "tests", "regression", "tests", "REQUEST-9*", "*.yaml")
    for path in sorted(glob.glob(pattern)):
        kind = CLASSES.get(os.path.basename(os.path.dirname(path))[8:11])
        if kind is None:
            continue
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        for test in doc.get("tests", []):
            for stage in test.get("stages", []):
                log = (stage.get("output") or {}).get("log") or {}
                if log.get("expect_ids"):
                    label = kind
                elif log.get("no_expect_ids"):
                    label = "benign"
                else:
                    continue
                raw = _request(stage)
                if raw is not None:
                    name = f"{doc.get('rule_id')}-{test.get('test_id')}"
                    yield Probe(label, "crs", name, raw)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("quicproxy").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout")
    parser.add_argument("--engine", choices=["coraza", "modsecurity", "both"], default="both")
    parser.add_argument("--extra", choices=["on", "off", "both"], default="both")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    probes = list(samples(args.checkout))
    engines = ["coraza", "modsecurity"] if args.engine == "both" else [args.engine]
    extras = {"on": [True], "off": [False], "both": [False, True]}[args.extra]
    columns = []
    for engine in engines:
        for extra in extras:
            label = f"{engine} {'+extra' if extra else 'CRS only'}"
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            results = asyncio.run(measure(engine, extra, probes))
            columns.append((label, summarize(results)))
            if args.verbose:
                for (kind, _), rows in sorted(results.items()):
                    for name, status, rules in rows:
                        if (status == 200) == (kind != "benign"):
                            print(f"  {label} {kind} {status} [{rules}]: {name}")
    print("| class | " + " | ".join(label for label, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    kinds = sorted({k for _, col in columns for k in col} - {"benign"}) + ["benign"]
    for kind in kinds:
        total = columns[0][1].get(kind, (0, 0))[1]
        cells = " | ".join(
            f"{100 * col.get(kind, (0, 1))[0] / max(1, col.get(kind, (0, 1))[1]):.1f} %"
            for _, col in columns
        )
        name = "benign refused" if kind == "benign" else f"{kind} blocked"
        print(f"| {name} ({total}) | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
