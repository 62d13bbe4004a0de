"""Read an input part (parquet, CSV/TSV, JSON lines, plain URL lists; ``.gz`` too) as shard jobs.

Input is streamed in record batches and cut into jobs of ``number_sample_per_shard`` rows, so memory holds
one shard's rows at a time whatever the size of the part. Only the URL, caption and
``save_additional_columns`` columns are read.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .options import KEY_PREFIX, DownloadOptions

BATCH_ROWS = 8192


@dataclass
class ShardJob:
    """One shard to download: its number, its rows (in key order) and their sample keys."""

    shard_id: int
    keys: list[str]
    urls: list[str | None]
    captions: list[str | None] | None
    extra: pa.Table | None = None  # save_additional_columns, one row per URL
    retry: bool = False
    first_row: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def key_digits(number_sample_per_shard: int) -> int:
    """img2dataset's sample key: ``shard * 10**k + index`` with ``k`` digits for the index."""
    return max(0, math.ceil(math.log10(number_sample_per_shard))) if number_sample_per_shard > 1 else 0


def make_key(shard_id: int, index: int, number_sample_per_shard: int, prefix: str = "") -> str:
    return prefix + str(shard_id * 10 ** key_digits(number_sample_per_shard) + index).zfill(9)


def _input_error(message: str) -> Exception:
    from ..stages import StageError  # noqa: PLC0415

    return StageError(message)


def _format_of(path: Path, options: DownloadOptions) -> tuple[str, bool]:
    fmt = options.input_format
    compressed = fmt.endswith(".gz") or path.name.endswith(".gz")
    return fmt.removesuffix(".gz"), compressed


def _wanted_columns(options: DownloadOptions) -> list[str]:
    columns = [options.url_col]
    if options.caption_col:
        columns.append(options.caption_col)
    columns += [c for c in options.save_additional_columns if c not in columns]
    return columns


def _check_columns(path: Path, present: list[str], options: DownloadOptions) -> None:
    if options.url_col not in present:
        raise _input_error(f"{KEY_PREFIX}.url_col: column {options.url_col!r} not found in {path.name} "
                           f"(columns: {', '.join(present[:20])})")
    if options.caption_col and options.caption_col not in present:
        raise _input_error(f"{KEY_PREFIX}.caption_col: column {options.caption_col!r} not found in {path.name} "
                           f"(columns: {', '.join(present[:20])}); set caption_col: null if there is none")
    missing = [c for c in options.save_additional_columns if c not in present]
    if missing:
        raise _input_error(f"{KEY_PREFIX}.save_additional_columns: column(s) {', '.join(missing)} not found in "
                           f"{path.name}")


def _open_parquet(path: Path, **kwargs: Any) -> pq.ParquetFile:
    """Open a parquet input; a file that is not parquet (a CSV named by the pattern…) is a one-line error
    pointing at ``input_format``."""
    try:
        return pq.ParquetFile(path, **kwargs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _input_error(f"{KEY_PREFIX}.input_format: {path.name} is not a parquet file "
                           f"({str(exc).splitlines()[0]}); set input_format to its format (one of csv, tsv, "
                           "json, jsonl, txt, optionally .gz)") from None


def count_rows(path: Path, options: DownloadOptions) -> int | None:
    """Row count when the format records it (parquet), else None."""
    if _format_of(path, options)[0] == "parquet":
        return _open_parquet(path).metadata.num_rows
    return None


def iter_batches(path: Path, options: DownloadOptions) -> Iterator[pa.RecordBatch]:
    """Record batches holding the wanted columns, in file order."""
    fmt, _compressed = _format_of(path, options)
    columns = _wanted_columns(options)
    if fmt == "parquet":
        # no pre-buffering and no read-ahead threads: otherwise Arrow's memory grows with the file
        parquet = _open_parquet(path, pre_buffer=False)
        _check_columns(path, parquet.schema_arrow.names, options)
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False)
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        text_types = {options.url_col: pa.string()}
        if options.caption_col:
            text_types[options.caption_col] = pa.string()
        reader = pcsv.open_csv(
            str(path), read_options=pcsv.ReadOptions(block_size=1 << 20),
            parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types=text_types, strings_can_be_null=False))
        _check_columns(path, reader.schema.names, options)
        for batch in reader:
            yield batch.select(columns)
    elif fmt in ("json", "jsonl", "txt"):
        opener = gzip.open if path.name.endswith(".gz") else open
        rows: list[dict[str, Any]] = []
        checked = False
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                if fmt == "txt":
                    record = {options.url_col: line}
                else:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise _input_error(f"{KEY_PREFIX}.input_format: {path.name} line {line_number} is not "
                                           "valid JSON (expected one object per line)") from None
                    if not isinstance(record, dict):
                        raise _input_error(f"{KEY_PREFIX}.input_format: {path.name} line {line_number} is not "
                                           "a JSON object")
                if not checked and fmt != "txt":  # a URL list has no other columns: captions stay empty
                    _check_columns(path, list(record), options)
                    checked = True
                rows.append({c: record.get(c) for c in columns})
                if len(rows) == BATCH_ROWS:
                    yield pa.RecordBatch.from_pylist(rows)
                    rows = []
        if rows:
            yield pa.RecordBatch.from_pylist(rows)
    else:  # pragma: no cover - options validate the format
        raise _input_error(f"{KEY_PREFIX}.input_format: unsupported {fmt!r}")


def _as_text(values: list[Any]) -> list[str | None]:
    return [None if v is None else str(v) for v in values]


def iter_shard_jobs(path: Path, options: DownloadOptions, skip: set[int] | None = None) -> Iterator[ShardJob]:
    """Cut the input into :class:`ShardJob` s; shards in ``skip`` are read past without building them."""
    per_shard = options.number_sample_per_shard
    skip = skip or set()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    shard_id = 0

    def build(batches: list[pa.RecordBatch], shard: int) -> ShardJob:
        table = pa.Table.from_batches(batches)
        urls = _as_text(table.column(options.url_col).to_pylist())
        captions = _as_text(table.column(options.caption_col).to_pylist()) if options.caption_col else None
        extra = table.select(list(options.save_additional_columns)) if options.save_additional_columns else None
        keys = [make_key(shard, i, per_shard, options.key_prefix) for i in range(table.num_rows)]
        return ShardJob(shard, keys, urls, captions, extra, first_row=shard * per_shard)

    for batch in iter_batches(path, options):
        while batch.num_rows:
            take = min(per_shard - pending_rows, batch.num_rows)
            if shard_id not in skip:
                pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == per_shard:
                if shard_id not in skip:
                    yield build(pending, shard_id)
                pending, pending_rows = [], 0
                shard_id += 1
    if pending_rows and shard_id not in skip:
        yield build(pending, shard_id)
