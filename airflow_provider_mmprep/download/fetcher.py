"""Fetch image bytes over HTTP(S) with the bounds an internet-scale crawl needs.

Why an event loop and not requests: a thread per in-flight request cannot keep thousands of slow hosts busy on
a few cores (see docs/download_images.md for the figures); one event loop per process can. Why our own small
HTTP/1.1 client on an ``asyncio.Protocol`` with httptools' C parser instead of aiohttp's session: a crawl
makes one plain GET per URL and needs none of a general client's per-request machinery (request and
response objects, streams, tracing, cookie and proxy handling); at 2 x 256 fetches that machinery was most of
the event loop's CPU. Each fetch has:

- one deadline (``timeout``) for the whole attempt: connect, every redirect hop, headers and the full body,
  so a host dripping a byte per second fails at the deadline instead of stalling a worker for minutes;
- pooled keep-alive connections (idle ones closed after ``KEEPALIVE_SECONDS``; open connections, idle
  ones included, never more than the fetcher's ``concurrency``), a DNS cache (``DNS_TTL_SECONDS``), a
  per-host connection cap, manual redirects (capped, each hop's scheme and address checked);
- a size cap (Content-Length checked first, then counted while reading; a gzip/deflate body is capped after
  decoding too) and a cap on the response head (``HEAD_LIMIT_BYTES``);
- retries with exponential backoff for transient failures only: connection errors, timeouts, 5xx, 408 and
  429 (``Retry-After`` honoured when it fits within ``timeout``);
- ``X-Robots-Tag`` directives honoured;
- every address that is not globally routable refused (loopback, private, shared/carrier-grade NAT and
  link-local, where cloud metadata endpoints live, multicast, reserved; IPv6 forms that embed such an IPv4
  too), checked on the addresses the connection will use (the resolved addresses are filtered before
  connecting, so DNS rebinding cannot slip past), unless ``allow_private_addresses``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable
from urllib.parse import urljoin

import aiohappyeyeballs
import httptools
from yarl import URL

from .options import DownloadOptions

_REDIRECTS = (301, 302, 303, 307, 308)
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
#: An idle keep-alive connection is closed after this long unused.
KEEPALIVE_SECONDS = 30.0
#: Resolved addresses are reused for this long.
DNS_TTL_SECONDS = 300.0
#: A response whose status line and headers exceed this is refused (a server streaming headers forever).
HEAD_LIMIT_BYTES = 64 * 1024
#: Happy eyeballs: start the next address of a host after this long without a connection.
HAPPY_EYEBALLS_DELAY = 0.25


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


class ServerDisconnectedError(ConnectionError):
    """The server closed the connection before the response head was complete."""


class _BodyIncomplete(Exception):
    """The connection ended before the body its head announced was complete."""


class _BadResponse(ValueError):
    """Not an HTTP/1.x response (or a head over ``HEAD_LIMIT_BYTES``)."""


#: Response headers the fetcher reads; the others are skipped without decoding.
_WANTED_HEADERS = frozenset({b"location", b"retry-after", b"x-robots-tag", b"content-encoding",
                             b"transfer-encoding", b"content-length"})


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: sends a GET, parses the reply with httptools (C) as it arrives.

    Per request it allocates one future and the body chunks; the parser, this object and the socket are
    reused for every request the connection carries. The waiting request is woken once: at the end of the
    head when the body is not wanted (not 200, an X-Robots-Tag that forbids it, Content-Length over the cap), else
    when the body is complete."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.released_at = 0.0
        self.waiter: asyncio.Future | None = None
        self.refused: Callable[[list[str]], str | None] = lambda _values: None
        self._begin(0)

    def _begin(self, cap: int) -> None:
        self.cap = cap
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.head_bytes = 0  # bytes received while the head is incomplete
        self.head_size = 0  # bytes of the header lines
        self.content_length: int | None = None
        self.head_done = False
        self.message_done = False
        self.want_body = False
        self.keep_alive = False

    def request(self, data: bytes, cap: int, refused: Callable[[list[str]], str | None]) -> asyncio.Future:
        """Send one request; the returned future completes as described in the class doc. ``refused`` says
        whether X-Robots-Tag values forbid the image (then its body is not read)."""
        self._begin(cap)
        self.refused = refused
        self.waiter = waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return waiter

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # nothing asked: a server talking out of turn
            self.close()
            return
        head_before = not self.head_done
        if head_before:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_BadResponse("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(_BadResponse(f"invalid HTTP response ({exc})"))
        else:
            if head_before and not self.head_done and self.head_bytes > HEAD_LIMIT_BYTES:
                self._fail(_BadResponse(f"response head larger than {HEAD_LIMIT_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if not self.head_done:
            waiter.set_exception(exc if isinstance(exc, OSError) else ServerDisconnectedError())
        elif self.want_body and self.content_length is None and not self._chunked():
            self.message_done = True  # a body delimited by the end of the connection (HTTP/1.0 style)
            waiter.set_result(None)
        else:
            waiter.set_exception(_BodyIncomplete())

    # --- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        name = name.lower()
        if name in _WANTED_HEADERS:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.status = status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response: the real one follows
            self.head_done = False
            self.headers = []
            return
        if self.head_size > HEAD_LIMIT_BYTES:
            self._fail(_BadResponse(f"response head larger than {HEAD_LIMIT_BYTES} bytes"))
            return
        length = self.header(b"content-length")
        if length is not None:
            try:
                self.content_length = int(length)
            except ValueError:
                self.content_length = None
        tags = self.header_values(b"x-robots-tag")
        self.want_body = (status == 200 and (self.content_length is None or self.content_length <= self.cap)
                          and not (tags and self.refused(tags)))
        if not self.want_body and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self.want_body:
            return  # an error page, a redirect's text: read past, never kept
        self.size += len(body)
        if self.size > self.cap:
            self._fail(_Failure(f"image larger than max_image_bytes (over {self.cap} bytes)", False))
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 and not self.head_done:
            return
        self.message_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # --- helpers
    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "surrogateescape")
        return None

    def header_values(self, name: bytes) -> list[str]:
        return [value.decode("utf-8", "surrogateescape") for key, value in self.headers if key == name]

    def _chunked(self) -> bool:
        value = self.header(b"transfer-encoding")
        return value is not None and "chunked" in value.lower()

    def body(self) -> bytes:
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def reusable(self) -> bool:
        return self.message_done and self.keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # no lingering: a half-read body or a hanging host is not worth waiting on


def _decode_content(body: bytes, encoding: str | None, cap: int) -> bytes:
    """Undo a gzip/deflate ``Content-Encoding`` (we never ask for one; some servers send it anyway), within
    ``cap`` bytes decoded. Other encodings are left as they are (the image check then refuses them)."""
    if not encoding:
        return body
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return body
    for wbits in ((47,) if encoding != "deflate" else (15, -15)):
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(body, cap + 1)
        except zlib.error:
            continue
        if len(out) > cap or decoder.unconsumed_tail:
            raise _Failure(f"image larger than max_image_bytes (over {cap} bytes after {encoding} decoding)",
                           False)
        return out
    raise _BadResponse(f"invalid {encoding} body")


class Fetcher:
    """An HTTP/1.1 client configured from :class:`DownloadOptions`; use as ``async with``.

    Connections are pooled per (scheme, host, port). ``max_connections_per_host`` bounds the requests to one
    host at a time (a request waits for a slot of its host, so new work goes to other hosts); ``concurrency``
    bounds the open connections, idle ones included (the oldest idle one is closed to make room)."""

    def __init__(self, options: DownloadOptions, concurrency: int | None = None):
        self.options = options
        self.concurrency = concurrency or options.threads
        self._per_host = max(1, min(options.max_connections_per_host, self.concurrency))
        self._rng = random.Random(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy: dict[tuple, int] = {}  # requests holding a slot of their host
        self._waiters: dict[tuple, deque[asyncio.Future]] = {}
        self._idle: dict[tuple, list[_Connection]] = {}
        self._idle_order: dict[_Connection, tuple] = {}  # every idle connection, oldest first
        self._open = 0
        self._dns: dict[tuple[str, int], tuple[float, list[tuple]]] = {}
        self._dns_pending: dict[tuple[str, int], asyncio.Future] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        agent = options.user_agent.replace("\r", " ").replace("\n", " ")
        self._head_tail = (f"User-Agent: {agent}\r\nAccept: image/*,*/*;q=0.8\r\nConnection: keep-alive\r\n\r\n"
                           ).encode("utf-8")
        self._robots_agent = options.user_agent_token or "mmprep"

    def _refused(self, values: list[str]) -> str | None:
        return robots_disallowed(values, self.options.disallowed_header_directives, self._robots_agent)

    async def __aenter__(self) -> "Fetcher":
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(KEEPALIVE_SECONDS / 2, self._sweep)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._idle_order):
            conn.close()
        self._idle.clear()
        self._idle_order.clear()

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
            except RefusedAddress as exc:
                return FetchResult(None, str(exc), False, attempt)
            except socket.gaierror as exc:
                return FetchResult(None, f"DNS lookup failed: {exc.strerror or exc}", False, attempt)
            except _BodyIncomplete:
                error, transient, retry_after = "connection closed before the body was complete", True, None
            except (ValueError, UnicodeError, TypeError) as exc:
                return FetchResult(None, f"request failed: {type(exc).__name__}: {exc}"[:200], False, attempt)
            except OSError as exc:  # refused, reset, unreachable, TLS failures, server disconnected
                error, transient, retry_after = f"connection error: {type(exc).__name__}", True, None
            if not transient or attempt > options.retries:
                return FetchResult(None, error, transient, attempt)
            wait = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
            if retry_after is not None:
                if retry_after > options.timeout:
                    return FetchResult(None, f"{error} (Retry-After {retry_after:g}s exceeds timeout)", True,
                                       attempt)
                wait = max(wait, retry_after)
            await asyncio.sleep(wait)

    def _check_target(self, url: URL) -> None:
        if url.scheme not in ("http", "https"):
            raise _Failure(f"unsupported URL scheme {url.scheme or '(none)'!r}", False)
        host = url.host
        if not host:
            raise _Failure("URL has no host", False)
        if not self.options.allow_private_addresses:
            try:
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return  # a name: its resolved addresses are checked before connecting
            reason = address_refusal(host)
            if reason:
                raise _Failure(f"refused {reason} address {host}", False)

    async def _fetch_once(self, url: str) -> bytes:
        options = self.options
        cap = options.max_image_bytes
        current = url
        for _hop in range(options.max_redirects + 1):
            parsed = URL(current)
            self._check_target(parsed)
            conn = await self._exchange(parsed, cap)
            status = conn.status
            if status in _REDIRECTS:
                location = conn.header(b"location")
                if not location:
                    raise _Failure(f"HTTP {status} without Location", False)
                current = urljoin(current, location)
                continue
            if status != 200:
                transient = status >= 500 or status in (408, 429)
                retry_after = _retry_after_seconds(conn.header(b"retry-after")) if status in (429, 503) else None
                raise _Failure(f"HTTP {status}", transient, retry_after)
            directive = self._refused(conn.header_values(b"x-robots-tag"))
            if directive:
                raise _Failure(f"X-Robots-Tag forbids use ({directive})", False)
            if conn.content_length is not None and conn.content_length > cap:
                raise _Failure(f"image larger than max_image_bytes ({conn.content_length} bytes)", False)
            return _decode_content(conn.body(), conn.header(b"content-encoding"), cap)
        raise _Failure(f"too many redirects (more than {options.max_redirects})", False)

    async def _exchange(self, url: URL, cap: int) -> _Connection:
        """One request on a pooled (or new) connection to ``url``'s host; the connection, its reply parsed
        (body complete when wanted). The host's slot and the connection are given back before returning."""
        https = url.scheme == "https"
        host = url.raw_host or ""
        port = url.port or (443 if https else 80)
        key = (https, host, port)
        target = url.raw_path_qs or "/"
        request = f"GET {target} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n".encode("ascii") + self._head_tail
        await self._acquire_slot(key)
        conn: _Connection | None = None
        try:
            for _try in range(2):
                conn = self._idle_connection(key)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(host, port, https)
                try:
                    await conn.request(request, cap, self._refused)
                except (ServerDisconnectedError, ConnectionResetError, BrokenPipeError):
                    # a kept-alive connection the server closed as we reused it: once more on a new one
                    if not reused:
                        raise
                    self._closed(conn)
                    conn = None
                    continue
                return conn
            raise ServerDisconnectedError()  # pragma: no cover - the second try always returns or raises
        finally:
            self._give_back(key, conn)

    # --- connection pool
    async def _acquire_slot(self, key: tuple) -> None:
        busy = self._busy.get(key, 0)
        waiters = self._waiters.get(key)
        if busy < self._per_host and not waiters:
            self._busy[key] = busy + 1
            return
        assert self._loop is not None
        waiter = self._loop.create_future()
        if waiters is None:
            waiters = self._waiters[key] = deque()
        waiters.append(waiter)
        try:
            await waiter  # the releasing request hands its slot over
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot(key)  # handed over just as we gave up: pass it on
            raise

    def _release_slot(self, key: tuple) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if waiters is not None:
            del self._waiters[key]
        left = self._busy[key] - 1
        if left:
            self._busy[key] = left
        else:
            del self._busy[key]

    def _give_back(self, key: tuple, conn: _Connection | None) -> None:
        if conn is not None:
            conn.waiter = None
            if conn.reusable():
                assert self._loop is not None
                conn.released_at = self._loop.time()
                self._idle.setdefault(key, []).append(conn)
                self._idle_order[conn] = key
            else:
                self._closed(conn)
        self._release_slot(key)

    def _idle_connection(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            del self._idle_order[conn]
            if not idle:
                del self._idle[key]
            assert self._loop is not None
            if not conn.closed and self._loop.time() - conn.released_at < KEEPALIVE_SECONDS:
                return conn
            self._closed(conn)
            idle = self._idle.get(key)
        return None

    def _closed(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _sweep(self) -> None:
        """Close idle connections unused for ``KEEPALIVE_SECONDS`` (their file descriptors go back)."""
        assert self._loop is not None
        now = self._loop.time()
        for conn, key in list(self._idle_order.items()):
            if not conn.closed and now - conn.released_at < KEEPALIVE_SECONDS:
                break
            self._drop_idle(conn, key)
        self._sweeper = self._loop.call_later(KEEPALIVE_SECONDS / 2, self._sweep)

    def _drop_idle(self, conn: _Connection, key: tuple) -> None:
        del self._idle_order[conn]
        idle = self._idle[key]
        idle.remove(conn)
        if not idle:
            del self._idle[key]
        self._closed(conn)

    async def _connect(self, host: str, port: int, https: bool) -> _Connection:
        infos = await self._resolve(host, port)
        while self._open >= self.concurrency and self._idle_order:  # make room: close the oldest idle one
            conn, key = next(iter(self._idle_order.items()))
            self._drop_idle(conn, key)
        assert self._loop is not None
        loop = self._loop
        self._open += 1
        try:
            sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                                                           interleave=1, loop=loop)
            try:
                context = self._ssl_context() if https else None
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(loop), sock=sock, ssl=context,
                    server_hostname=host.strip("[]") if https else None)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            self._open -= 1
            raise
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:  # created on the first https URL: it costs a few milliseconds
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _resolve(self, host: str, port: int) -> list[tuple]:
        """Addresses to connect to, cached for ``DNS_TTL_SECONDS``, those we must not use removed."""
        assert self._loop is not None
        key = (host, port)
        cached = self._dns.get(key)
        now = self._loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
            literal = True
        except ValueError:
            literal = False
        if literal:  # no lookup: the address is the URL's (already checked by _check_target)
            infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        else:
            pending = self._dns_pending.get(key)
            if pending is None:
                pending = self._dns_pending[key] = asyncio.ensure_future(self._lookup(bare, port))
                pending.add_done_callback(lambda done: self._lookup_done(key, done))
            infos = await asyncio.shield(pending)
        self._dns[key] = (now + DNS_TTL_SECONDS, infos)
        return infos

    def _lookup_done(self, key: tuple[str, int], done: asyncio.Future) -> None:
        self._dns_pending.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: every request waiting on it may have timed out meanwhile

    async def _lookup(self, host: str, port: int) -> list[tuple]:
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
        if self.options.allow_private_addresses:
            return infos
        allowed = [info for info in infos if address_refusal(info[4][0]) is None]
        if not allowed:
            address = infos[0][4][0] if infos else ""
            reason = address_refusal(address) if infos else "no address"
            raise RefusedAddress(f"refused {reason} address {address}".strip())
        return allowed
