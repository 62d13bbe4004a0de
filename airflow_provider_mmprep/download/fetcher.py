"""Fetch image bytes over HTTP(S) with the bounds an internet-scale crawl needs.

Why aiohttp and not requests: a thread per in-flight request cannot keep thousands of slow hosts busy on a
few cores (see docs/download_images.md for the figures); one event loop per process can. Each fetch has:

- one deadline (``timeout``) for the whole attempt: connect, every redirect hop, headers and the full body,
  so a host dripping a byte per second fails at the deadline instead of stalling a worker for minutes;
- pooled keep-alive connections, a DNS cache, a per-host connection cap, manual redirects (capped, each
  hop's scheme and address checked);
- a size cap (Content-Length checked first, then counted while reading);
- retries with exponential backoff for transient failures only: connection errors, timeouts, 5xx, 408 and
  429 (``Retry-After`` honoured when it fits within ``timeout``);
- ``X-Robots-Tag`` directives honoured;
- every address that is not globally routable refused (loopback, private, shared/carrier-grade NAT and
  link-local, where cloud metadata endpoints live, multicast, reserved; IPv6 forms that embed such an IPv4
  too), checked on the address the connection actually uses (a resolver filter, so DNS rebinding cannot
  slip past), unless ``allow_private_addresses``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .options import DownloadOptions

_REDIRECTS = (301, 302, 303, 307, 308)
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0


class RefusedAddress(OSError):
    """The host resolved only to addresses we must not connect to."""


@dataclass
class FetchResult:
    body: bytes | None
    error: str | None = None
    transient: bool = False  # worth retrying later (retry_failed)
    attempts: int = 1


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use NAT64


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries by a transition mechanism, where it carries one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:  # 2002::/16
        return ip.sixtofour
    if ip.teredo is not None:  # 2001::/32: (server, client); the client is the host reached
        return ip.teredo[1]
    return None


def _label(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for test, what in ((ip.is_unspecified, "unspecified"), (ip.is_loopback, "loopback"),
                       (ip.is_link_local, "link-local"), (ip.is_multicast, "multicast")):
        if test:
            return what
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (carrier-grade NAT)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    return "non-global"


def address_refusal(address: str) -> str | None:
    """Why ``address`` must not be fetched from (None if it is a globally routable unicast address).

    Anything that is not ``is_global`` is refused (loopback, private, shared/carrier-grade NAT space that
    holds cloud metadata endpoints, link-local, documentation and benchmarking ranges, reserved), and so is
    a global-looking IPv6 address that embeds such an IPv4 (IPv4-mapped, NAT64, 6to4, Teredo).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            if ip.ipv4_mapped is not None:  # the IPv4 address itself, written the IPv6 way
                return None if inner.is_global and not inner.is_multicast else _label(inner)
            if not inner.is_global or inner.is_multicast:
                return f"{_label(inner)} (IPv4 {inner} embedded)"
    if ip.is_global and not ip.is_multicast:
        return None
    return _label(ip)


class SafeResolver(AbstractResolver):
    """Wrap the default resolver and drop addresses we must not connect to."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if address_refusal(r["host"]) is None]
        if not allowed:
            reason = address_refusal(results[0]["host"]) if results else "no address"
            raise RefusedAddress(f"refused {reason} address {results[0]['host'] if results else ''}".strip())
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def robots_disallowed(values: list[str], disallowed: tuple[str, ...], agent: str) -> str | None:
    """The first disallowed ``X-Robots-Tag`` directive that applies to us, else None.

    A value is either a directive list ``noai, noimageai`` (applies to every agent) or scoped to one agent,
    ``otherbot: noindex`` (applies only if the agent is ours or ``*``).
    """
    if not disallowed:
        return None
    ours = {"*", "mmprep", "img2dataset", agent.lower()}
    for value in values:
        scope, directives = None, value
        head, sep, rest = value.partition(":")
        if sep and "," not in head and head.strip().lower() not in ("unavailable_after",):
            scope, directives = head.strip().lower(), rest
        if scope is not None and scope not in ours:
            continue
        for directive in directives.split(","):
            directive = directive.strip().lower()
            if directive in disallowed:
                return directive
    return None


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from datetime import datetime, timezone

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


class _Failure(Exception):
    def __init__(self, message: str, transient: bool, retry_after: float | None = None):
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class Fetcher:
    """An aiohttp session configured from :class:`DownloadOptions`; use as ``async with``."""

    def __init__(self, options: DownloadOptions, concurrency: int | None = None):
        self.options = options
        self.concurrency = concurrency or options.threads
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random(0)

    async def __aenter__(self) -> "Fetcher":
        connector = aiohttp.TCPConnector(
            limit=self.concurrency, limit_per_host=min(self.options.max_connections_per_host, self.concurrency),
            ttl_dns_cache=300, use_dns_cache=True, resolver=SafeResolver(self.options.allow_private_addresses),
            keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": self.options.user_agent, "Accept": "image/*,*/*;q=0.8"},
            timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True, trust_env=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> FetchResult:
        """Fetch ``url`` within the deadline, retrying transient failures; never raises for remote faults."""
        options = self.options
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(options.timeout):
                    body = await self._fetch_once(url)
                return FetchResult(body, attempts=attempt)
            except _Failure as failure:
                error, transient, retry_after = str(failure), failure.transient, failure.retry_after
            except TimeoutError:
                error, transient, retry_after = f"timed out after {options.timeout:g}s", True, None
            except aiohttp.ClientConnectorDNSError as exc:
                cause = exc.__cause__
                if isinstance(cause, RefusedAddress):
                    return FetchResult(None, str(cause), False, attempt)
                return FetchResult(None, f"DNS lookup failed: {cause or exc}", False, attempt)
            except aiohttp.ClientPayloadError:
                error, transient, retry_after = "connection closed before the body was complete", True, None
            except (aiohttp.ClientConnectionError, ConnectionError) as exc:
                error, transient, retry_after = f"connection error: {type(exc).__name__}", True, None
            except (aiohttp.ClientError, ValueError, UnicodeError) as exc:
                return FetchResult(None, f"request failed: {type(exc).__name__}: {exc}"[:200], False, attempt)
            if not transient or attempt > options.retries:
                return FetchResult(None, error, transient, attempt)
            wait = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
            if retry_after is not None:
                if retry_after > options.timeout:
                    return FetchResult(None, f"{error} (Retry-After {retry_after:g}s exceeds timeout)", True,
                                       attempt)
                wait = max(wait, retry_after)
            await asyncio.sleep(wait)

    def _check_target(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _Failure(f"unsupported URL scheme {parts.scheme or '(none)'!r}", False)
        if not parts.hostname:
            raise _Failure("URL has no host", False)
        if not self.options.allow_private_addresses:
            try:
                ipaddress.ip_address(parts.hostname)
            except ValueError:
                return  # a name: checked by the resolver on the address actually used
            reason = address_refusal(parts.hostname)
            if reason:
                raise _Failure(f"refused {reason} address {parts.hostname}", False)

    async def _fetch_once(self, url: str) -> bytes:
        assert self._session is not None
        options = self.options
        current = url
        for _hop in range(options.max_redirects + 1):
            self._check_target(current)
            async with self._session.get(current, allow_redirects=False) as response:
                status = response.status
                if status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise _Failure(f"HTTP {status} without Location", False)
                    current = urljoin(current, location)
                    continue
                if status != 200:
                    transient = status >= 500 or status in (408, 429)
                    retry_after = _retry_after_seconds(response.headers.get("Retry-After")) \
                        if status in (429, 503) else None
                    raise _Failure(f"HTTP {status}", transient, retry_after)
                directive = robots_disallowed(response.headers.getall("X-Robots-Tag", []),
                                              options.disallowed_header_directives,
                                              options.user_agent_token or "mmprep")
                if directive:
                    raise _Failure(f"X-Robots-Tag forbids use ({directive})", False)
                length = response.content_length
                if length is not None and length > options.max_image_bytes:
                    raise _Failure(f"image larger than max_image_bytes ({length} bytes)", False)
                if length is not None:  # the common case: one read of a known size
                    body = await response.read()
                    if len(body) > options.max_image_bytes:
                        raise _Failure(f"image larger than max_image_bytes ({len(body)} bytes)", False)
                    return body
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > options.max_image_bytes:
                        raise _Failure(f"image larger than max_image_bytes (over {options.max_image_bytes} bytes)",
                                       False)
                    chunks.append(chunk)
                return b"".join(chunks)
        raise _Failure(f"too many redirects (more than {options.max_redirects})", False)
