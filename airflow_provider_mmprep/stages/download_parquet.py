"""download_parquet: fetch the (URL, caption) parquet files of a Hugging Face dataset repo, optionally split.

Downloading is huggingface_hub's ``snapshot_download`` into ``output_dir`` (it resumes partial files and skips
complete ones; ``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured). With ``parquet_subpartitions: N > 1`` each
file is split into N parts of contiguous rows, streamed by record batch so a file never sits in memory
whole. A split leaves a small record (``.mmprep/split/<file>.json``) so a rerun neither downloads nor splits
that file again, although the original is gone.

``output_dir`` may be a URL (``s3://…``): each file is then downloaded to a local spool folder, uploaded (a
multipart upload whose completion is the commit) or split into parts written straight to object storage, and
removed locally before the next file, so local disk holds one source file at a time (``$MMPREP_SPOOL_DIR``,
default the temp folder). A file already present with the hub's size, or already split (its record names
parts that all exist), is skipped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, ContextManager

import pyarrow.parquet as pq

from ..config import PipelineConfig
from ..fsutil import atomic_path, atomic_write_bytes, task_range
from ..plan import list_parquet_parts
from ..progress import Progress
from ..storage import Store, is_url
from . import StageError

log = logging.getLogger(__name__)

SPLIT_RECORD_DIR = Path(".mmprep") / "split"
BATCH_ROWS = 65_536


def _split_record_path(output_dir: Path, rel: str) -> Path:
    return output_dir / SPLIT_RECORD_DIR / f"{rel}.json"


def part_paths(original: Path, count: int) -> list[Path]:
    """Names of the parts of ``original``: ``name_part003-of-010.parquet`` beside it, sorting in row order."""
    stem = original.name[: -len(".parquet")] if original.name.endswith(".parquet") else original.name
    return [original.with_name(f"{stem}_part{i:03d}-of-{count:03d}.parquet") for i in range(count)]


def _already_split(output_dir: Path, rel: str, count: int) -> bool:
    record_path = _split_record_path(output_dir, rel)
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    return record.get("parts") == count and all(
        (output_dir / p).is_file() for p in record.get("part_files", []))


def _write_parts(parquet: pq.ParquetFile, parts: list[Any], keep: set[Any],
                 open_sink: Callable[[Any], ContextManager[Any]]) -> None:
    """Write ``parquet``'s rows as ``len(parts)`` parts of contiguous rows (the split of
    :func:`..fsutil.task_range`), each through ``open_sink(part)`` (a temp path renamed, or an upload whose
    end is the commit); parts in ``keep`` are skipped over, not rewritten."""
    total_rows = parquet.metadata.num_rows
    batches = parquet.iter_batches(batch_size=BATCH_ROWS)
    pending = None  # a batch (or its tail) not yet written
    for index, part in enumerate(parts):
        wanted = len(task_range(total_rows, index, len(parts)))
        with contextlib.ExitStack() as stack:
            writer = None
            if part not in keep:
                writer = stack.enter_context(pq.ParquetWriter(stack.enter_context(open_sink(part)),
                                                              parquet.schema_arrow))
            while wanted > 0:
                if pending is None or pending.num_rows == 0:
                    pending = next(batches)
                take = min(wanted, pending.num_rows)
                if writer is not None:
                    writer.write_batch(pending.slice(0, take))
                pending = pending.slice(take)
                wanted -= take


def split_parquet(source: Path, count: int, output_dir: Path) -> list[Path]:
    """Split ``source`` into ``count`` parts of contiguous rows, each written atomically; then record the
    split and remove ``source``. Row order and values are preserved exactly."""
    parquet = pq.ParquetFile(source)
    total_rows = parquet.metadata.num_rows
    parts = part_paths(source, count)
    rel = source.relative_to(output_dir).as_posix()
    try:  # the same split done before, with a part lost since: write only the missing parts
        earlier = json.loads(_split_record_path(output_dir, rel).read_text())
    except (FileNotFoundError, ValueError):
        earlier = {}
    keep = {p for p in parts if p.is_file()} if earlier.get("parts") == count else set()
    _write_parts(parquet, parts, keep, atomic_path)
    rel = source.relative_to(output_dir).as_posix()
    record_path = _split_record_path(output_dir, rel)
    try:  # an earlier split into another number of parts: its parts would duplicate rows, remove them
        stale = set(json.loads(record_path.read_text()).get("part_files", []))
    except (FileNotFoundError, ValueError):
        stale = set()
    record = {"source": rel, "rows": total_rows, "parts": count,
              "part_files": [p.relative_to(output_dir).as_posix() for p in parts]}
    body = json.dumps(record, indent=1).encode()
    if not record_path.is_file() or record_path.read_bytes() != body:
        atomic_write_bytes(record_path, body)
    source.unlink()
    for old in stale - set(record["part_files"]):
        (output_dir / old).unlink(missing_ok=True)
    return parts


def _remote_files(cfg: PipelineConfig, endpoint: str | None, token: str | None) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    block = cfg.download_parquet
    api = HfApi(endpoint=endpoint, token=token)
    try:
        files = api.list_repo_files(cfg.dataset_repo_id, repo_type="dataset", revision=block.revision)
    except RevisionNotFoundError:
        raise StageError(f"download_parquet.revision: revision {block.revision!r} not found in dataset "
                         f"{cfg.dataset_repo_id!r}") from None
    except RepositoryNotFoundError:
        raise StageError(f"dataset_repo_id: dataset repo {cfg.dataset_repo_id!r} not found at "
                         f"{api.endpoint} (check the name; private or gated repos need HF_TOKEN or "
                         "download_parquet.hf_token)") from None
    except HfHubHTTPError as exc:
        raise StageError(f"dataset_repo_id: listing {cfg.dataset_repo_id!r} at {api.endpoint} failed: "
                         f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # connection refused, DNS, TLS, timeouts: the hub is not reachable from here
        reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise StageError(f"download_parquet: cannot reach the dataset hub at {api.endpoint} "
                         f"({type(exc).__name__}: {reason[:200]}); check the network, HF_ENDPOINT and proxies, "
                         "then rerun") from None
    return sorted(f for f in files if fnmatch.fnmatch(f, block.parquet_pattern))


def _matches(rel: str, pattern: str) -> bool:
    """The test :func:`..plan.list_parquet_parts` applies: the relative path or the base name matches."""
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern)


def _split_to_store(source: Path, rel: str, count: int, store: Store) -> list[str]:
    """:func:`split_parquet` for object storage: the parts (the same bytes) go up one by one, each a single
    atomic upload, then the split record; parts an earlier split of the same count left are kept."""
    parquet = pq.ParquetFile(source)
    total_rows = parquet.metadata.num_rows
    parts = [p.as_posix() for p in part_paths(Path(rel), count)]
    record_name = f"{SPLIT_RECORD_DIR.as_posix()}/{rel}.json"
    try:
        earlier = json.loads(store.read_bytes(record_name))
    except (FileNotFoundError, ValueError):
        earlier = {}
    keep = {p for p in parts if store.exists(p)} if earlier.get("parts") == count else set()
    _write_parts(parquet, parts, keep, store.open_write)
    stale = set(earlier.get("part_files", [])) - set(parts)
    record = {"source": rel, "rows": total_rows, "parts": count, "part_files": parts}
    store.write_bytes(record_name, json.dumps(record, indent=1).encode())
    store.remove(rel)  # an unsplit copy from a run with parquet_subpartitions: 1
    for old in stale:
        store.remove(old)
    return parts


def _run_into_store(cfg: PipelineConfig, endpoint: str | None, token: str | None) -> dict[str, Any]:
    """download_parquet with a URL ``output_dir``: one file at a time through a local spool folder."""
    import tempfile

    from huggingface_hub import HfApi, hf_hub_download

    block = cfg.download_parquet
    store = Store(block.output_dir, cfg.storage_options)
    store.check()
    count = block.parquet_subpartitions
    remote = _remote_files(cfg, endpoint, token)
    if not remote:
        raise StageError(f"download_parquet.parquet_pattern: no file of dataset {cfg.dataset_repo_id!r} "
                         f"matches {block.parquet_pattern!r}")
    present = store.file_sizes()
    if count == 1:
        hub_sizes = {info.path: getattr(info, "size", None) for info in HfApi(endpoint=endpoint, token=token)
                     .get_paths_info(cfg.dataset_repo_id, remote, repo_type="dataset", revision=block.revision)}
        to_fetch = [f for f in remote if f not in present or present[f] != hub_sizes.get(f)]
    else:
        records = store.read_many(f"{SPLIT_RECORD_DIR.as_posix()}/{f}.json" for f in remote)
        done = set()
        for f in remote:
            try:
                record = json.loads(records[f"{SPLIT_RECORD_DIR.as_posix()}/{f}.json"])
            except (KeyError, ValueError):
                continue
            if record.get("parts") == count and all(p in present for p in record.get("part_files", [])):
                done.add(f)
        to_fetch = [f for f in remote if f not in done]
    store.remove_leftovers("", None)  # earlier killed uploads into the top folder (this stage is one task)
    log.info("download_parquet: %d file(s) match %r, %d to fetch into %s", len(remote), block.parquet_pattern,
             len(to_fetch), store.root)
    spool_root = os.environ.get("MMPREP_SPOOL_DIR") or None
    if spool_root:
        os.makedirs(spool_root, exist_ok=True)
    progress = Progress("download_parquet: fetching", len(to_fetch), unit="files")
    split_files = 0
    for rel in to_fetch:
        with tempfile.TemporaryDirectory(prefix="mmprep-parquet-", dir=spool_root) as spool:
            try:
                local = Path(hf_hub_download(cfg.dataset_repo_id, rel, repo_type="dataset", revision=block.revision,
                                             local_dir=spool, token=token, endpoint=endpoint))
            except Exception as exc:
                raise StageError(f"download_parquet: download of {rel} from {endpoint or 'the Hub'} failed "
                                 f"({type(exc).__name__}): {str(exc).splitlines()[0]}; rerun to resume") from None
            if count == 1:
                store.publish_file(local, rel, move=True)
            else:
                _split_to_store(local, rel, count, store)
                split_files += 1
        progress.advance()
    progress.finish()
    parts = [rel for rel in store.list_files(recursive=True) if _matches(rel, block.parquet_pattern)]
    log.info("download_parquet: %d parquet part(s) ready in %s (download_images fans out over these)",
             len(parts), store.root)
    return {"files": len(remote), "fetched_or_verified": len(to_fetch), "split": split_files,
            "parts": len(parts)}

def expected_outputs(cfg: PipelineConfig, task_id: int = 0, task_count: int = 1) -> list[Path]:
    """The parquet parts in ``output_dir`` now (which exist is the hub's business): download_images fans
    out over these."""
    block = cfg.stage("download_parquet")
    if is_url(block.output_dir):  # URLs (strings) of the parts in object storage
        store = Store(block.output_dir, cfg.storage_options)
        return [store.url(rel) for rel in store.list_files(recursive=True)  # type: ignore[misc]
                if _matches(rel, block.parquet_pattern)]
    return list_parquet_parts(block.output_dir, block.parquet_pattern)


def part_rows(part: Path | str | None, storage_options: dict[str, Any] | None = None) -> int | None:
    """A part's row count from its parquet footer (no data read), or None if unknown or unreadable."""
    if part is None:
        return None
    try:
        if is_url(part):
            folder, _, name = str(part).rpartition("/")
            with Store(folder, storage_options).open_read(name, block_size=2**20) as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        return pq.ParquetFile(part).metadata.num_rows
    except Exception:  # a truncated file must not stop the caller
        return None


def incomplete_tasks(cfg: PipelineConfig, task_count: int = 1) -> dict[int, str]:
    """``{0: why}`` when no part is there or one is unreadable, else ``{}``."""
    parts = expected_outputs(cfg)
    if not parts:
        return {0: "no parquet output"}
    if any(part_rows(part, cfg.storage_options) is None for part in parts):
        return {0: "unreadable parquet output"}
    return {}


def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    block = cfg.download_parquet
    if is_url(block.output_dir):
        return _run_into_store(cfg, os.environ.get("HF_ENDPOINT") or None,
                               block.hf_token or os.environ.get("HF_TOKEN") or None)
    output_dir = Path(block.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = block.hf_token or os.environ.get("HF_TOKEN") or None
    count = block.parquet_subpartitions

    remote = _remote_files(cfg, endpoint, token)
    if not remote:
        raise StageError(f"download_parquet.parquet_pattern: no file of dataset {cfg.dataset_repo_id!r} "
                         f"matches {block.parquet_pattern!r}")
    to_fetch = [f for f in remote if count == 1 or not _already_split(output_dir, f, count)]
    log.info("download_parquet: %d file(s) match %r, %d to fetch or verify", len(remote),
             block.parquet_pattern, len(to_fetch))
    if to_fetch:
        try:
            snapshot_download(cfg.dataset_repo_id, repo_type="dataset", revision=block.revision,
                              local_dir=output_dir, allow_patterns=to_fetch, token=token,
                              endpoint=endpoint, max_workers=block.max_workers)
        except Exception as exc:  # HTTP, protocol and OS errors alike: partial files stay for resume
            raise StageError(f"download_parquet: download from {endpoint or 'the Hub'} failed "
                             f"({type(exc).__name__}): {str(exc).splitlines()[0]}; rerun to resume") from None

    split_files = 0
    if count > 1:
        progress = Progress("download_parquet: splitting", len(to_fetch), unit="files")
        for rel in to_fetch:
            source = output_dir / rel
            if source.is_file():
                split_parquet(source, count, output_dir)
                split_files += 1
            progress.advance()
        progress.finish()

    parts = expected_outputs(cfg)
    log.info("download_parquet: %d parquet part(s) ready in %s (download_images fans out over these)",
             len(parts), output_dir)
    return {"files": len(remote), "fetched_or_verified": len(to_fetch), "split": split_files,
            "parts": len(parts)}
