"""Tar folders on local disk or in object storage: the few file operations the tar stages need, by path or URL.

Each function takes what the stages hold (a local ``Path`` or a URL string) and keeps today's local code
path for local files (``os`` calls, ``pread``, temp name + rename); URLs go through :class:`.storage.Store`.
The ``storage_options`` of the running pipeline are set once per task by
:func:`..stages.run_stage_task` (:func:`set_storage_options`), so these helpers need no extra argument.
Used by reorganize_tar, download_images, precache_encodings and generate_wdinfo (issue 17).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

from . import fsutil
from .manifest import (INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, TAR_SUFFIXES, FinishedTar, current_manifest_body,
                       manifest_records)
from .manifest import finished_tars as _finished_tars_local
from .manifest import marked_short as _marked_short_local
from .manifest import read_manifest as _read_manifest_local
from .manifest import read_offsets as _read_offsets_local
from .manifest import write_manifest as _write_manifest_local
from .storage import Store, is_url
from .tarindex import TarIndex, find_tars as _find_tars_local, index_tar as _index_tar_local, index_tar_reader

PathOrUrl = Path | str
_options: Mapping[str, Any] | None = None
_stores: dict[str, Store] = {}
_stores_pid = os.getpid()


def set_storage_options(options: Mapping[str, Any] | None) -> None:
    """The pipeline's ``storage_options`` for every URL these helpers meet (from now on, in this process)."""
    global _options
    if options != _options:
        _stores.clear()
    _options = dict(options) if options else None


def get_storage_options() -> dict[str, Any] | None:
    """What :func:`set_storage_options` set (to hand to a process that reads URLs on the task's behalf)."""
    return dict(_options) if _options else None


def store(folder: str) -> Store:
    """The (cached) store of a URL folder; a forked child (a DataLoader worker) makes its own, as a client
    made before the fork is bound to the parent's event-loop thread."""
    global _stores_pid
    if os.getpid() != _stores_pid:
        _stores.clear()
        _stores_pid = os.getpid()
    folder = folder.rstrip("/")
    found = _stores.get(folder)
    if found is None:
        found = _stores[folder] = Store(folder, _options)
    return found


def _split(url: str) -> tuple[Store, str]:
    folder, _, name = str(url).rpartition("/")
    return store(folder), name


def join(folder: PathOrUrl, name: str) -> PathOrUrl:
    return f"{str(folder).rstrip('/')}/{name}" if is_url(folder) else Path(folder) / name


def name_of(path: PathOrUrl) -> str:
    return str(path).rstrip("/").rpartition("/")[2] if is_url(path) else Path(path).name


def relative(path: PathOrUrl, root: PathOrUrl) -> str:
    if is_url(root):
        return str(path)[len(str(root).rstrip("/")) + 1:]
    return Path(path).relative_to(root).as_posix()


def is_dir(folder: PathOrUrl) -> bool:
    """A local folder that exists; a URL prefix that holds at least one file (its bucket must exist)."""
    if not is_url(folder):
        return Path(folder).is_dir()
    found = store(str(folder))
    found.check()
    return bool(found.list_files(recursive=True))


def find_tars(root: PathOrUrl) -> list[PathOrUrl]:
    """``*.tar`` under ``root``, recursive, hidden entries skipped, sorted by relative path."""
    if not is_url(root):
        return list(_find_tars_local(root))
    folder = store(str(root))
    return [folder.url(rel) for rel in folder.list_files(pattern="*.tar", recursive=True)]


def exists(path: PathOrUrl) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    folder, name = _split(str(path))
    return folder.is_file(name)


def size(path: PathOrUrl) -> int:
    if not is_url(path):
        return os.stat(path).st_size
    folder, name = _split(str(path))
    return folder.size(name)


def read_bytes(path: PathOrUrl) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    folder, name = _split(str(path))
    return folder.read_bytes(name)


def touch(path: PathOrUrl) -> None:
    """An empty file (NeMo's ``.INCOMPLETE`` marker)."""
    if not is_url(path):
        Path(path).touch()
        return
    folder, name = _split(str(path))
    folder.write_bytes(name, b"")


def unlink(path: PathOrUrl) -> None:
    """Remove ``path`` if present."""
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    folder, name = _split(str(path))
    folder.remove(name)


def makedirs(folder: PathOrUrl) -> None:
    if not is_url(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
    else:
        store(str(folder)).check()  # object stores have no folders; the bucket must exist


def read_manifest(tar: PathOrUrl) -> dict[str, Any] | None:
    """The current manifest of one tar, or None (absent, unreadable or stale)."""
    if not is_url(tar):
        return _read_manifest_local(tar)
    folder, name = _split(str(tar))
    try:  # two requests, no listing (it runs once per output tar)
        raw = folder.read_bytes(name + MANIFEST_SUFFIX)
        return current_manifest_body(raw, folder.size(name))
    except FileNotFoundError:
        return None


def read_manifests(tars: list[PathOrUrl]) -> list[dict[str, Any] | None]:
    """The manifests of many tars; for one URL folder, one listing and concurrent reads."""
    if not any(is_url(t) for t in tars):
        return [_read_manifest_local(t) for t in tars]
    out: list[dict[str, Any] | None] = []
    by_folder: dict[str, list[str]] = {}
    for tar in tars:
        folder, _, name = str(tar).rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    bodies: dict[str, dict[str, Any] | None] = {}
    for folder, names in by_folder.items():
        where = store(folder)
        sizes = where.file_sizes(recursive=False)
        raws = where.read_many(n + MANIFEST_SUFFIX for n in names if n + MANIFEST_SUFFIX in sizes)
        for name in names:
            raw = raws.get(name + MANIFEST_SUFFIX)
            bodies[f"{folder}/{name}"] = None if raw is None or name not in sizes else \
                current_manifest_body(raw, sizes[name])
    for tar in tars:
        out.append(bodies[str(tar)] if is_url(tar) else _read_manifest_local(tar))
    return out


def read_offsets(tar: PathOrUrl, body: dict[str, Any]) -> dict[str, Any] | None:
    """The member offsets a current manifest names (see :func:`.manifest.read_offsets`)."""
    if not is_url(tar):
        return _read_offsets_local(tar, body)
    named = body.get("member_offsets")
    if not isinstance(named, dict) or not isinstance(named.get("file"), str):
        return None
    folder, _ = _split(str(tar))
    try:
        record = json.loads(folder.read_bytes(named["file"].rsplit("/", 1)[-1]))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tar_size") != body.get("tar_size"):
        return None
    return record


def index_tar(tar: PathOrUrl) -> TarIndex:
    """The tar's index from its headers (read-ahead reads on object stores)."""
    if not is_url(tar):
        return _index_tar_local(tar)
    folder, name = _split(str(tar))
    with folder.open_read(name, block_size=2**20) as handle:
        return index_tar_reader(handle, folder.size(name), str(tar))


def read_ranges(path: PathOrUrl, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Byte ranges of one file (coalesced, concurrent on object stores; ``pread`` locally)."""
    if not is_url(path):
        return Store(os.path.dirname(os.path.abspath(path))).read_ranges(os.path.basename(path), ranges)
    folder, name = _split(str(path))
    return folder.read_ranges(name, ranges)


@contextlib.contextmanager
def open_write(path: PathOrUrl) -> Iterator[BinaryIO]:
    """A writer whose data appears at ``path`` only complete (temp + rename; multipart upload on S3)."""
    if not is_url(path):
        with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as handle:
            yield handle
        return
    folder, name = _split(str(path))
    with folder.open_write(name) as handle:
        yield handle


def write_manifest(tar: PathOrUrl, sample_count: int, member_offsets: dict[str, Any] | None = None, *,
                   tar_size: int | None = None, **fields: Any) -> None:
    """:func:`.manifest.write_manifest` for a path or URL: the offsets sidecar first, the manifest last."""
    if not is_url(tar):
        _write_manifest_local(tar, sample_count, member_offsets, **fields)
        return
    folder, name = _split(str(tar))
    tar_size = folder.size(name) if tar_size is None else tar_size
    sidecar, manifest = manifest_records(name, sample_count, tar_size, member_offsets, **fields)
    for record_name, data in filter(None, (sidecar, manifest)):
        folder.write_bytes(record_name, data)


def remove_leftovers(folder: PathOrUrl, outputs: Iterable[str] | None = None, keep: Iterable[str] = ()) -> int:
    """Temporaries (and on S3 unfinished uploads) that crashed writers left in ``folder``; ``keep``: local
    temporaries of this process's, still to be renamed."""
    if not is_url(folder):
        return fsutil.remove_stale_temporaries(folder, outputs, keep)
    return store(str(folder)).remove_leftovers("", outputs)


def file_names(folder: PathOrUrl, pattern: str = "*") -> list[str]:
    """Base names of the files directly in ``folder`` matching ``pattern``, sorted (dot-names left out)."""
    if not is_url(folder):
        return [p.name for p in fsutil.sorted_files(folder, pattern)]
    return store(str(folder)).list_files(pattern=pattern)


def finished_tars(folder: PathOrUrl) -> tuple[list[FinishedTar], list[str]]:
    """:func:`.manifest.finished_tars` for a path or URL (one listing and concurrent manifest reads; the
    ``mtime`` of a URL's tar is 0: object listings give none cheaply)."""
    if not is_url(folder):
        return _finished_tars_local(folder)
    where = store(str(folder))
    sizes = where.file_sizes(recursive=False)
    names = [n for n in sizes if n.endswith(TAR_SUFFIXES) and not (n.endswith(INCOMPLETE_SUFFIX) and sizes[n] == 0)]
    raws = where.read_many(n + MANIFEST_SUFFIX for n in names if n + MANIFEST_SUFFIX in sizes)
    tars: list[FinishedTar] = []
    unlisted: list[str] = []
    for name in names:
        raw = raws.get(name + MANIFEST_SUFFIX)
        body = None if raw is None else current_manifest_body(raw, sizes[name])
        if body is None:
            unlisted.append(name)
            continue
        task = body.get("task_id")
        tars.append(FinishedTar(name, int(body["sample_count"]), sizes[name], 0.0,
                                int(task) if task is not None else None))
    return tars, unlisted


def marked_short(folder: PathOrUrl, tars: list[FinishedTar]) -> list[str]:
    """:func:`.manifest.marked_short` for a path or URL."""
    if not is_url(folder):
        return _marked_short_local(folder, tars)
    sizes = store(str(folder)).file_sizes(recursive=False)
    names = [n[: -len(INCOMPLETE_SUFFIX)] for n, size in sizes.items()
             if n.endswith(".tar" + INCOMPLETE_SUFFIX) and size == 0]
    return [t.name for t in tars if t.name.endswith(INCOMPLETE_SUFFIX)] + sorted(names)
