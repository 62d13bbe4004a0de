"""A loopback HTTP/1.1 image host with random latency and the faults real image hosts produce.

It runs an asyncio server in a background thread (so thousands of slow replies cost no threads), speaks
keep-alive HTTP/1.1, and is cheap enough per request that a benchmark measures the client, not the host.

Usage::

    with ImageHost(latency=(0.02, 0.2), seed=0) as host:
        host.add("/img/1.jpg", jpeg_bytes)          # serve a body (Content-Type guessed from the suffix)
        url = host.url("/img/1.jpg")
        bad = host.url("/fault/500")                # always answers 500
        ...
    host.hits["/img/1.jpg"]                         # how many requests each path received
    host.user_agents                                # Counter of User-Agent values received
    host.timeline                                   # with record_timeline=True: (received, answered) times
    host.arrivals["/img/1.jpg"]                     # when the first request for a path arrived
    host.max_in_flight                              # most requests open at once (hanging ones included)

Fault routes (``/fault/<kind>[/<any id>][?params]``; the id only makes URLs distinct):

============================  ======================================================================
``404`` ``500`` (any code)    that status, short text body
``429``                       429 with ``Retry-After: <retry_after, default 1>``
``flaky/<id>?fail=N&code=C``  status C (default 503) for the first N requests of that path, then an image
``reset``                     the connection is reset (RST) without any reply
``hang``                      accepts, reads the request, never answers (until the client closes)
``truncated``                 promises the full image in Content-Length, sends half, closes
``truncated-jpeg``            a well-formed reply whose body is a JPEG cut in half
``html``                      200 ``text/html`` page instead of an image
``empty``                     200 ``image/jpeg`` with an empty body
``drip?rate=B&every=S``       200 with a full image, sent B bytes every S seconds (defaults 1 and 1)
``ok``                        a small valid JPEG
``redirect?to=/path``         302 to ``to`` (default ``/fault/ok``)
``redirect-loop``             302 to itself, forever
``bomb``                      a tiny PNG declaring 30000×30000 pixels (a decompression bomb)
``noai``                      a valid image with ``X-Robots-Tag: noai, noimageai``
============================  ======================================================================

Latency ``(low, high)`` delays every reply by a uniform random time from a generator seeded with ``seed``;
``tail=(share, low, high)`` gives that share of replies a longer delay instead (a long-tailed host).
``record_timeline`` keeps the wall-clock time each request arrived and its reply was sent, so a benchmark can
tell how many requests a client kept in flight and what the latencies allow at best.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit



_CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                  "gif": "image/gif", "html": "text/html", "txt": "text/plain"}
_REASONS = {200: "OK", 302: "Found", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass
class Resource:
    body: bytes
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def decompression_bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit PNG of ``width``×``height`` white pixels: ~100 KB on the wire, gigapixels decoded.

    Built in milliseconds, not the second zlib would take over the whole image (which held up every other
    reply of a host under load): 256 rows are deflated once from a fresh state and the output repeated
    (copies that refer to nothing before them concatenate into one valid stream), the Adler-32 computed
    over the data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    block = row * 256
    full, rest = divmod(height, 256)
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, not final
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    ending = last.compress(row * rest) + last.flush(zlib.Z_FINISH)
    checksum = 1
    for _ in range(full):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    stream = b"\x78\xda" + repeated * full + ending + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream)
            + chunk(b"IEND", b""))


class ImageHost:
    """Serve registered bodies and fault routes on ``http://127.0.0.1:<port>``; see the module doc."""

    def __init__(self, resources: dict[str, bytes] | None = None, latency: tuple[float, float] = (0.0, 0.0),
                 seed: int = 0, host: str = "127.0.0.1", port: int = 0, default_image: bytes | None = None,
                 record_timeline: bool = False, tail: tuple[float, float, float] | None = None):
        self.resources: dict[str, Resource] = {}
        for path, body in (resources or {}).items():
            self.add(path, body)
        self.latency = latency
        self.tail = tail  # (share, low, high): that share of replies is delayed uniform(low, high) instead
        self.host, self.port = host, port
        self.hits: Counter[str] = Counter()
        self.user_agents: Counter[str] = Counter()  # User-Agent header values received
        self.timeline: list[tuple[float, float]] | None = [] if record_timeline else None
        self.arrivals: dict[str, float] = {}  # path -> when its first request arrived
        self.in_flight = 0  # requests received and not yet answered (hanging ones included)
        self.max_in_flight = 0
        self._rng = random.Random(seed)
        self._default_image = default_image
        self._bomb: bytes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    # ---- public API ---------------------------------------------------------------------------------
    def add(self, path: str, body: bytes, content_type: str | None = None,
            headers: dict[str, str] | None = None) -> str:
        """Serve ``body`` at ``path``; returns its URL (valid once started, the port being known then)."""
        if not path.startswith("/"):
            path = "/" + path
        if content_type is None:
            content_type = _CONTENT_TYPES.get(path.rsplit(".", 1)[-1].lower(), "application/octet-stream")
        self.resources[path] = Resource(body, content_type, dict(headers or {}))
        return self.url(path) if self.port else path

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host}:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ImageHost":
        self._thread = threading.Thread(target=self._run, name="image-host", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("image host did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "ImageHost":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- server -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:  # uvloop, where installed, makes the host cheap enough not to be what a benchmark measures
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(4096)
        self.port = sock.getsockname()[1]
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, sock=sock, backlog=4096))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _image(self) -> bytes:
        if self._default_image is None:
            from .sample_data import make_jpeg
            self._default_image = make_jpeg(0, (64, 48))
        return self._default_image

    async def _delay(self) -> None:
        low, high = self.latency
        if self.tail is not None and self._rng.random() < self.tail[0]:
            low, high = self.tail[1:]
        if high > 0:
            await asyncio.sleep(self._rng.uniform(low, high))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                if len(parts) < 2:
                    return
                method, target = parts[0], parts[1]
                for line in head.split(b"\r\n")[1:]:
                    if line[:11].lower() == b"user-agent:":
                        self.user_agents[line[11:].strip().decode("latin-1")] += 1
                keep_alive = b"connection: close" not in head.lower()
                received = time.time()
                self.arrivals.setdefault(urlsplit(target).path, received)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    connection_usable = await self._respond(method, target, writer, keep_alive, reader)
                finally:
                    self.in_flight -= 1
                if self.timeline is not None:
                    self.timeline.append((received, time.time()))
                if not connection_usable:
                    return
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                    headers: dict[str, str] | None = None, keep_alive: bool = True, method: str = "GET",
                    content_length: int | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body) if content_length is None else content_length}",
                 "Connection: keep-alive" if keep_alive else "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()

    async def _respond(self, method: str, target: str, writer: asyncio.StreamWriter, keep_alive: bool,
                       reader: asyncio.StreamReader | None = None) -> bool:
        """Answer one request; False when the connection must end after it."""
        split = urlsplit(target)
        path, params = split.path, {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.hits[path] += 1
        await self._delay()
        resource = self.resources.get(path)
        if resource is not None:
            await self._send(writer, 200, resource.body, resource.content_type, resource.headers, keep_alive, method)
            return True
        if not path.startswith("/fault/"):
            await self._send(writer, 404, b"not found", "text/plain", keep_alive=keep_alive, method=method)
            return True
        kind = path[len("/fault/"):].split("/", 1)[0]
        image = self._image()
        if kind == "429":
            await self._send(writer, 429, b"slow down", "text/plain",
                             {"Retry-After": params.get("retry_after", "1")}, keep_alive, method)
        elif kind.isdigit():
            await self._send(writer, int(kind), b"error", "text/plain", keep_alive=keep_alive, method=method)
        elif kind == "flaky":
            if self.hits[path] <= int(params.get("fail", "1")):
                code = int(params.get("code", "503"))
                extra = {"Retry-After": params["retry_after"]} if "retry_after" in params else {}
                await self._send(writer, code, b"try again", "text/plain", extra, keep_alive, method)
            else:
                await self._send(writer, 200, image, "image/jpeg", keep_alive=keep_alive, method=method)
        elif kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif kind == "hang":  # until the client gives up and closes the connection
            if reader is not None:
                await reader.read()
            else:
                await asyncio.sleep(3600)
            return False
        elif kind == "truncated":
            await self._send(writer, 200, image[: len(image) // 2], "image/jpeg", keep_alive=False, method=method,
                             content_length=len(image))
            return False
        elif kind == "truncated-jpeg":
            await self._send(writer, 200, image[: len(image) // 2], "image/jpeg", keep_alive=keep_alive,
                             method=method)
        elif kind == "html":
            await self._send(writer, 200, b"<!doctype html><html><body>Not an image</body></html>", "text/html",
                             keep_alive=keep_alive, method=method)
        elif kind == "empty":
            await self._send(writer, 200, b"", "image/jpeg", keep_alive=keep_alive, method=method)
        elif kind == "drip":
            rate, every = max(1, int(params.get("rate", "1"))), float(params.get("every", "1"))
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode())
            for offset in range(0, len(image), rate):
                if writer.is_closing():  # the client gave up
                    return False
                writer.write(image[offset: offset + rate])
                await writer.drain()
                await asyncio.sleep(every)
            return False
        elif kind == "redirect":
            await self._send(writer, 302, b"", "text/plain", {"Location": params.get("to", "/fault/ok")},
                             keep_alive, method)
        elif kind == "redirect-loop":
            await self._send(writer, 302, b"", "text/plain", {"Location": target}, keep_alive, method)
        elif kind == "ok":
            await self._send(writer, 200, image, "image/jpeg", keep_alive=keep_alive, method=method)
        elif kind == "bomb":
            if self._bomb is None:
                self._bomb = decompression_bomb_png()
            await self._send(writer, 200, self._bomb, "image/png", keep_alive=keep_alive, method=method)
        elif kind == "noai":
            await self._send(writer, 200, image, "image/jpeg", {"X-Robots-Tag": "noai, noimageai"}, keep_alive,
                             method)
        else:
            await self._send(writer, 404, b"unknown fault", "text/plain", keep_alive=keep_alive, method=method)
        return True
