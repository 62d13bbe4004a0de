"""Sample counts of input tars without manifests, recorded once for every reorganize_tar task.

On shards we did not write (img2dataset's) every task must know every input's usable sample count before
it knows which outputs are its own, so each of T tasks would read every input's headers: T times the
header reads in all, and on a cold or shared file system T times the bytes. Instead, a task that reads
an input records what it found (:class:`.tarindex.SampleCounts`: keys and extension lists) in a small
file under ``output_dir/.mmprep-input-counts/``; the other tasks, and later reruns of any of them, read
that file instead of the tar.

A record names its input (path relative to ``input_dir``) and the input's size and modification time in
nanoseconds, the quick check ``make`` and ``rsync`` trust; a record for any other state of the input, or
one that does not parse, is ignored and the tar read again (and the record written anew). Records are
written atomically and only ever describe intact tars (a damaged one is read by every task, which
reports it). The task that copies from an input reads its headers anyway and fails, naming the record,
if they disagree. Deleting the folder only costs reading the headers again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes
from .tarindex import SampleCounts, TarIndex

log = logging.getLogger(__name__)

RECORDS_DIR = ".mmprep-input-counts"
FORMAT = "mmprep-input-counts"
VERSION = 1
MAX_KINDS = 255  # a kind is one byte (as the compiled counter makes them)


def records_dir(output_dir: Path) -> Path:
    return output_dir / RECORDS_DIR


def record_path(folder: Path, rel: str) -> Path:
    """The record of input ``rel`` (a hash of its relative path: inputs may lie in nested folders)."""
    return folder / f"{hashlib.sha256(rel.encode()).hexdigest()[:32]}.json"


def counts_of_index(index: TarIndex) -> SampleCounts | None:
    """What :func:`.tarindex.count_samples` says of an input, from its full index; None for a damaged tar
    (every task reads it, to report it) or one with more than ``MAX_KINDS`` extension lists."""
    if index.problems:
        return None
    kinds: dict[tuple[str, ...], int] = {}
    keys: list[str] = []
    per_sample = bytearray()
    for sample in index.samples:
        exts = tuple([m[1] for m in sample.members])  # Member.ext
        kind = kinds.setdefault(exts, len(kinds))
        if kind >= MAX_KINDS:
            return None
        keys.append(sample.key)
        per_sample.append(kind)
    return SampleCounts(keys, bytes(per_sample), list(kinds), index.skipped_members)


def save(folder: Path, rel: str, stat: os.stat_result, counts: SampleCounts) -> None:
    """Record ``counts`` for input ``rel`` as it was when ``stat`` was taken. Best effort: a record that
    cannot be written only means other tasks read the tar themselves."""
    body = {"format": FORMAT, "version": VERSION, "input": rel, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "skipped_members": counts.skipped_members,
            "signatures": [list(s) for s in counts.signatures],
            "kinds": base64.b64encode(counts.kinds).decode("ascii"), "keys": counts.keys}
    try:
        atomic_write_bytes(record_path(folder, rel), json.dumps(body, separators=(",", ":")).encode())
    except OSError as exc:
        log.debug("input counts of %s not recorded: %s", rel, exc)


def is_recorded(folder: Path, rel: str, stat: os.stat_result) -> bool:
    """Whether a record describes input ``rel`` as ``stat`` finds it (a task that indexed the input in
    full leaves such a record as it is)."""
    return load(folder, rel, stat) is not None


def load(folder: Path, rel: str, stat: os.stat_result) -> SampleCounts | None:
    """The recorded counts of input ``rel`` if a record describes it as ``stat`` finds it, else None."""
    try:
        body: Any = json.loads(record_path(folder, rel).read_bytes())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        if (body["format"], body["version"], body["input"], body["size"], body["mtime_ns"]) != (
                FORMAT, VERSION, rel, stat.st_size, stat.st_mtime_ns):
            return None
        keys, signatures = body["keys"], body["signatures"]
        kinds = base64.b64decode(body["kinds"], validate=True)
        skipped = body["skipped_members"]
        if (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(kinds) == len(keys)
                and isinstance(signatures, list) and (not kinds or max(kinds) < len(signatures))
                and all(isinstance(s, list) and all(isinstance(e, str) for e in s) for s in signatures)
                and isinstance(skipped, int) and skipped >= 0):
            return SampleCounts(keys, kinds, [tuple(s) for s in signatures], skipped)
    log.debug("input counts record of %s does not parse; reading the tar", rel)
    return None
