"""The image as shipped: proxy and WAF service entrypoints on a Docker network with a backend.

One backend, one WAF service (`quicproxy waf serve`) and one proxy (`quicproxy serve`, WAF in
service mode) per session; the proxy's ports are published on random host ports and reached
over loopback: HTTP/1.1 and HTTP/2 on the mapped TCP port, HTTP/3 on the mapped UDP port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conformance import _probe

from .conftest import progress

BACKEND_MARK = "quicproxy-image-backend"
SQLI_PATH = "/search?id=1%27%20OR%20%271%27%3D%271%27%20UNION%20SELECT%20password%20FROM%20users--"
BENIGN_PATH = "/hello?name=image"
BACKEND_SRC = f"""
import http.server, json, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        body = json.dumps({{"mark": "{BACKEND_MARK}", "path": self.path}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""
LOOPBACK = "127.0.0.1"


def _health(container: Any) -> str:
    container.get_wrapped_container().reload()
    state = container.get_wrapped_container().attrs["State"]
    return str(state.get("Health", {}).get("Status", "none"))


def _wait(what: str, cond: Any, timeout: float, container: Any = None) -> Any:
    start = last = time.monotonic()
    while True:
        res = cond()
        if res:
            return res
        now = time.monotonic()
        if container is not None:
            container.get_wrapped_container().reload()
            if container.get_wrapped_container().status == "exited":
                out, err = container.get_logs()
                pytest.fail(f"{what}: container exited\n{(out + err).decode()[-3000:]}")
        if now - start > timeout:
            logs = b"".join(container.get_logs()).decode()[-3000:] if container else ""
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
        if now - last > 10:
            progress(f"  ... still waiting for {what} ({now - start:.0f}s)")
            last = now
        time.sleep(0.5)


def _start(image: str, network: Any, alias: str, command: list[str], **env: str) -> Any:
    """Start a container of the image; a "proxy*" alias publishes its ports on random ones."""
    from testcontainers.core.container import DockerContainer

    c = DockerContainer(image).with_network(network).with_network_aliases(alias)
    if command and command[0] == "python3":  # the entrypoint is quicproxy: replace it
        c = c.with_kwargs(entrypoint=command)
    else:
        c = c.with_command(command)
    for k, v in env.items():
        c = c.with_env(k, v)
    if alias.startswith("proxy"):
        c = c.with_exposed_ports(8080, 8443, "8443/udp")
    c.start()
    return c


@pytest.fixture(scope="session")
def backend(image: str, network: Any) -> Iterator[Any]:
    c = _start(image, network, "backend", ["python3", "-c", BACKEND_SRC])
    yield c
    c.stop()


@pytest.fixture(scope="session")
def waf(image: str, network: Any) -> Iterator[Any]:
    c = _start(image, network, "waf", ["waf", "serve", "--port", "9000"])
    yield c
    c.stop()


@pytest.fixture(scope="session")
def proxy(image: str, network: Any, backend: Any, waf: Any) -> Iterator[Any]:
    progress("starting backend, WAF service and proxy containers")
    c = _start(
        image,
        network,
        "proxy",
        ["serve"],
        BACKEND_HOST="backend",
        BACKEND_PORT="8080",
        WAF_ENABLED="true",
        WAF_HOST="waf",
        WAF_PORT="9000",
    )
    _wait("proxy /_gwhealthz over HTTP", lambda: _get_ok(c, "/_gwhealthz"), 60, c)
    yield c
    c.stop()


def _get_ok(c: Any, path: str) -> bool:
    try:
        port = c.get_exposed_port(8080)
        return httpx.get(f"http://{LOOPBACK}:{port}{path}", timeout=2).status_code == 200
    except (httpx.HTTPError, ConnectionError):
        return False


def _https(c: Any) -> str:
    return f"https://{LOOPBACK}:{c.get_exposed_port(8443)}"


def _udp_port(c: Any) -> int:
    return int(c.get_exposed_port("8443/udp"))


def _h3(c: Any, path: str) -> Any:
    return _probe.request_retry(
        {"proto": "h3", "host": LOOPBACK, "port": _udp_port(c), "path": path}, 20.0
    )


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_tcp_port_serves_h1_and_h2(proxy: Any, http2: bool) -> None:
    with httpx.Client(verify=False, http2=http2, timeout=10) as client:
        r = client.get(_https(proxy) + BENIGN_PATH)
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert r.status_code == 200 and BACKEND_MARK in r.text, (r.status_code, r.text[:300])
    assert 'h3=":8443"' in r.headers.get("alt-svc", ""), r.headers


def test_udp_port_serves_http3(proxy: Any) -> None:
    health = _h3(proxy, "/_gwhealthz")
    assert health.alpn == "h3" and (health.status, health.body.strip()) == (200, b"OK")
    page = _h3(proxy, BENIGN_PATH)
    assert page.status == 200 and BACKEND_MARK.encode() in page.body, (page.status, page.body)


def test_waf_service_entrypoint_blocks_sqli(proxy: Any, waf: Any) -> None:
    """The proxy asks the WAF service container; an SQL injection gets 403 on every protocol
    and never reaches the backend, while the benign request above does."""
    with httpx.Client(verify=False, http2=True, timeout=10) as client:
        r2 = client.get(_https(proxy) + SQLI_PATH)
    r3 = _h3(proxy, SQLI_PATH)
    for status, body in ((r2.status_code, r2.content), (r3.status, r3.body)):
        assert status == 403 and BACKEND_MARK.encode() not in body, (status, body[:300])
    assert r2.headers.get("x-waf-rule-id"), r2.headers
    metrics = waf.exec(["python3", "-c", _WAF_METRICS]).output.decode()
    blocked = [ln for ln in metrics.splitlines() if ln.startswith("waf_requests_blocked_total ")]
    assert blocked and float(blocked[0].split()[1]) >= 2, metrics[-1000:]


_WAF_METRICS = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://127.0.0.1:9000/metrics', timeout=5).read().decode())"
)


@pytest.mark.parametrize("which", ["proxy", "waf"])
def test_runs_as_non_root(which: str, proxy: Any, waf: Any) -> None:
    c = proxy if which == "proxy" else waf
    assert c.get_wrapped_container().attrs["Config"]["User"] == "10001:10001"
    status = c.exec(["cat", "/proc/1/status"]).output.decode()
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    assert uids == ["10001"] * 4, status


@pytest.mark.parametrize("which", ["proxy", "waf"])
def test_healthcheck_turns_healthy(which: str, proxy: Any, waf: Any) -> None:
    c = proxy if which == "proxy" else waf
    assert _health(c) in ("starting", "healthy")
    _wait(f"{which} HEALTHCHECK healthy", lambda: _health(c) == "healthy", 60, c)


def test_sigterm_drains_in_flight_and_exits_0(image: str, network: Any, backend: Any) -> None:
    """SIGTERM while a request is in flight: the request still completes, then exit code 0."""
    c = _start(
        image,
        network,
        "proxy-drain",
        ["serve"],
        BACKEND_HOST="backend",
        BACKEND_PORT="8080",
        WAF_ENABLED="false",
    )
    try:
        _wait("drain-test proxy up", lambda: _get_ok(c, "/_gwhealthz"), 60, c)
        url = f"http://{LOOPBACK}:{c.get_exposed_port(8080)}"
        port = c.get_exposed_port(8443)
        result: dict[str, Any] = {}

        def slow() -> None:
            try:
                with httpx.Client(verify=False, timeout=20) as client:
                    result["r"] = client.get(f"https://{LOOPBACK}:{port}/slow")
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(1.0)  # the request is at the backend, which answers after 3 s
        sent = time.monotonic()
        c.get_wrapped_container().kill(signal="SIGTERM")
        t.join(30)
        assert "r" in result, result.get("error")
        assert result["r"].status_code == 200 and BACKEND_MARK in result["r"].text
        rc = c.get_wrapped_container().wait(timeout=40)["StatusCode"]
        took = time.monotonic() - sent
        logs = b"".join(c.get_logs()).decode()
        assert rc == 0, logs[-2000:]
        assert took < 30, f"exit took {took:.1f}s: the drain waited out the grace period"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/_gwhealthz", timeout=2)
    finally:
        c.stop()
