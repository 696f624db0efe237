"""Shared fixtures: a real backend and a real proxy on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quicproxy import Proxy
from quicproxy._metrics import metrics
from quicproxy._tls import self_signed
from quicproxy.waf._coraza_lib import BUILD_HINT, library_path
from tests.backend import Backend
from tests.helpers import proxy_config
from tests.ws import WsBackend

WAF_ENGINES = ["coraza", "modsecurity"]


def require_engine(engine: str) -> None:
    """Skip (fail under CI=true) when the Coraza library is not built."""
    if engine == "coraza" and not os.path.isfile(library_path()):
        reason = f"coraza engine not built ({library_path()}): {BUILD_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session", params=WAF_ENGINES)
def waf_engine(request: pytest.FixtureRequest) -> str:
    """Each inline WAF engine: coraza (CRS 4, built library) and modsecurity (Debian CRS 3)."""
    require_engine(request.param)
    return str(request.param)


@pytest.fixture(autouse=True)
def fresh_metrics() -> None:
    """Every test starts from zero counters (metrics are per process)."""
    metrics.reset()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("certs")
    cert, key = folder / "cert.pem", folder / "key.pem"
    self_signed(cert, key)
    return str(cert), str(key)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = await Backend().start()
    yield b
    await b.stop()


@pytest.fixture
async def make_proxy(certs: tuple[str, str]) -> AsyncIterator[Any]:
    started: list[Proxy] = []

    async def make(origin: Backend | None, **extra: Any) -> Proxy:
        proxy = Proxy(proxy_config(certs, origin, **extra))
        await proxy.start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.stop(grace=1)


@pytest.fixture
async def proxy(make_proxy: Any, backend: Backend) -> Proxy:
    return await make_proxy(backend)


@pytest.fixture
async def ws_backend() -> AsyncIterator[WsBackend]:
    b = await WsBackend().start()
    yield b
    await b.stop()


@pytest.fixture
async def ws_proxy(make_proxy: Any, ws_backend: WsBackend) -> Any:
    return await make_proxy(ws_backend)
