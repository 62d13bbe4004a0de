"""A Hugging Face Hub–compatible endpoint on loopback, serving dataset repos held in memory.

It answers the calls huggingface_hub makes to list and download a dataset repo (``repo_info``,
``list_repo_tree``, ``HEAD``/``GET .../resolve/...`` with byte ranges), so tests, the demo and benchmarks
drive the real client through ``HF_ENDPOINT`` without any network. Faults can be injected per file to test
resume (``cut_after``: the next N downloads of that file are cut after that many bytes).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_REV_RE = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)$")
_TREE_RE = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_PATHS_RE = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)$")
_RESOLVE_RE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class _Fault:
    cut_after: int
    times: int


@dataclass
class FakeHub:
    """The repos served: ``repos[repo_id][path] = bytes``. Counters record what clients fetched."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    downloads: dict[str, int] = field(default_factory=dict)  # path -> GET bodies started
    ranges: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header) per GET
    authorizations: set[str] = field(default_factory=set)  # Authorization headers seen
    bytes_sent: int = 0
    faults: dict[str, _Fault] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = dict(files)

    def cut_download(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Make the next ``times`` downloads of ``path`` drop the connection after ``after_bytes``."""
        self.faults[path] = _Fault(after_bytes, times)

    def commit_sha(self, repo_id: str) -> str:
        digest = hashlib.sha1()
        for path, data in sorted(self.repos[repo_id].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
        return digest.hexdigest()


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # helpers
    def _json(self, body: object, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _repo(self, repo_id: str, rev: str) -> dict[str, bytes] | None:
        files = self.hub.repos.get(repo_id)
        if files is None:
            self._not_found("RepoNotFound", "Repository not found")
            return None
        if rev not in ("main", self.hub.commit_sha(repo_id)):
            self._not_found("RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return files

    def _tree_entry(self, path: str, data: bytes) -> dict[str, object]:
        return {"type": "file", "oid": _blob_id(data), "size": len(data), "path": path,
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}

    # verbs
    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        match = _PATHS_RE.match(urlparse(self.path).path)
        if not match:
            return self._not_found("EntryNotFound", "unknown route")
        files = self._repo(unquote(match["repo"]), unquote(match["rev"]))
        if files is None:
            return None
        wanted = []
        text = body.decode(errors="replace")
        if "application/json" in (self.headers.get("Content-Type") or ""):
            wanted = json.loads(text or "{}").get("paths", [])
        else:
            from urllib.parse import parse_qs
            wanted = parse_qs(text).get("paths", [])
        return self._json([self._tree_entry(p, files[p]) for p in wanted if p in files])

    def _route(self) -> None:
        if auth := self.headers.get("Authorization"):
            self.hub.authorizations.add(auth)
        url = urlparse(self.path)
        path = url.path
        if match := _REV_RE.match(path):
            repo_id, rev = unquote(match["repo"]), unquote(match["rev"])
            files = self._repo(repo_id, rev)
            if files is None:
                return
            return self._json({"id": repo_id, "sha": self.hub.commit_sha(repo_id), "private": False,
                               "siblings": [{"rfilename": p} for p in sorted(files)]})
        if match := _TREE_RE.match(path):
            files = self._repo(unquote(match["repo"]), unquote(match["rev"]))
            if files is None:
                return
            prefix = unquote(match["path"] or "").strip("/")
            entries = [self._tree_entry(p, d) for p, d in sorted(files.items())
                       if not prefix or p.startswith(prefix + "/")]
            folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
            return self._json(entries)
        if match := _RESOLVE_RE.match(path):
            repo_id, rev, file_path = unquote(match["repo"]), unquote(match["rev"]), unquote(match["path"])
            files = self._repo(repo_id, rev)
            if files is None:
                return
            if file_path not in files:
                return self._not_found("EntryNotFound", f"{file_path} does not exist")
            return self._send_file(repo_id, file_path, files[file_path])
        self._not_found("EntryNotFound", "unknown route")

    def _send_file(self, repo_id: str, file_path: str, data: bytes) -> None:
        start, end = 0, len(data) - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and (m := re.match(r"bytes=(\d+)-(\d*)", range_header)):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else end
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", self.hub.commit_sha(repo_id))
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.hub.lock:
            self.hub.downloads[file_path] = self.hub.downloads.get(file_path, 0) + 1
            self.hub.ranges.append((file_path, range_header))
            fault = self.hub.faults.get(file_path)
            if fault and fault.times > 0:
                fault.times -= 1
            else:
                fault = None
        if fault is not None:
            self.wfile.write(body[: fault.cut_after])
            self.wfile.flush()
            self.hub.bytes_sent += min(len(body), fault.cut_after)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
        self.hub.bytes_sent += len(body)


class HubServer:
    """Run a :class:`FakeHub` on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, hub: FakeHub | None = None, port: int = 0):
        self.hub = hub or FakeHub()
        handler = type("Handler", (_Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
