"""The SSRF guard: only public addresses, unless the configuration allows private ones."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from aiguillage.jobs.urls import UrlRefused, address_allowed, check_url, fetch_to_file


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.3.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["193.51.24.1", "2001:660::1", "8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


async def test_check_url_refuses_schemes_and_loopback_names() -> None:
    for url in ("ftp://example.org/a", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(UrlRefused):
            await check_url(url, allow_private=True)
    with pytest.raises(UrlRefused, match="localhost"):
        await check_url("http://localhost:8000/a.wav", allow_private=False)
    await check_url("http://localhost:8000/a.wav", allow_private=True)


async def test_the_fetch_itself_refuses_loopback(tmp_path: Path) -> None:
    with pytest.raises(UrlRefused):
        await fetch_to_file(
            "http://127.0.0.1:9/a.wav",
            tmp_path / "media",
            allow_private=False,
            max_bytes=1000,
            timeout_s=5,
        )
    assert not (tmp_path / "media").exists()
