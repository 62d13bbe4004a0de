"""Per-tar manifests: what a producing stage knows about each tar it wrote, so consumers need no tar reads.

A manifest is a small JSON sidecar ``<tar name>.manifest.json`` written atomically *after* its tar, holding
at least ``sample_count``; producers may add fields (extensions, encodings and shapes, short-tar flag…).
A manifest whose tar is missing, or older than its tar, is ignored by readers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes

MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(tar_path: str | Path) -> Path:
    tar_path = Path(tar_path)
    return tar_path.with_name(tar_path.name + MANIFEST_SUFFIX)


def write_manifest(tar_path: str | Path, sample_count: int, **fields: Any) -> None:
    """Record ``sample_count`` (and any extra JSON-able fields) for a tar that already exists."""
    tar_path = Path(tar_path)
    body = {"tar": tar_path.name, "sample_count": int(sample_count), "tar_size": tar_path.stat().st_size,
            **fields}
    atomic_write_bytes(manifest_path(tar_path), json.dumps(body, sort_keys=True).encode())


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_manifest(tar_path: str | Path) -> dict[str, Any] | None:
    """The manifest of one tar, or None if absent or stale (tar size differs from the recorded one)."""
    # Plain strings and os calls, no pathlib: generate_wdinfo reads 100,000 of these in about a second.
    tar_name = os.fspath(tar_path)
    try:
        body = json.loads(_read_small(tar_name + MANIFEST_SUFFIX))
        size = os.stat(tar_name).st_size
    except (FileNotFoundError, ValueError):
        return None
    if body.get("tar_size") != size:
        return None
    return body
