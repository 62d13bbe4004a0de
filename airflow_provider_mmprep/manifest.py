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
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes

MANIFEST_SUFFIX = ".manifest.json"
OFFSETS_SUFFIX = ".offsets.json"
#: NeMo's mark of a short tar: an empty ``<tar>.INCOMPLETE`` beside it (or the tar renamed so).
INCOMPLETE_SUFFIX = ".INCOMPLETE"


def manifest_path(tar_path: str | Path) -> Path:
    tar_path = Path(tar_path)
    return tar_path.with_name(tar_path.name + MANIFEST_SUFFIX)


def write_manifest(tar_path: str | Path, sample_count: int, member_offsets: dict[str, Any] | None = None,
                   **fields: Any) -> None:
    """Record ``sample_count`` (and any extra JSON-able fields) for a tar that already exists; with
    ``member_offsets`` (:func:`.tarindex.member_offsets`), write them to their sidecar first and name it."""
    tar_path = Path(tar_path)
    tar_size = tar_path.stat().st_size
    body = {"tar": tar_path.name, "sample_count": int(sample_count), "tar_size": tar_size, **fields}
    if member_offsets is not None:
        sidecar = tar_path.with_name(tar_path.name + OFFSETS_SUFFIX)
        atomic_write_bytes(sidecar, json.dumps({**member_offsets, "tar_size": tar_size}).encode())
        body["member_offsets"] = {"version": member_offsets["version"], "file": sidecar.name}
    atomic_write_bytes(manifest_path(tar_path), json.dumps(body, sort_keys=True).encode())


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
