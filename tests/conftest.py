"""Shared fixtures: a real backend and a real proxy on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from quicproxy import Proxy
from quicproxy._metrics import metrics
from quicproxy._tls import self_signed
from tests.backend import Backend
from tests.helpers import proxy_config


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
