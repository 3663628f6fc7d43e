"""Fetching media from a client's URL without letting it reach our own network (SSRF).

A URL is refused when its host is, or resolves to, a loopback, private,
link-local or otherwise non-public address, unless the configuration allows
private URLs. The check runs when the job is created (the client learns at once)
and again on every connection the worker opens: redirects are followed by hand
and each hop is checked, and host names go through a resolver that refuses
private answers, so a DNS name that changes its answer between the two checks
(DNS rebinding) gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

MAX_REDIRECTS = 5
CHUNK_BYTES = 1 << 20


class UrlRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


class FetchFailed(Exception):
    """The media could not be fetched; `permanent` when retrying cannot help (a 404)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_allowed(address: IpAddress) -> bool:
    """Whether an address is on the public internet (IPv4-mapped IPv6 judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise `UrlRefused` unless `url` is http(s) with a host that resolves to allowed addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("The media URL must start with http:// or https://.")
    host = parts.hostname
    if not host:
        raise UrlRefused("The media URL has no host.")
    if allow_private:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(host)
    for address in addresses:
        if not address_allowed(address):
            raise UrlRefused(
                f"The media URL's host {host} is a loopback, private or reserved address; "
                "only public addresses may be fetched."
            )


async def _resolve(host: str) -> list[IpAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise UrlRefused(f"The media URL's host {host} cannot be resolved.") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class _PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, refusing any answer that is not a public address."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not address_allowed(ipaddress.ip_address(result["host"])):
                raise UrlRefused(f"{host} resolves to a non-public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def fetch_to_file(
    url: str, destination: Path, *, allow_private: bool, max_bytes: int, timeout_s: float
) -> int:
    """Download `url` into `destination` (streamed, size-limited); the number of bytes written.

    Raises `UrlRefused` (permanent) or `FetchFailed`.
    """
    connector_options: dict[str, Any] = {} if allow_private else {"resolver": _PublicOnlyResolver()}
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(**connector_options)
    ) as session:
        for _ in range(MAX_REDIRECTS + 1):
            await check_url(url, allow_private=allow_private)
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            raise FetchFailed("a redirect without a Location", permanent=True)
                        url = urljoin(url, location)
                        continue
                    if response.status >= 400:
                        raise FetchFailed(
                            f"the media URL answered HTTP {response.status}",
                            permanent=400 <= response.status < 500 and response.status != 429,
                        )
                    return await _save(response, destination, max_bytes)
            except aiohttp.ClientError as error:
                raise FetchFailed(f"cannot fetch the media URL: {error}", permanent=False) from None
            except TimeoutError:
                raise FetchFailed("fetching the media URL timed out", permanent=False) from None
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", permanent=True)


async def _save(response: aiohttp.ClientResponse, destination: Path, max_bytes: int) -> int:
    written = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("wb") as file:
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            written += len(chunk)
            if written > max_bytes:
                raise FetchFailed(
                    f"the media is larger than the limit of {max_bytes} bytes", permanent=True
                )
            await asyncio.to_thread(file.write, chunk)
    return written
