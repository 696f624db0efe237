"""A real browser (Debian chromium, headless) loads a page through the proxy over HTTP/3."""

from __future__ import annotations

from quicproxy._metrics import metrics
from tests.helpers import chromium_args, run_chromium


async def test_chromium_gets_the_page_over_http3(make_proxy, tmp_path):
    # The built-in demo page names the protocol it came over. Listening on every
    # address matters: chromium tries ::1 for localhost, and QUIC has no fallback.
    proxy = await make_proxy(None, listen={"host": ""})
    args = chromium_args(tmp_path, proxy) + ["--dump-dom", f"https://localhost:{proxy.https_port}/"]
    status, out, err = await run_chromium(args)
    assert status == 0, err.decode()[-2000:]
    assert '<b id="protocol">HTTP/3</b>' in out.decode(), out.decode()[:2000]
    labels = {"protocol": "h3", "status_class": "2xx", "route": "demo"}
    assert metrics.value("quicproxy_requests_total", **labels) >= 1
