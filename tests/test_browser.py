"""A real browser (Debian chromium, headless) loads a page through the proxy over HTTP/3."""

from __future__ import annotations

import asyncio

from quicproxy._metrics import metrics
from quicproxy._tls import spki_sha256_b64
from tests.helpers import need_tool


async def test_chromium_gets_the_page_over_http3(make_proxy, tmp_path):
    chromium = need_tool("chromium", "apt-get install chromium (or run bash .ci/setup)")
    # The built-in demo page names the protocol it came over. Listening on every
    # address matters: chromium tries ::1 for localhost, and QUIC has no fallback.
    proxy = await make_proxy(None, listen={"host": ""})
    origin = f"localhost:{proxy.https_port}"
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path}",
        f"--origin-to-force-quic-on={origin}",
        f"--ignore-certificate-errors-spki-list={spki_sha256_b64(proxy.cert)}",
        "--dump-dom",
        f"https://{origin}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:  # a timed-out browser must not outlive the test
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert '<b id="protocol">HTTP/3</b>' in out.decode(), out.decode()[:2000]
    labels = {"protocol": "h3", "status_class": "2xx", "route": "demo"}
    assert metrics.value("quicproxy_requests_total", **labels) >= 1
