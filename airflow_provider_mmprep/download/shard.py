"""Write a downloaded shard in img2dataset's layout, atomically and byte-reproducibly (the fetching is
``pipeline``'s).

Images arrive in any order and are streamed into the tar in key order (those finished early wait in a
bounded buffer, then in a spill file: memory never holds the shard), with fixed member metadata
(:data:`..tarwriter.FIXED`: mtime 0, uid/gid 0, no user names, mode 0644). Two runs over the same input and
responses therefore give byte-identical tars. Each file is written under a temporary name and renamed; the
``_stats.json`` is renamed last and marks the shard complete.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from ..fsutil import TMP_MARKER, atomic_path, atomic_write_bytes
from ..manifest import manifest_records, write_manifest
from ..tarindex import offsets_of
from ..tarwriter import BLOCK, RECORD, TarWriter
from .options import DownloadOptions
from .reader import ShardJob

SUCCESS, FAILED_DOWNLOAD, FAILED_RESIZE = "success", "failed_to_download", "failed_to_resize"
#: Finished images waiting (in memory) for an earlier, slower one before they can go into the tar, over all
#: the pieces a worker has open; beyond this they wait in a spill file.
MEMORY_CAP_BYTES = 48 * 1024 * 1024
#: Bytes read from a piece per write into a shard's upload where it cannot read straight into the part buffer.
PUBLISH_READ = 8 * 1024 * 1024


@dataclass
class Outcome:
    status: str
    error: str | None = None
    retryable: bool = False
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    hash: str | None = None
    offset: int = 0
    length: int = 0


def shard_paths(out_dir: Path, shard_id: int) -> dict[str, Path]:
    stem = f"{shard_id:05d}"
    return {"tar": out_dir / f"{stem}.tar", "parquet": out_dir / f"{stem}.parquet",
            "stats": out_dir / f"{stem}_stats.json"}


def is_complete(out_dir: Path, shard_id: int) -> bool:
    paths = shard_paths(out_dir, shard_id)
    return all(p.is_file() for p in paths.values())


class MemoryBudget:
    """Bytes of finished samples held in memory while they wait for an earlier one, shared by every piece a
    worker has open, so the bound holds however many pieces wait for stragglers."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0


class OrderedSampleWriter:
    """Write samples to the tar in key order while downloads finish in any order.

    A finished sample that is next in order goes straight into the tar; others wait in memory, and once
    the budget's bytes are waiting (a slow URL holds up the head of the line) further arrivals wait in a
    spill file instead, so memory stays bounded whatever happens. Image bytes leave the spill file by a
    kernel-side copy.
    """

    def __init__(self, tar: TarWriter, spill: io.BufferedRandom, job: ShardJob, options: DownloadOptions,
                 budget: "MemoryBudget"):
        self.tar, self.spill, self.job, self.options, self.budget = tar, spill, job, options, budget
        self.extra_rows = job.extra.to_pylist() if job.extra is not None else None
        self.waiting: dict[int, tuple[Outcome, bytes | None]] = {}
        self.spill_end = 0
        self.next_index = 0  # set to the first row of the piece by the caller
        self.successes = 0

    def accept(self, index: int, outcome: Outcome, data: bytes | None) -> None:
        if data is not None and index != self.next_index and self.budget.used + len(data) > self.budget.cap:
            self.spill.seek(self.spill_end)
            self.spill.write(data)
            self.spill.flush()
            outcome.offset, outcome.length = self.spill_end, len(data)
            self.spill_end += len(data)
            data = None
        elif data is not None:
            self.budget.used += len(data)
        self.waiting[index] = (outcome, data)
        while self.next_index in self.waiting:
            outcome, data = self.waiting.pop(self.next_index)
            if data is not None:
                self.budget.used -= len(data)
            if outcome.status == SUCCESS:
                self._write(self.next_index, outcome, data)
            self.next_index += 1

    def _write(self, index: int, outcome: Outcome, data: bytes | None) -> None:
        job, key = self.job, self.job.keys[index]
        self.successes += 1
        name = f"{key}.{self.options.extension}"
        if data is not None:
            self.tar.add_bytes(name, data)
        else:
            self.tar.add_from(name, self.spill.fileno(), outcome.offset, outcome.length)
        if job.captions is not None:
            self.tar.add_bytes(f"{key}.txt", (job.captions[index] or "").encode("utf-8"))
        meta = {"url": job.urls[index], "caption": job.captions[index] if job.captions else None, "key": key,
                "status": SUCCESS, "error_message": None, "width": outcome.width, "height": outcome.height,
                "original_width": outcome.original_width, "original_height": outcome.original_height,
                self.options.compute_hash or "sha256": outcome.hash}
        if self.extra_rows is not None:
            meta.update({k: _json_value(v) for k, v in self.extra_rows[index].items()})
        self.tar.add_bytes(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def piece_path(out_dir: Path, shard_id: int, piece: int) -> Path:
    """Where one piece of a shard is written: a temporary name, removed by the next run if left behind."""
    return out_dir / f".{shard_id:05d}.piece{piece:03d}.{os.getpid()}{TMP_MARKER}"


def split_rows(count: int, pieces: int) -> list[range]:
    """Contiguous row ranges, one per piece, in order (so concatenated pieces stay in key order)."""
    pieces = max(1, min(pieces, count))
    base, extra = divmod(count, pieces)
    ranges, start = [], 0
    for index in range(pieces):
        stop = start + base + (1 if index < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def shard_table(job: ShardJob, options: DownloadOptions, outcomes: list[Outcome]) -> pa.Table:
    """The shard's ``.parquet`` rows: every URL with its outcome (one builder for local and published shards)."""
    hash_name = options.compute_hash or "sha256"
    columns: dict[str, pa.Array] = {
        "key": pa.array(job.keys, pa.string()),
        "url": pa.array(job.urls, pa.string()),
    }
    if job.captions is not None:
        columns["caption"] = pa.array(job.captions, pa.string())
    columns.update({
        "status": pa.array([o.status for o in outcomes], pa.string()),
        "error_message": pa.array([o.error for o in outcomes], pa.string()),
        "width": pa.array([o.width for o in outcomes], pa.int32()),
        "height": pa.array([o.height for o in outcomes], pa.int32()),
        "original_width": pa.array([o.original_width for o in outcomes], pa.int32()),
        "original_height": pa.array([o.original_height for o in outcomes], pa.int32()),
        hash_name: pa.array([o.hash for o in outcomes], pa.string()),
        "retryable": pa.array([o.retryable for o in outcomes], pa.bool_()),  # ours: transient failure
    })
    table = pa.table(columns)
    if job.extra is not None:
        for name in job.extra.column_names:
            if name not in table.column_names:
                table = table.append_column(name, job.extra.column(name))
    return table


def manifest_fields(job: ShardJob, options: DownloadOptions) -> dict[str, Any]:
    """The manifest's fields beside the sample count and offsets (the same for local and published shards)."""
    extensions = sorted([options.extension, "json"] + (["txt"] if job.captions is not None else []))
    return {"shard": job.shard_id, "extensions": extensions, "every_sample_has": extensions,
            "retry_round": job.retry, "source": "download_images", "options_fingerprint": options.fingerprint()}


def shard_stats(job: ShardJob, options: DownloadOptions, outcomes: list[Outcome], start: float) -> dict[str, Any]:
    """img2dataset's ``_stats.json`` body (plus our fingerprint), ended now."""
    successes = sum(o.status == SUCCESS for o in outcomes)
    status_dict: dict[str, int] = {}
    for outcome in outcomes:
        label = outcome.error or outcome.status
        status_dict[label] = status_dict.get(label, 0) + 1
    end = time.time()
    return {"count": len(outcomes), "successes": successes,
            "failed_to_download": sum(o.status == FAILED_DOWNLOAD for o in outcomes),
            "failed_to_resize": sum(o.status == FAILED_RESIZE for o in outcomes),
            "retryable": sum(o.retryable for o in outcomes),
            "duration": end - start, "start_time": start, "end_time": end,
            "status_dict": dict(sorted(status_dict.items(), key=lambda kv: -kv[1])),
            "shard": job.shard_id, "retry_round": job.retry,
            "options_fingerprint": options.fingerprint(), "options": options.shaping()}


def finish_shard(job: ShardJob, options: DownloadOptions, out_dir: Path, outcomes: list[Outcome],
                 pieces: list[Path], start: float) -> dict[str, Any]:
    """Join the pieces into ``{shard}.tar`` and write ``.parquet``, the manifest and ``_stats.json`` (last)."""
    paths = shard_paths(out_dir, job.shard_id)
    try:
        with atomic_path(paths["tar"]) as tmp_tar:
            # the first piece becomes the tar (a rename, not a copy: a shard's bytes are written once)
            os.replace(pieces[0], tmp_tar)
            tar = TarWriter(tmp_tar, append=True)
            try:
                for piece in pieces[1:]:
                    tar.append_file(piece)
            finally:
                tar.close()
    finally:
        for piece in pieces:
            piece.unlink(missing_ok=True)
    with atomic_path(paths["parquet"]) as tmp:
        pq.write_table(shard_table(job, options, outcomes), tmp)
    successes = sum(o.status == SUCCESS for o in outcomes)
    write_manifest(paths["tar"], successes, member_offsets=offsets_of(paths["tar"]),  # so reorganize_tar
                   **manifest_fields(job, options))                                  # reads no header of it
    stats = shard_stats(job, options, outcomes, start)
    atomic_write_bytes(paths["stats"], json.dumps(stats, indent=1).encode())
    return stats


def end_of_archive(size: int) -> bytes:
    """What :meth:`TarWriter.close` appends to ``size`` bytes of members: two zero blocks, padded to a record."""
    return bytes(2 * BLOCK + -(size + 2 * BLOCK) % RECORD)


def piece_members(piece: Path, base: int) -> tuple[list[Any], int]:
    """A piece's members (from its headers, in the page cache) with offsets as in the joined tar, where the
    piece starts at ``base``; and how many members the index skips."""
    from ..tarindex import index_tar  # noqa: PLC0415

    if not piece.stat().st_size:
        return [], 0
    index = index_tar(piece)
    return [m._replace(offset=m.offset + base, header_offset=m.header_offset + base)
            for sample in index.samples for m in sample.members], index.skipped_members


def publish_pieces(job: ShardJob, options: DownloadOptions, pieces: list[Path], start: float, folder_url: str,
                   outcomes: Callable[[], list[Outcome]], wait: Callable[[int], None] = lambda number: None,
                   uploaded: Callable[[int], None] = lambda number: None) -> dict[str, Any]:
    """Upload one shard straight from its pieces to ``folder_url``, each piece as soon as it is finished
    (``wait(i)`` returns then) and removed locally once uploaded (``uploaded(i)``): the same bytes
    :func:`finish_shard` writes, without a joined copy on local disk. ``outcomes()`` (every URL's, in row
    order) is asked once every piece is finished.

    Each object appears only complete (one PUT, or a multipart upload whose completion is the commit: see
    :meth:`..storage.Store.open_write`): the old ``_stats.json`` goes first (a shard being redone stops
    counting as complete before its files change), then the tar (the pieces in order, then the
    end-of-archive marker), its offsets sidecar and manifest, the parquet, and ``_stats.json`` last. A kill
    part-way leaves no stats and at most an unfinished upload: the rerun aborts it and redoes the shard.

    On failure the pieces not yet uploaded stay where they are: a downloader may still be writing one, and
    removing it under the writer would fail the download with a missing file instead of this error. The
    caller removes them once its downloads have stopped (:meth:`.pipeline.Publisher.abort`).
    """
    from .. import tario  # noqa: PLC0415 - fsspec only when publishing to object storage
    from ..storage import copy_file_into  # noqa: PLC0415
    from ..tarindex import member_offsets  # noqa: PLC0415

    store = tario.store(folder_url)
    stem = f"{job.shard_id:05d}"
    members: list[Any] = []
    skipped = 0
    size = 0
    store.remove(f"{stem}_stats.json")
    with store.open_write(f"{stem}.tar") as target:
        for number, piece in enumerate(pieces):
            wait(number)
            found, skips = piece_members(piece, size)
            members += found
            skipped += skips
            with open(piece, "rb", buffering=0) as source:
                size += copy_file_into(target, source, PUBLISH_READ)
            piece.unlink()
            uploaded(number)
        target.write(end_of_archive(size))
    rows = outcomes()
    successes = sum(o.status == SUCCESS for o in rows)
    sidecar, manifest = manifest_records(f"{stem}.tar", successes, size + len(end_of_archive(size)),
                                         member_offsets(members, skipped), **manifest_fields(job, options))
    sink = pa.BufferOutputStream()
    pq.write_table(shard_table(job, options, rows), sink)
    stats = shard_stats(job, options, rows, start)
    for name, data in (*filter(None, (sidecar, manifest)), (f"{stem}.parquet", sink.getvalue().to_pybytes()),
                       (f"{stem}_stats.json", json.dumps(stats, indent=1).encode())):
        store.write_bytes(name, data)
    return stats
