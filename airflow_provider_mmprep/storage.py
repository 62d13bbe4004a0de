"""Where datasets live: a local folder or an fsspec URL (``s3://bucket/prefix``), behind one small API.

Stages name their folders by a string from the pipeline YAML; :func:`is_url` tells a URL (a scheme with
``://``, ``file://`` counting as local) from a path. :class:`Store` wraps one such folder. Local folders keep
today's fast paths (plain ``open``, ``pread``, temp name + ``os.replace``); URLs go through fsspec, so any
installed implementation works, with S3 (s3fs) the tested one. No Airflow here: in Airflow, credentials
reach the stage through the environment or ``storage_options``, as for any other process.

Guarantees on object stores, which have no rename:

* **atomic publish**: an object appears under its final key only complete. On S3, GCS and Azure a single PUT
  or a multipart upload is invisible until it completes, so we write the final key directly and abort the
  upload on error (s3fs's file objects would otherwise *commit* the partial data when closed after an
  exception). Elsewhere we write a temporary key beside the final one and move it.
* **leftovers**: a killed writer leaves at most a temporary key (``.{name}.{pid}.mmprep-tmp``) or an
  unfinished multipart upload (no object); :meth:`Store.remove_leftovers` deletes both for the names a task
  owns, so reruns start clean and readers never trust them (listings skip dot-names).
* **errors** about credentials, a missing bucket or an unreachable endpoint become :class:`StorageError`,
  one line naming the URL.

``storage_options`` (our pipeline-YAML key) is passed to the filesystem: either one flat mapping for every
URL (as pandas' ``storage_options``) or a mapping from URL prefixes (``"s3://bucket-a"``) to such mappings,
the longest matching prefix winning. Values may reference the environment as ``${env:NAME}`` (or OmegaConf's
``${oc.env:NAME}``), resolved only when the filesystem is made, so secrets never sit in the YAML, the plan
or a pod's arguments.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

from .fsutil import TMP_MARKER, atomic_path, remove_stale_temporaries

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_ENV_RE = re.compile(r"\$\{(?:oc\.)?env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")
#: protocols whose uploads are invisible until complete: the final key is written directly
DIRECT_COMMIT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
#: upload part size (also the memory an open writer buffers); S3 needs at least 5 MiB
PART_SIZE = 32 * 2**20
#: S3 client settings we default (a user's ``config_kwargs`` win): no SHA-256 of each upload's bytes for the
#: SigV4 signature (botocore already skips it over https; over plain http it hashed every byte, on both the
#: client and the server). Each body still carries botocore's CRC32 checksum, which the server verifies.
S3_CONFIG_DEFAULTS: dict[str, Any] = {"s3": {"payload_signing_enabled": False}}
#: ranged reads closer than this are fetched as one request
COALESCE_GAP = 1 * 2**20
#: … but a coalesced request stays below this
COALESCE_MAX = 64 * 2**20


class StorageError(OSError):
    """A storage problem a user must fix (credentials, bucket, endpoint, options): one line naming the URL."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://`` (and not for a Windows drive letter)."""
    match = _SCHEME_RE.match(os.fspath(path))
    return match is not None and match.group(1).lower() != "file"


def scheme(path: str | os.PathLike[str]) -> str:
    """The URL's protocol in lower case, ``""`` for a local path."""
    match = _SCHEME_RE.match(os.fspath(path))
    return match.group(1).lower() if match and is_url(path) else ""


def local_path(path: str | os.PathLike[str]) -> str:
    """A local path from a path or ``file://`` URL."""
    text = os.fspath(path)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def join(root: str | os.PathLike[str], *parts: str) -> str:
    """``root`` joined with relative ``parts``: ``/`` for URLs, the OS's way for paths."""
    text = os.fspath(root)
    if not is_url(text):
        return os.path.join(text, *parts)
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts if p)])


def relative_to(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` with ``/`` separators (both URLs or both paths)."""
    path_text, root_text = os.fspath(path), os.fspath(root)
    if is_url(root_text):
        prefix = root_text.rstrip("/") + "/"
        if not path_text.startswith(prefix):
            raise ValueError(f"{path_text} is not under {root_text}")
        return path_text[len(prefix):]
    return Path(os.path.relpath(path_text, root_text)).as_posix()


def _expand_env(value: Any, key_path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _expand_env(v, f"{key_path}.{k}", environ) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_expand_env(v, f"{key_path}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise StorageError(f"{key_path}: environment variable {name} is not set")

    return _ENV_RE.sub(substitute, value)


def resolve_options(storage_options: Mapping[str, Any] | None, url: str, *,
                    key_path: str = "storage_options", environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fsspec options for ``url``: the flat mapping, or the longest matching URL-prefix entry; with
    ``${env:NAME}`` references replaced from ``environ`` (default: the process environment)."""
    if not storage_options:
        return {}
    environ = os.environ if environ is None else environ
    options = dict(storage_options)
    if _is_prefixed(options):
        if not all("://" in str(k) for k in options):
            raise StorageError(f"{key_path}: mixes URL-prefix keys and option keys; use one form")
        matches = [k for k in options if url.rstrip("/") == k.rstrip("/") or url.startswith(k.rstrip("/") + "/")]
        if not matches:
            return {}
        chosen = max(matches, key=len)
        value = options[chosen]
        if not isinstance(value, Mapping):
            raise StorageError(f"{key_path}.{chosen}: must be a mapping of options")
        return _expand_env(dict(value), f"{key_path}.{chosen}", environ)
    return _expand_env(options, key_path, environ)


def _is_prefixed(options: Mapping[str, Any]) -> bool:
    return any("://" in str(k) for k in options)


def _merge_one(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; mappings under one key (``client_kwargs``, ``config_kwargs``) merged."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


_io_loop_lock = threading.Lock()


def io_loop() -> Any:
    """fsspec's IO loop (the one its async filesystems, s3fs among them, run their requests on, in a thread
    of its own), made a uvloop loop where this call is the first to ask for it and uvloop is installed.
    uvloop sends a request body from the caller's buffer; asyncio's transport (Python 3.11) copies whatever
    the socket does not take at once into a buffer of its own, fresh memory for every part: about 1 CPU-ms
    per MB uploaded on loopback, mostly page faults. One loop for every filesystem of the process, as
    fsspec has it (s3fs closes a client on whatever loop is running when it is collected)."""
    import asyncio  # noqa: PLC0415

    import fsspec.asyn  # noqa: PLC0415

    with _io_loop_lock:
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            return fsspec.asyn.get_loop()
        policy = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        try:
            return fsspec.asyn.get_loop()  # the existing loop if there is one (also after a fork: a new one)
        finally:
            asyncio.set_event_loop_policy(policy)


def with_client_defaults(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with our client defaults for ``protocol`` beneath the user's own: for S3,
    :data:`S3_CONFIG_DEFAULTS` under ``config_kwargs`` (and fsspec's loop made by :func:`io_loop`)."""
    out = dict(options)
    if protocol in ("s3", "s3a"):
        if "loop" not in out:
            io_loop()  # the client's default loop, made uvloop's if it is not there yet
        config = dict(out.get("config_kwargs") or {})
        for key, value in S3_CONFIG_DEFAULTS.items():
            config[key] = {**value, **(config.get(key) or {})} if isinstance(value, Mapping) else \
                config.get(key, value)
        out["config_kwargs"] = config
    return out


def merge_options(base: Mapping[str, Any] | None, options: Mapping[str, Any] | None,
                  urls: Iterable[str] = ()) -> dict[str, Any] | None:
    """The pipeline's ``storage_options`` on top of ``base``, a deployment's flat options (an Airflow
    connection's), in a form :func:`resolve_options` reads: the pipeline's keys win. With URL-prefix keys,
    each entry is merged over ``base``, and each scheme of ``urls`` gets ``base`` under ``"scheme://"`` (the
    shortest prefix), so a URL no entry matches still gets the connection's credentials."""
    if not base:
        return dict(options) if options else None
    if not options:
        return dict(base)
    if not _is_prefixed(options):
        return _merge_one(base, options)
    merged: dict[str, Any] = {k: _merge_one(base, v) if isinstance(v, Mapping) else v for k, v in options.items()}
    for url in urls:
        if is_url(url):
            merged.setdefault(f"{scheme(url)}://", dict(base))
    return merged


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn the client's credential, bucket and connection errors into :class:`StorageError` naming ``url``.

    A missing object stays a :class:`FileNotFoundError` (callers treat it as "not produced yet").
    """
    try:
        yield
    except StorageError:
        raise
    except PermissionError as exc:
        raise StorageError(f"{url}: access denied ({_one_line(exc)}); check the credentials "
                           "(storage_options, the Airflow connection or the storage client's environment)") from None
    except FileNotFoundError as exc:
        message = _one_line(exc)
        if "bucket" in message.lower():
            raise StorageError(f"{url}: the bucket does not exist ({message})") from None
        raise
    except Exception as exc:
        module = type(exc).__module__ or ""
        if module.startswith(("botocore", "aiobotocore", "aiohttp", "google.auth", "azure")):
            name = type(exc).__name__
            hint = "check the credentials" if "Credential" in name or "Auth" in name else \
                "check the endpoint and the network"
            raise StorageError(f"{url}: {name}: {_one_line(exc)}; {hint}") from None
        raise


#: part buffers kept for the next upload (page faults on fresh memory cost more CPU than the copy into it)
_POOL_KEEP = 2
_pool: list[bytearray] = []
_pool_lock = threading.Lock()


def _take_buffer(size: int) -> bytearray:
    with _pool_lock:
        for i, buffer in enumerate(_pool):
            if len(buffer) == size:
                return _pool.pop(i)
    return bytearray(size)


def _give_buffer(buffer: bytearray) -> None:
    with _pool_lock:
        if len(_pool) < _POOL_KEEP:
            _pool.append(buffer)


def _resize_in_place(buffer: bytearray, size: int) -> bool:
    """Set a bytearray's length without touching its bytes, where CPython does so without reallocating
    (the new length at least half the allocation); False where that is not possible."""
    try:
        import ctypes  # noqa: PLC0415
        resize = ctypes.pythonapi.PyByteArray_Resize
    except (ImportError, AttributeError):
        return False
    if size * 2 < buffer.__alloc__():
        return False
    resize.argtypes, resize.restype = (ctypes.py_object, ctypes.c_ssize_t), ctypes.c_int
    return resize(buffer, size) == 0


class S3Upload:
    """A write-only file object uploading to one S3 key (s3fs's client), committed by :meth:`close`: one PUT
    when everything fits in one part, else a multipart upload of ``part_size`` parts whose completion is the
    commit. :meth:`discard` aborts instead (no object appears; s3fs's own file objects commit on close).

    The bytes are gathered in one buffer of ``part_size`` that every part is sent from, so a byte is copied
    once on its way (into the buffer; :meth:`write_from` reads a file straight into it) instead of through
    s3fs's growing ``BytesIO`` and the copies taken out of it per part.
    """

    def __init__(self, fs: Any, path: str, part_size: int = PART_SIZE, url: str | None = None):
        self.fs, self.path, self.part_size = fs, path, part_size
        self.url = url or f"s3://{path}"
        self.bucket, self.key, _ = fs.split_path(path)
        self.closed = False
        self._buffer: bytearray | None = None
        self._view: memoryview | None = None
        self._fill = 0
        self._position = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    # -- file object -------------------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing to do: parts go out as they fill (and the rest at :meth:`close`)."""

    def _room(self) -> memoryview:
        if self.closed:
            raise ValueError(f"{self.path}: write to a closed upload")
        if self._view is None:
            self._buffer = _take_buffer(self.part_size)
            self._view = memoryview(self._buffer)
        return self._view[self._fill:]

    def write(self, data: Any) -> int:
        source = memoryview(data).cast("B")
        done = 0
        while done < len(source):
            room = self._room()
            take = min(len(room), len(source) - done)
            room[:take] = source[done:done + take]
            done += take
            self._filled(take)
        return done

    def write_from(self, source: BinaryIO) -> int:
        """Copy the rest of the (unbuffered-read capable) file ``source`` in, reading straight into the part
        buffer; returns how many bytes."""
        total = 0
        while True:
            got = source.readinto(self._room())  # type: ignore[attr-defined]
            if not got:
                return total
            total += got
            self._filled(got)

    def _filled(self, count: int) -> None:
        self._fill += count
        self._position += count
        if self._fill == self.part_size:
            self._send_part(self._buffer)
            self._fill = 0

    # -- requests ----------------------------------------------------------------------------------------
    def _call(self, method: str, **kwargs: Any) -> Any:
        with storage_errors(self.url):
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _send_part(self, body: bytes | bytearray | None) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        number = len(self._parts) + 1
        reply = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        part = {"PartNumber": number, "ETag": reply["ETag"]}
        if "ChecksumSHA256" in reply:  # as s3fs's files do
            part["ChecksumSHA256"] = reply["ChecksumSHA256"]
        self._parts.append(part)

    def _send_tail(self) -> None:
        """Send what is not sent yet (one PUT, or the last part), from the buffer itself where it can be cut
        to that length in place (a copy otherwise, of less than half a part)."""
        buffer, view, fill = self._buffer, self._view, self._fill
        if buffer is None or view is None:
            tail: bytes | bytearray = b""
            cut = False
        else:
            view.release()
            self._view = None
            cut = _resize_in_place(buffer, fill)
            tail = buffer if cut else bytes(memoryview(buffer)[:fill])
        self._buffer = None  # after an error it is dropped: a request the error left running may still read it
        if self._upload_id is None:
            self._call("put_object", Body=tail)
        elif tail:
            self._send_part(tail)
        if buffer is not None and (not cut or _resize_in_place(buffer, self.part_size)):
            _give_buffer(buffer)

    def close(self) -> None:
        """Commit: what was written becomes the object (once; later calls do nothing)."""
        if self.closed:
            return
        try:
            self._send_tail()
            if self._upload_id is not None:
                self._call("complete_multipart_upload", UploadId=self._upload_id,
                           MultipartUpload={"Parts": self._parts})
        except BaseException:
            self.discard()
            raise
        finally:
            self.closed = True
        self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Abort: nothing appears under the key (an unfinished multipart upload is aborted)."""
        self.closed = True
        if self._view is not None:
            self._view.release()
            self._view = None
        self._buffer = None  # not reused: a request an error left running may still read it
        upload, self._upload_id = self._upload_id, None
        if upload is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=upload)

    def __enter__(self) -> "S3Upload":
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def copy_file_into(target: Any, source: BinaryIO, chunk: int = 8 * 2**20) -> int:
    """Copy the rest of ``source`` into the writer ``target``: straight into an :class:`S3Upload`'s part
    buffer, else in ``chunk``-sized reads. Returns the bytes copied."""
    if hasattr(target, "write_from"):
        return int(target.write_from(source))
    total = 0
    while data := source.read(chunk):
        target.write(data)
        total += len(data)
    return total


class Store:
    """One dataset folder: a local directory or a URL prefix, with the filesystem that serves it.

    Names passed to the methods are relative to the folder, ``/``-separated.
    """

    def __init__(self, root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 key_path: str = "storage_options", _fs: Any = None):
        text = os.fspath(root)
        self.local = not is_url(text)
        self.storage_options = storage_options
        if self.local:
            self.root = os.path.abspath(local_path(text))
            self.fs: Any = None
            self._path = self.root
            self.protocol = "file"
        else:
            self.root = text.rstrip("/")
            self.protocol = scheme(text)
            if _fs is None:
                import fsspec
                options = with_client_defaults(self.protocol, resolve_options(storage_options, self.root,
                                                                              key_path=key_path))
                try:
                    _fs, _ = fsspec.core.url_to_fs(self.root, **options)
                except (ImportError, ValueError) as exc:
                    raise StorageError(f"{self.root}: no usable fsspec filesystem for {self.protocol}:// "
                                       f"({_one_line(exc)}); install its package (s3fs for s3://)") from None
            self.fs = _fs
            self._path = self.fs._strip_protocol(self.root).rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- names --------------------------------------------------------------------------------------------
    def url(self, name: str = "") -> str:
        """The full path or URL of ``name`` (for messages, manifests and consumers like NeMo)."""
        return join(self.root, name) if name else self.root

    def _p(self, name: str = "") -> str:
        if not name:
            return self._path
        return os.path.join(self._path, name) if self.local else f"{self._path}/{name.strip('/')}"

    def sub(self, name: str) -> "Store":
        """The store of a sub-folder (same filesystem and options)."""
        if self.local:
            return Store(self._p(name))
        return Store(self.url(name), self.storage_options, _fs=self.fs)

    # -- queries ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early with one clear line when the bucket is missing or the credentials are refused."""
        if self.local:
            return
        with storage_errors(self.root):
            bucket = self._path.split("/", 1)[0]
            self.fs.invalidate_cache(bucket)
            try:
                self.fs.ls(bucket, detail=False)
            except FileNotFoundError as exc:
                raise StorageError(f"{self.root}: the bucket {bucket!r} does not exist ({_one_line(exc)})") from None

    def exists(self, name: str = "") -> bool:
        if self.local:
            return os.path.exists(self._p(name))
        with storage_errors(self.url(name)):
            self.fs.invalidate_cache(self._p(name))
            return bool(self.fs.exists(self._p(name)))

    def is_file(self, name: str) -> bool:
        if self.local:
            return os.path.isfile(self._p(name))
        with storage_errors(self.url(name)):
            try:
                return self.fs.info(self._p(name))["type"] == "file"
            except FileNotFoundError:
                return False

    def size(self, name: str) -> int:
        if self.local:
            return os.stat(self._p(name)).st_size
        with storage_errors(self.url(name)):
            return int(self.fs.size(self._p(name)))

    def list_files(self, name: str = "", pattern: str = "*", *, recursive: bool = False) -> list[str]:
        """Files under ``name`` (relative to the store, sorted) whose base name matches ``pattern``; names
        with a component starting with ``.`` (temporaries, ``.mmprep`` state) are left out."""
        base = self._p(name)
        found: list[str] = []
        if self.local:
            if not os.path.isdir(base):
                return []
            for folder, dirs, files in os.walk(base):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
                rel_folder = os.path.relpath(folder, self._path).replace(os.sep, "/")
                prefix = "" if rel_folder == "." else rel_folder + "/"
                found += [prefix + f for f in files if not f.startswith(".") and fnmatch.fnmatch(f, pattern)]
            return sorted(found)
        with storage_errors(self.url(name)):
            self.fs.invalidate_cache(base)
            try:  # ls raises on refused credentials; s3fs's find would answer [] instead
                top = self.fs.ls(base, detail=True)
            except FileNotFoundError as exc:
                if "bucket" in str(exc).lower():
                    raise
                return []
            if recursive:
                entries = self.fs.find(base, withdirs=False)
            else:
                entries = [e["name"] for e in top if e.get("type") == "file"]
        for path in entries:
            rel = path[len(self._path):].lstrip("/")
            parts = rel.split("/")
            if any(p.startswith(".") for p in parts) or not fnmatch.fnmatch(parts[-1], pattern):
                continue
            found.append(rel)
        return sorted(found)

    def file_sizes(self, name: str = "", *, recursive: bool = True) -> dict[str, int]:
        """Every file under ``name`` (dot-names left out, as in :meth:`list_files`) with its size, from one
        listing (no request per file on object stores)."""
        base = self._p(name)
        sizes: dict[str, int] = {}
        if self.local:
            for rel in self.list_files(name, recursive=recursive):
                sizes[rel] = os.stat(self._p(rel)).st_size
            return sizes
        with storage_errors(self.url(name)):
            self.fs.invalidate_cache(base)
            try:
                top = self.fs.ls(base, detail=True)
            except FileNotFoundError as exc:
                if "bucket" in str(exc).lower():
                    raise
                return {}
            entries = self.fs.find(base, withdirs=False, detail=True).values() if recursive else \
                [e for e in top if e.get("type") == "file"]
        for entry in entries:
            rel = entry["name"][len(self._path):].lstrip("/")
            if not any(p.startswith(".") for p in rel.split("/")):
                sizes[rel] = int(entry["size"])
        return dict(sorted(sizes.items()))

    def read_many(self, names: Iterable[str]) -> dict[str, bytes]:
        """The bytes of each of ``names`` that exists (missing ones left out), fetched concurrently."""
        names = list(names)
        if self.local:
            out = {}
            for rel in names:
                with contextlib.suppress(FileNotFoundError):
                    out[rel] = Path(self._p(rel)).read_bytes()
            return out
        if not names:
            return {}
        with storage_errors(self.url()):
            found = self.fs.cat([self._p(rel) for rel in names], on_error="omit")
        by_path = {self.fs._strip_protocol(k): v for k, v in found.items()}
        return {rel: bytes(by_path[self._p(rel)]) for rel in names if self._p(rel) in by_path}

    # -- reads ---------------------------------------------------------------------------------------------------
    def open_read(self, name: str, *, block_size: int = 8 * 2**20) -> BinaryIO:
        """A binary reader, streaming (read-ahead) on object stores."""
        if self.local:
            return open(self._p(name), "rb")
        with storage_errors(self.url(name)):
            return self.fs.open(self._p(name), "rb", block_size=block_size, cache_type="readahead")

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return Path(self._p(name)).read_bytes()
        with storage_errors(self.url(name)):
            return bytes(self.fs.cat_file(self._p(name)))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name``."""
        return self.read_ranges(name, [(start, end)])[0]

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]], *, gap: int = COALESCE_GAP,
                    max_request: int = COALESCE_MAX) -> list[bytes]:
        """The bytes of each ``(start, end)`` range, in the order given. Ranges closer than ``gap`` are
        coalesced into one request (at most ``max_request`` bytes), and the requests run concurrently."""
        order = sorted(range(len(ranges)), key=lambda i: ranges[i])
        groups: list[list[int]] = []  # indexes into ranges, each group one request
        for i in order:
            start, end = ranges[i]
            if groups:
                g_start = ranges[groups[-1][0]][0]
                g_end = max(ranges[j][1] for j in groups[-1])
                if start - g_end <= gap and max(end, g_end) - g_start <= max_request:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        spans = [(ranges[g[0]][0], max(ranges[j][1] for j in g)) for g in groups]
        if self.local:
            with open(self._p(name), "rb") as handle:
                blobs = [os.pread(handle.fileno(), end - start, start) for start, end in spans]
        else:
            with storage_errors(self.url(name)):
                path = self._p(name)
                blobs = self.fs.cat_ranges([path] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                                           on_error="raise")
        out: list[bytes] = [b""] * len(ranges)
        for group, (g_start, _), blob in zip(groups, spans, blobs):
            for i in group:
                start, end = ranges[i]
                piece = bytes(blob[start - g_start:end - g_start])
                if len(piece) != end - start:
                    raise OSError(f"{self.url(name)}: short read at {start}..{end} (the object is smaller)")
                out[i] = piece
        return out

    # -- writes ----------------------------------------------------------------------------------------------------
    def _temp_name(self, name: str) -> str:
        folder, _, base = name.rpartition("/")
        temp = f".{base}.{os.getpid()}{TMP_MARKER}"
        return f"{folder}/{temp}" if folder else temp

    @contextlib.contextmanager
    def open_write(self, name: str, *, part_size: int | None = None) -> Iterator[BinaryIO]:
        """A binary writer whose data appears under ``name`` only if the block ends without an exception.

        Memory: at most ``part_size`` (default :data:`PART_SIZE`) bytes buffered on object stores (uploaded
        as multipart parts).
        """
        part_size = part_size or PART_SIZE
        if self.local:
            with atomic_path(self._p(name)) as tmp, open(tmp, "wb") as handle:
                yield handle
            return
        if hasattr(self.fs, "call_s3"):  # s3fs: our own upload (one buffer; see S3Upload)
            upload = S3Upload(self.fs, self._p(name), part_size, self.url(name))
            try:
                yield upload  # type: ignore[misc]
            except BaseException:
                upload.discard()
                raise
            upload.close()
            return
        direct = self.protocol in DIRECT_COMMIT
        target = self._p(name) if direct else self._p(self._temp_name(name))
        with storage_errors(self.url(name)):
            handle = self.fs.open(target, "wb", block_size=part_size)
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()  # fsspec's buffered files (gcsfs, adlfs): abort the upload
            with contextlib.suppress(AttributeError):  # read-only on io.BytesIO-based files (memory://)
                handle.closed = True  # never commit what was written (close() would)
            if not direct:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(target)
            raise
        with storage_errors(self.url(name)):
            handle.close()
            if not direct:
                self.fs.mv(target, self._p(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` atomically (one PUT on object stores)."""
        if self.local:
            with atomic_path(self._p(name)) as tmp:
                Path(tmp).write_bytes(data)
            return
        if hasattr(self.fs, "call_s3"):  # s3fs: one PUT of the bytes as they are
            bucket, key, _ = self.fs.split_path(self._p(name))
            with storage_errors(self.url(name)):
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
                self.fs.invalidate_cache(self._p(name))
            return
        with self.open_write(name, part_size=max(PART_SIZE, len(data) + 1)) as handle:
            handle.write(data)

    def publish_file(self, source: str | os.PathLike[str], name: str, *, move: bool = False) -> None:
        """Copy (or with ``move``, move) a finished local file to ``name`` atomically; uploads of big files
        are multipart, committed by their completion."""
        source = os.fspath(source)
        if self.local:
            final = self._p(name)
            if move:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                try:
                    os.replace(source, final)
                    return
                except OSError:
                    pass  # another file system: copy below
            with atomic_path(final) as tmp:
                shutil.copyfile(source, tmp)
            if move:
                os.unlink(source)
            return
        direct = self.protocol in DIRECT_COMMIT
        target = self._p(name) if direct else self._p(self._temp_name(name))
        with storage_errors(self.url(name)):
            self.fs.put_file(source, target)
            if not direct:
                self.fs.mv(target, self._p(name))
        if move:
            os.unlink(source)

    @contextlib.contextmanager
    def spool(self, name: str, *, spool_dir: str | None = None) -> Iterator[Path]:
        """A local path to write ``name`` into; published atomically when the block succeeds, removed if
        not. Local stores write beside the final name (a rename then); object stores in ``spool_dir``
        (default ``$MMPREP_SPOOL_DIR`` or the temp folder), so local disk holds one such file at a time."""
        if self.local:
            with atomic_path(self._p(name)) as tmp:
                yield Path(tmp)
            return
        folder = spool_dir or os.environ.get("MMPREP_SPOOL_DIR") or tempfile.gettempdir()
        os.makedirs(folder, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix=".mmprep-spool-", suffix="-" + name.rsplit("/", 1)[-1], dir=folder)
        os.close(handle)
        try:
            yield Path(path)
            self.publish_file(path, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def remove(self, name: str) -> None:
        """Delete ``name`` if present."""
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._p(name))
            return
        with storage_errors(self.url(name)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._p(name))

    def remove_leftovers(self, name: str = "", outputs: Iterable[str] | None = None) -> int:
        """Delete what killed writers left in folder ``name``: temporary keys and, on S3, unfinished multipart
        uploads; only those of ``outputs`` (final base names, with their sidecars) when given. Returns how
        many went."""
        if self.local:
            return remove_stale_temporaries(self._p(name), outputs)
        owned = None if outputs is None else set(outputs)

        def mine(base: str) -> bool:
            return owned is None or base in owned or any(base.startswith(o + ".") for o in owned)

        removed = 0
        folder = self._p(name)
        with storage_errors(self.url(name)):
            self.fs.invalidate_cache(folder)
            try:
                entries = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                entries = []
            for path in entries:
                base = path.rsplit("/", 1)[-1]
                if base.startswith(".") and base.endswith(TMP_MARKER) and mine(base[1:-len(TMP_MARKER)].rsplit(".", 1)[0]):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
                        removed += 1
            if hasattr(self.fs, "list_multipart_uploads"):
                bucket, _, prefix = folder.partition("/")
                prefix = prefix + "/" if prefix else ""
                for upload in self.fs.list_multipart_uploads(bucket) or []:
                    key = upload.get("Key", "")
                    rest = key[len(prefix):]
                    if key.startswith(prefix) and "/" not in rest and mine(rest):
                        self.fs.abort_mpu(bucket, key, upload["UploadId"])
                        removed += 1
        return removed

