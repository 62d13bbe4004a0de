"""Per-tar manifests: what a producing stage knows about each tar it wrote, so consumers need no tar reads.

A manifest is a small JSON sidecar ``<tar name>.manifest.json`` written atomically *after* its tar, holding
at least ``sample_count``; producers may add fields (extensions, encodings and shapes, short-tar flag…).
``every_sample_has`` is a promise: each of the ``sample_count`` samples has a member of every extension
listed, so a consumer that needs only those can count usable samples without reading the tar.
A manifest whose tar is missing, or older than its tar, is ignored by readers.

Member offsets (every member's name, header and data offsets, size, mtime: what indexing a tar from its
headers yields) are large, so they live in a second sidecar ``<tar name>.offsets.json``, written before the
manifest, which names it: readers that want only counts (generate_wdinfo, the report) never parse them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .fsutil import atomic_write_bytes

MANIFEST_SUFFIX = ".manifest.json"
OFFSETS_SUFFIX = ".offsets.json"
#: NeMo's mark of a short tar: an empty ``<tar>.INCOMPLETE`` beside it (or the tar renamed so).
INCOMPLETE_SUFFIX = ".INCOMPLETE"
#: A finished tar's names: the short one may carry the NeMo suffix itself.
TAR_SUFFIXES = (".tar", ".tar" + INCOMPLETE_SUFFIX)


def manifest_path(tar_path: str | Path) -> Path:
    tar_path = Path(tar_path)
    return tar_path.with_name(tar_path.name + MANIFEST_SUFFIX)


def offsets_path(tar_path: str | Path) -> Path:
    tar_path = Path(tar_path)
    return tar_path.with_name(tar_path.name + OFFSETS_SUFFIX)


def manifest_records(tar_name: str, sample_count: int, tar_size: int,
                     member_offsets: dict[str, Any] | None = None,
                     **fields: Any) -> tuple[tuple[str, bytes] | None, tuple[str, bytes]]:
    """``(offsets sidecar, manifest)`` as (file name, bytes) for the tar named ``tar_name``: the one format,
    whether the files go to a local folder or an object store; write the sidecar (if any) first."""
    body = {"tar": tar_name, "sample_count": int(sample_count), "tar_size": tar_size, **fields}
    sidecar = None
    if member_offsets is not None:
        sidecar = (tar_name + OFFSETS_SUFFIX, json.dumps({**member_offsets, "tar_size": tar_size}).encode())
        body["member_offsets"] = {"version": member_offsets["version"], "file": sidecar[0]}
    return sidecar, (tar_name + MANIFEST_SUFFIX, json.dumps(body, sort_keys=True).encode())


def write_manifest(tar_path: str | Path, sample_count: int, member_offsets: dict[str, Any] | None = None,
                   **fields: Any) -> None:
    """Record ``sample_count`` (and any extra JSON-able fields) for a tar that already exists; with
    ``member_offsets`` (:func:`.tarindex.member_offsets`), write them to their sidecar first and name it."""
    tar_path = Path(tar_path)
    sidecar, manifest = manifest_records(tar_path.name, sample_count, tar_path.stat().st_size, member_offsets,
                                         **fields)
    for name, data in filter(None, (sidecar, manifest)):
        atomic_write_bytes(tar_path.with_name(name), data)


def read_offsets(tar_path: str | Path, body: dict[str, Any]) -> dict[str, Any] | None:
    """The member offsets a (current) manifest ``body`` names, or None when it names none, or their
    sidecar is missing, unreadable or written for another version of the tar (then read the headers)."""
    named = body.get("member_offsets")
    if not isinstance(named, dict) or not isinstance(named.get("file"), str):
        return None
    try:
        record = json.loads(Path(tar_path).with_name(Path(named["file"]).name).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("tar_size") != body.get("tar_size"):
        return None
    return record


def load_current_manifest(manifest_file: str, tar_size: int) -> tuple[dict[str, Any], float] | None:
    """The manifest body and its mtime when it describes a tar of ``tar_size`` bytes; None when it is
    absent, unreadable, lacks ``sample_count``, or is stale (written for another version of the tar).

    Plain strings and os calls, no pathlib: generate_wdinfo and the report read 100,000s of these.
    """
    try:
        fd = os.open(manifest_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mtime = os.fstat(fd).st_mtime
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    body = current_manifest_body(b"".join(chunks), tar_size)
    return None if body is None else (body, mtime)


def current_manifest_body(raw: bytes, tar_size: int) -> dict[str, Any] | None:
    """The manifest body in ``raw`` when it describes a tar of ``tar_size`` bytes, else None (unreadable,
    no ``sample_count``, or stale). Shared by local reads and reads from object storage."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("tar_size") != tar_size or "sample_count" not in body:
        return None
    return body


def read_manifest(tar_path: str | Path) -> dict[str, Any] | None:
    """The manifest of one tar, or None if absent or stale (see :func:`load_current_manifest`)."""
    tar_name = os.fspath(tar_path)
    try:
        size = os.stat(tar_name).st_size
    except FileNotFoundError:
        return None
    loaded = load_current_manifest(tar_name + MANIFEST_SUFFIX, size)
    return loaded[0] if loaded else None


class FinishedTar(NamedTuple):
    """A tar with a current manifest, as a stage's ``finished_outputs`` reports it."""

    name: str
    sample_count: int
    size: int
    mtime: float  # the manifest's: when the tar was finished
    task_id: int | None  # the task that wrote it, where its manifest (or its stage) says so


@dataclass
class TarOutputs:
    """A tar stage's output folder against what its tasks should write, from one listing of each folder:
    what its ``output_state`` answers (``finished_outputs`` and ``incomplete_tasks`` are parts of it)."""

    tars: list[FinishedTar]  # with a current manifest, each with its task where known
    unlisted: list[str]  # names of tars without one (being written, or left by an interrupted task)
    incomplete: dict[int, str]  # task id -> why it has work left
    marked: list[str] = field(default_factory=list)  # tars marked short (:func:`marked_short`)
    nothing_to_do: str | None = None  # why no task has work at all (precache: only the short tar is there)


def finished_tars(folder: str | Path) -> tuple[list[FinishedTar], list[str]]:
    """The tars directly in ``folder`` (``.tar``, or renamed ``.tar.INCOMPLETE``) that have a current manifest,
    by name, and the names of those that lack one (being written, or left by an interrupted task).

    The flat folder of tars + manifests + NeMo markers that reorganize_tar and precache_encodings write:
    their ``finished_outputs`` answer with this.
    """
    tars: list[FinishedTar] = []
    unlisted: list[str] = []
    if not os.path.isdir(folder):
        return tars, unlisted
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.name.endswith(TAR_SUFFIXES) or entry.name.startswith(".") or not entry.is_file():
            continue
        tar_size = entry.stat().st_size
        if entry.name.endswith(INCOMPLETE_SUFFIX) and tar_size == 0:
            continue  # an empty marker beside its tar, not a tar
        loaded = load_current_manifest(entry.path + MANIFEST_SUFFIX, tar_size)
        if loaded is None:
            unlisted.append(entry.name)
            continue
        body, mtime = loaded
        task = body.get("task_id")
        tars.append(FinishedTar(entry.name, int(body["sample_count"]), tar_size, mtime,
                                int(task) if task is not None else None))
    return tars, unlisted


def marked_short(folder: str | Path, tars: list[FinishedTar]) -> list[str]:
    """Names of the tars marked short the NeMo way: those of ``tars`` renamed ``<tar>.INCOMPLETE``, then
    (by the tar's own name) those with an empty ``<tar>.INCOMPLETE`` marker beside them in ``folder``."""
    names = []
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.name.endswith(".tar" + INCOMPLETE_SUFFIX) and entry.is_file() and entry.stat().st_size == 0:
                names.append(entry.name[: -len(INCOMPLETE_SUFFIX)])
    return [t.name for t in tars if t.name.endswith(INCOMPLETE_SUFFIX)] + sorted(names)


def tasks_without_output(tars: list[FinishedTar], task_count: int) -> dict[int, str]:
    """Tasks no finished tar's manifest names, when manifests name their task at all (else nothing)."""
    seen = {t.task_id for t in tars}
    if seen == {None}:
        return {}
    return {t: "no output tar records this task" for t in range(task_count) if t not in seen}
