"""Certificate rotation under a running proxy, the way the kubelet updates a
mounted Secret: new files in a new folder, then an atomic swap of ``..data``."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from pathlib import Path

import httpx
import pytest

from quicproxy._certwatch import TlsStore
from quicproxy._client import h3_client
from quicproxy._errors import ConfigError
from quicproxy._metrics import metrics
from quicproxy._tls import self_signed
from tests.helpers import https_url, proxy_config


class SecretVolume:
    """A folder laid out like a kubelet Secret volume: tls.crt -> ..data/tls.crt."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        self.pairs: list[tuple[Path, Path]] = []

    def new_pair(self) -> tuple[Path, Path]:
        folder = self.root.parent / f"pair-{len(self.pairs)}"
        folder.mkdir()
        pair = (folder / "tls.crt", folder / "tls.key")
        self_signed(*pair)
        self.pairs.append(pair)
        return pair

    def publish(self, cert: bytes, key: bytes) -> None:
        self.generation += 1
        payload = self.root / f"..2026_11_26_{self.generation}"
        payload.mkdir()
        (payload / "tls.crt").write_bytes(cert)
        (payload / "tls.key").write_bytes(key)
        tmp = self.root / "..data_tmp"
        os.symlink(payload.name, tmp)
        os.rename(tmp, self.root / "..data")  # the atomic swap
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)

    def publish_pair(self, pair: tuple[Path, Path]) -> None:
        self.publish(pair[0].read_bytes(), pair[1].read_bytes())

    @property
    def cert(self) -> str:
        return str(self.root / "tls.crt")

    @property
    def key(self) -> str:
        return str(self.root / "tls.key")


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    root = tmp_path / "secret"
    root.mkdir()
    vol = SecretVolume(root)
    vol.publish_pair(vol.new_pair())
    return vol


def h2_client(cafile: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(cafile)), http2=True, timeout=30
    )


async def h2_status(proxy, cafile: Path) -> int | None:
    """Status of a GET on a new h2 connection that trusts only ``cafile``; None if refused."""
    try:
        async with h2_client(cafile) as client:
            resp = await client.get(https_url(proxy, "/"))
            assert resp.http_version == "HTTP/2"
            return resp.status_code
    except httpx.ConnectError:
        return None


async def h3_status(proxy, cafile: Path) -> int | None:
    try:
        async with h3_client(https_url(proxy), cafile=str(cafile)) as client:
            return (await asyncio.wait_for(client.request("GET", "/"), 10)).status
    except (ConnectionError, TimeoutError, OSError):
        return None


async def wait_for(check, seconds: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not true within {seconds}s")


async def test_rotation_reaches_new_h2_and_h3_connections_without_dropping_requests(
    volume, backend
):
    from quicproxy import Proxy

    old, new = volume.pairs[0], volume.new_pair()
    proxy = Proxy(proxy_config((volume.cert, volume.key), backend))
    await proxy.start()
    try:
        assert await h2_status(proxy, old[0]) == 200
        assert await h3_status(proxy, old[0]) == 200
        async with h2_client(old[0]) as open_client:
            in_flight = asyncio.ensure_future(open_client.get(https_url(proxy, "/slow?s=3")))
            await asyncio.sleep(0.5)
            volume.publish_pair(new)
            swapped = time.monotonic()

            async def h2_new() -> bool:
                return await h2_status(proxy, new[0]) == 200

            h2_seconds = await wait_for(h2_new)
            h3_seconds = await wait_for(lambda: _is_200(h3_status(proxy, new[0])))
            print(f"new certificate on h2 after {h2_seconds:.2f}s, h3 after {h3_seconds:.2f}s")
            assert time.monotonic() - swapped < 5
            assert await h2_status(proxy, old[0]) is None  # new handshakes: old cert gone
            assert await h3_status(proxy, old[0]) is None
            resp = await in_flight
            assert resp.status_code == 200  # the request in flight during the swap completed
            again = await open_client.get(https_url(proxy, "/after"))
            assert again.status_code == 200  # and its connection is still open
        assert metrics.value("quicproxy_certificate_reloads_total", result="ok") == 1
    finally:
        await proxy.stop(grace=1)


async def _is_200(status) -> bool:
    return await status == 200


async def test_bad_new_pair_is_rejected_with_a_log_line_and_the_old_kept(volume, backend, caplog):
    from quicproxy import Proxy

    old, other = volume.pairs[0], volume.new_pair()
    proxy = Proxy(proxy_config((volume.cert, volume.key), backend))
    await proxy.start()
    try:
        with caplog.at_level(logging.ERROR, logger="quicproxy"):
            # a certificate with someone else's key
            volume.publish(old[0].read_bytes(), other[1].read_bytes())
            await wait_for(lambda: _async(_rejected(caplog)), 10)
        assert await h2_status(proxy, old[0]) == 200
        assert await h3_status(proxy, old[0]) == 200
        assert metrics.value("quicproxy_certificate_reloads_total", result="error") == 1
        volume.publish_pair(other)  # a good pair afterwards is still taken
        await wait_for(lambda: _is_200(h2_status(proxy, other[0])))
    finally:
        await proxy.stop(grace=1)


def _rejected(caplog) -> bool:
    return any("rejected, keeping the old one" in r.getMessage() for r in caplog.records)


async def _async(value: bool) -> bool:
    return value


def test_store_reloads_after_a_swap_and_ignores_a_touch(volume):
    store = TlsStore(volume.cert, volume.key)
    try:
        first = store.current()
        assert not store.check()
        os.utime(volume.cert)  # same bytes, new mtime: no reload
        assert not store.check() and store.current() is first
        volume.publish_pair(volume.new_pair())
        assert store.check()
        assert store.current().version == 2 and store.current().digest != first.digest
    finally:
        store.close()


def test_store_refuses_a_bad_pair_at_start_naming_the_setting(volume, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="tls.cert"):
        TlsStore(volume.cert, str(bad))
