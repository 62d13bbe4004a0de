"""The download fetcher's own HTTP/1.1 client against raw loopback servers that answer with exact bytes.

These cover what the image host of the other tests never sends: chunked and connection-delimited bodies,
gzip encodings (and a gzip bomb), oversized heads, kept-alive connections the server drops, and the bound
on open connections across hosts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
from typing import Awaitable, Callable

from airflow_provider_mmprep.download.fetcher import HEAD_LIMIT_BYTES, Fetcher, FetchResult
from airflow_provider_mmprep.download.options import parse_options

Reply = Callable[[int], bytes | None]  # request number on this connection -> raw reply (None: close)


class RawServer:
    """A loopback server; ``reply(n)`` gives the raw bytes for the ``n``-th request of a connection."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            number = 0
            while True:
                try:
                    self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                data = self.reply(number)
                number += 1
                if data is None:
                    return
                writer.write(data)
                await writer.drain()
                if b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n":
                    return
        finally:
            self.open -= 1
            writer.close()


def options(**changes: object):
    base = parse_options({"timeout": 3}, threads=4, processes=1)
    return dataclasses.replace(base, **{"allow_private_addresses": True, **changes})


def run(body: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(body())


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


IMAGE = bytes(range(256)) * 40


def fetch_all(server_reply: Reply, paths: list[str], **changes: object) -> tuple[list[FetchResult], RawServer]:
    async def body() -> tuple[list[FetchResult], RawServer]:
        async with RawServer(server_reply) as server, Fetcher(options(**changes)) as fetcher:
            return [await fetcher.fetch(server.url + path) for path in paths], server

    return run(body)  # type: ignore[return-value]


def test_kept_alive_connection_serves_every_request() -> None:
    results, server = fetch_all(lambda n: reply(IMAGE, f"Content-Length: {len(IMAGE)}"), ["/a", "/b", "/c"])
    assert [r.body for r in results] == [IMAGE] * 3
    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("GET /a HTTP/1.1\r\nHost: 127.0.0.1:") and "User-Agent: mmprep/" in first


def test_chunked_and_connection_delimited_bodies() -> None:
    chunked = (b"%x\r\n" % 1000) + IMAGE[:1000] + b"\r\n" + (b"%x\r\n" % (len(IMAGE) - 1000)) + IMAGE[1000:] \
        + b"\r\n0\r\n\r\n"
    results, _ = fetch_all(lambda n: reply(chunked, "Transfer-Encoding: chunked"), ["/c"])
    assert results[0].body == IMAGE
    results, _ = fetch_all(lambda n: reply(IMAGE, "Connection: close") if n == 0 else None, ["/eof"])
    assert results[0].body == IMAGE  # no length: the body ends with the connection


def test_a_body_cut_short_is_a_transient_failure() -> None:
    results, _ = fetch_all(lambda n: reply(IMAGE[:100], f"Content-Length: {len(IMAGE)}", "Connection: close")
                           if n == 0 else None, ["/t"])
    assert results[0].body is None and results[0].transient
    assert results[0].error == "connection closed before the body was complete"


def test_gzip_bodies_are_decoded_within_the_size_cap() -> None:
    packed = gzip.compress(IMAGE)
    results, _ = fetch_all(lambda n: reply(packed, f"Content-Length: {len(packed)}", "Content-Encoding: gzip"),
                           ["/g"])
    assert results[0].body == IMAGE
    bomb = gzip.compress(bytes(10_000_000))  # ~10 KB on the wire, 10 MB decoded
    results, _ = fetch_all(lambda n: reply(bomb, f"Content-Length: {len(bomb)}", "Content-Encoding: gzip"),
                           ["/bomb"], max_image_bytes=1_000_000)
    assert results[0].body is None and not results[0].transient
    assert "max_image_bytes" in (results[0].error or "")


def test_bodies_over_the_cap_are_refused_while_reading() -> None:
    chunk = b"x" * 4096
    endless = b"".join((b"%x\r\n" % len(chunk)) + chunk + b"\r\n" for _ in range(100)) + b"0\r\n\r\n"
    results, _ = fetch_all(lambda n: reply(endless, "Transfer-Encoding: chunked"), ["/big"], max_image_bytes=50_000)
    assert results[0].body is None and "max_image_bytes" in (results[0].error or "")
    assert not results[0].transient


def test_an_endless_response_head_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * (HEAD_LIMIT_BYTES + 10) + b"\r\n\r\n"
    unfinished = head[:-4]  # a header line that never ends
    for raw in (head, unfinished):
        results, _ = fetch_all(lambda n, raw=raw: raw, ["/h"])
        assert results[0].body is None and not results[0].transient
        assert "response head larger than" in (results[0].error or "")


def test_a_kept_alive_connection_the_server_dropped_is_replaced() -> None:
    # the server answers one request per connection but says keep-alive: the second fetch finds the pooled
    # connection closed (or closing) and goes through on a new one
    results, server = fetch_all(lambda n: reply(IMAGE, f"Content-Length: {len(IMAGE)}") if n == 0 else None,
                                ["/1", "/2", "/3"])
    assert [r.body for r in results] == [IMAGE] * 3
    assert server.connections == 3


def test_open_connections_never_exceed_the_concurrency_across_hosts() -> None:
    async def body() -> tuple[list[FetchResult], int]:
        servers = [RawServer(lambda n: reply(IMAGE, f"Content-Length: {len(IMAGE)}")) for _ in range(5)]
        for server in servers:
            await server.__aenter__()
        most = 0
        try:
            async with Fetcher(options(), concurrency=2) as fetcher:
                results = []
                for _round in range(2):
                    for server in servers:
                        results.append(await fetcher.fetch(server.url + "/x"))
                        await asyncio.sleep(0.01)  # let the servers see closed connections
                        most = max(most, sum(s.open for s in servers))
        finally:
            for server in servers:
                await server.__aexit__()
        return results, most

    results, most = run(body)  # type: ignore[misc]
    assert all(r.body == IMAGE for r in results)
    assert most <= 2  # idle connections to earlier hosts were closed to make room


def test_status_robots_and_redirects_through_raw_replies() -> None:
    def answer(n: int) -> bytes:
        return [reply(b"", "Location: /next", "Content-Length: 0", status="302 Found"),
                reply(b"nope", "Content-Length: 4", status="503 Service Unavailable"),
                reply(IMAGE, f"Content-Length: {len(IMAGE)}", "X-Robots-Tag: otherbot: noai"),
                reply(IMAGE, f"Content-Length: {len(IMAGE)}", "X-Robots-Tag: mmprep: noimageai")][n % 4]

    results, server = fetch_all(answer, ["/start", "/robots-other", "/robots-ours"])
    assert results[0].error == "HTTP 503" and results[0].transient  # the 302 was followed to /next
    assert b"GET /next " in server.requests[1]
    assert results[1].body == IMAGE  # a directive scoped to another agent does not apply
    assert results[2].error == "X-Robots-Tag forbids use (noimageai)"


def test_names_are_resolved_and_their_addresses_checked_before_connecting() -> None:
    async def body() -> tuple[FetchResult, FetchResult, int]:
        async with RawServer(lambda n: reply(IMAGE, f"Content-Length: {len(IMAGE)}")) as server:
            named = server.url.replace("127.0.0.1", "localhost")
            async with Fetcher(options()) as fetcher:
                allowed = await fetcher.fetch(named + "/ok")
            async with Fetcher(options(allow_private_addresses=False)) as fetcher:
                refused = await fetcher.fetch(named + "/metadata")
            return allowed, refused, len(server.requests)

    allowed, refused, requests = run(body)  # type: ignore[misc]
    assert allowed.body == IMAGE
    assert refused.body is None and not refused.transient
    assert (refused.error or "").startswith("refused loopback address")
    assert requests == 1  # the refused name never reached the server
