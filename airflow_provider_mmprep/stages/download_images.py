"""download_images: turn one input part (a list of image URLs + captions) into img2dataset-style shards.

Task ``i`` of ``N`` takes the ``i``-th part of :func:`input_parts` (the parts matching ``parquet_pattern``) and
writes ``output_dir/<part name>/{shard:05d}.tar|.parquet|_stats.json`` (plus a tar manifest for the later
stages). Work is cut into shards of ``number_sample_per_shard`` rows; ``download_num_processes`` worker
processes each take whole shards and keep ``download_num_threads`` fetches in flight on one event loop.

Reruns skip shards whose ``_stats.json`` exists (written last) and records the current shaping options,
and redo the others from scratch, so a killed task resumes with no duplicate and no partial shard, and a
changed setting (or ``incremental_mode: overwrite``) redoes the shards it shapes. When URLs fail, the task
says how many and why; it fails when all did (or more than ``max_failed_share``). ``retry_failed: true``
then re-attempts only URLs whose latest outcome was a transient failure (timeouts, connection errors, 5xx,
429), writing them — under their original keys — as additional shards numbered after the existing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import tario
from ..config import PipelineConfig
from ..download.options import DownloadOptions, parse_options
from ..download.reader import ShardJob, count_rows, iter_shard_jobs
from ..download.shard import is_complete, shard_paths
from ..fsutil import remove_stale_temporaries, sorted_files
from ..manifest import MANIFEST_SUFFIX, OFFSETS_SUFFIX, FinishedTar, finished_tars
from ..plan import list_parquet_parts
from ..progress import Progress
from ..storage import is_url
from . import StageError
from .download_parquet import part_rows

log = logging.getLogger(__name__)

STAGE = "download_images"

PROGRESS_INTERVAL = 5.0


PathOrUrl = tario.PathOrUrl


def input_parts(cfg: PipelineConfig) -> list[PathOrUrl]:
    """The parquet parts in ``input_dir`` (a folder or a URL), in task order: task ``i`` downloads part ``i``."""
    block = cfg.stage(STAGE)
    if not is_url(block.input_dir):
        return list_parquet_parts(block.input_dir, block.parquet_pattern)
    import fnmatch

    tario.set_storage_options(cfg.storage_options)
    store = tario.store(str(block.input_dir))
    return [store.url(rel) for rel in store.list_files(recursive=True)
            if fnmatch.fnmatch(rel, block.parquet_pattern) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1],
                                                                                block.parquet_pattern)]


def part_name(input_dir: str | Path, part: PathOrUrl) -> str:
    """Stable folder name for one parquet part: its path relative to the input, suffix dropped."""
    rel = tario.relative(part, input_dir) if is_url(part) else Path(part).relative_to(input_dir).as_posix()
    stem = rel[: -len(".parquet")] if rel.endswith(".parquet") else rel
    return stem.replace("/", "__")


def task_inputs(cfg: PipelineConfig, task_id: int, task_count: int) -> list[PathOrUrl]:
    """The one parquet part task ``task_id`` downloads (none when there are fewer parts now)."""
    parts = input_parts(cfg)
    return parts[task_id:task_id + 1]


def _out_folder(output_dir: str | Path, name: str) -> PathOrUrl:
    return tario.join(output_dir, name) if is_url(output_dir) else Path(output_dir) / name


def expected_outputs(cfg: PipelineConfig, task_id: int, task_count: int) -> list[PathOrUrl]:
    """The folder task ``task_id`` writes its shards into, ``output_dir/<part name>/``."""
    block = cfg.stage(STAGE)
    return [_out_folder(block.output_dir, part_name(block.input_dir, part))
            for part in task_inputs(cfg, task_id, task_count)]


def task_output_dirs(cfg: PipelineConfig) -> tuple[list[PathOrUrl], list[PathOrUrl | None]]:
    """Every task's output folder in task order, with its input part where it still exists. With the
    inputs gone (cleaned up), the folders present in name order, without inputs."""
    block = cfg.stage(STAGE)
    parts = input_parts(cfg)
    if parts:
        return [_out_folder(block.output_dir, part_name(block.input_dir, p)) for p in parts], list(parts)
    if is_url(block.output_dir):
        tario.set_storage_options(cfg.storage_options)
        names = sorted({rel.split("/", 1)[0] for rel in tario.store(str(block.output_dir)).list_files(recursive=True)
                        if "/" in rel})
        return [_out_folder(block.output_dir, n) for n in names], [None] * len(names)
    out = Path(block.output_dir)
    folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) if out.is_dir() else []
    return list(folders), [None] * len(folders)


@dataclass
class ShardRecord:
    """One shard of a task's folder as its ``{shard}_stats.json`` (img2dataset's) describes it."""

    stem: str  # "00003"
    stats: dict[str, Any] | None  # None: the file is not valid JSON
    tar_bytes: int | None  # None: no tar
    parquet: PathOrUrl  # every URL's status and error_message


def task_shards(folder: PathOrUrl) -> list[ShardRecord]:
    """The shards in one task's output folder that have a stats file, in shard order."""
    records = []
    if is_url(folder):  # one listing and concurrent reads
        store = tario.store(str(folder))
        sizes = store.file_sizes(recursive=False)
        stems = sorted(n[: -len("_stats.json")] for n in sizes
                       if n.endswith("_stats.json") and n[:1].isdigit())
        raws = store.read_many(f"{stem}_stats.json" for stem in stems)
        for stem in stems:
            try:
                stats = json.loads(raws[f"{stem}_stats.json"])
            except (KeyError, ValueError):
                stats = None
            records.append(ShardRecord(stem, stats, sizes.get(f"{stem}.tar"), store.url(f"{stem}.parquet")))
        return records
    for stats_file in sorted(folder.glob("[0-9]*_stats.json")) if folder.is_dir() else []:
        stem = stats_file.name[: -len("_stats.json")]
        try:
            stats = json.loads(stats_file.read_text())
        except ValueError:
            stats = None
        tar = folder / f"{stem}.tar"
        tar_bytes = tar.stat().st_size if tar.is_file() else None
        records.append(ShardRecord(stem, stats, tar_bytes, folder / f"{stem}.parquet"))
    return records


def task_problem(cfg: PipelineConfig, folder: PathOrUrl, shards: list[ShardRecord], expected_rows: int | None
                 ) -> str | None:
    """Why the task that wrote ``shards`` into ``folder`` is not done, or None: no shard, a shard broken,
    fewer URLs with a status than its part has rows (stopped part-way), or more failed URLs than
    ``max_failed_share`` allows (the task itself fails then)."""
    if not shards:
        return f"no *_stats.json in {tario.name_of(folder)}/"
    problem = None
    tried = succeeded = 0
    for shard in shards:
        stats = shard.stats
        if stats is None:
            problem = f"{shard.stem}_stats.json is not valid JSON"
            continue
        successes = int(stats.get("successes", 0))
        succeeded += successes
        if not stats.get("retry_round"):  # a retry shard re-tries URLs already counted
            tried += int(stats.get("count", 0))
        if shard.tar_bytes is None and successes > 0:
            problem = f"{shard.stem}_stats.json present but {shard.stem}.tar missing"
    if problem is not None:
        return problem
    max_failed_share = cfg.stage(STAGE).max_failed_share
    if expected_rows is not None and tried < expected_rows:  # a task stopped part-way (crash, pod evicted)
        return f"{tried:,} of {expected_rows:,} URLs of its part have a status"
    if tried and (succeeded == 0 or (tried - succeeded) / tried > max_failed_share):
        return f"{tried - succeeded:,} of {tried:,} URLs failed (max_failed_share {max_failed_share:g})"
    return None


def finished_outputs(cfg: PipelineConfig) -> tuple[list[FinishedTar], list[str]]:
    """The shard tars with a current manifest in every task's folder (named ``<folder>/<tar>``, each with
    its task), and the names of those without one."""
    tars: list[FinishedTar] = []
    unlisted: list[str] = []
    for task_id, folder in enumerate(task_output_dirs(cfg)[0]):
        if is_url(folder):  # finished shards: those with stats (written last); no manifest check here
            name = tario.name_of(folder)
            records = task_shards(folder)
            tars += [FinishedTar(f"{name}/{r.stem}.tar", int(r.stats.get("successes", 0)), r.tar_bytes,
                                 float(r.stats.get("end_time", 0.0)), task_id)
                     for r in records if r.stats is not None and r.tar_bytes is not None]
            continue
        done, rest = finished_tars(folder)
        tars += [t._replace(name=f"{folder.name}/{t.name}", task_id=task_id) for t in done]
        unlisted += [f"{folder.name}/{name}" for name in rest]
    return tars, unlisted


def incomplete_tasks(cfg: PipelineConfig, task_count: int) -> dict[int, str]:
    """The tasks whose output folder is missing shards or holds a failed task's shards, each with why."""
    folders, parts = task_output_dirs(cfg)
    result = {}
    for task_id, (folder, part) in enumerate(zip(folders, parts)):
        problem = task_problem(cfg, folder, task_shards(folder), part_rows(part, cfg.storage_options))
        if problem is not None:
            result[task_id] = problem
    return {t: r for t, r in result.items() if t < task_count}


def options_from_config(cfg: PipelineConfig) -> DownloadOptions:
    block = cfg.download_images
    return parse_options(block.img2dataset_additional_arguments, threads=block.download_num_threads,
                         processes=block.download_num_processes,
                         allow_private_addresses=block.allow_private_addresses,
                         max_image_bytes=block.max_image_bytes, max_image_pixels=block.max_image_pixels,
                         max_redirects=block.max_redirects,
                         max_connections_per_host=block.max_connections_per_host)


class _ProgressReporter:
    """Log done/total, images/s and success rate every few seconds while shards run."""

    def __init__(self, what: str, total: int | None):
        self.progress = Progress(what, total, unit="images", interval=PROGRESS_INTERVAL)
        self.ok = 0

    def update(self, done: int, ok: int) -> None:
        delta = done - self.progress.done
        self.ok = ok
        rate = f"{100 * ok / done:.1f}%" if done else "-"
        self.progress.advance(delta, success=rate)


def run_jobs(jobs: Iterable[ShardJob], options: DownloadOptions, out_dir: Path, total: int | None,
             parallel_hint: int | None = None, what: str = "download_images") -> list[dict[str, Any]]:
    """Download every job: in this process with one worker, else with ``processes`` worker processes.

    Either way URLs flow across shard boundaries on one event loop per process (download/pipeline.py). With
    fewer shards than processes (a small part, or img2dataset's default 10,000 samples per shard) each shard
    is cut into contiguous pieces fetched by different processes and joined in order afterwards, so no
    process sits idle and the tar is the same as one process would write.
    """
    job_iter: Iterator[ShardJob] = iter(jobs)
    first = next(job_iter, None)
    if first is None:  # nothing pending (a rerun of a finished task): no pool, no process split to plan
        return []
    job_iter = itertools.chain([first], job_iter)
    from ..download.pipeline import download_here, download_in_processes  # httptools, PIL: only to download

    reporter = _ProgressReporter(what, total)
    processes = options.processes
    if processes == 1:
        counts = [0, 0]

        def count(success: bool) -> None:
            counts[0] += 1
            counts[1] += success
            if counts[0] % 64 == 0:
                reporter.update(*counts)

        results = download_here(job_iter, options, out_dir, count)
        reporter.update(*counts)
    else:
        pieces_per_shard = 1 if not parallel_hint or parallel_hint >= processes else -(-processes // parallel_hint)
        results = download_in_processes(job_iter, options, out_dir, pieces_per_shard, reporter.update)
    reporter.progress.finish()
    return results


def _shard_files(out_dir: PathOrUrl, shard_id: int) -> dict[str, PathOrUrl]:
    """:func:`..download.shard.shard_paths` for a local folder or a URL."""
    if not is_url(out_dir):
        return dict(shard_paths(Path(out_dir), shard_id))
    stem = f"{shard_id:05d}"
    return {"tar": tario.join(out_dir, f"{stem}.tar"), "parquet": tario.join(out_dir, f"{stem}.parquet"),
            "stats": tario.join(out_dir, f"{stem}_stats.json")}


def _read_parquet(path: PathOrUrl, columns: list[str] | None = None) -> pa.Table:
    if not is_url(path):
        return pq.read_table(path, columns=columns)
    return pq.read_table(pa.BufferReader(tario.read_bytes(path)), columns=columns)


def _complete_shards(out_dir: PathOrUrl) -> list[int]:
    if is_url(out_dir):  # one listing: a shard is complete when its tar, parquet and stats are all there
        names = set(tario.file_names(out_dir))
        return sorted(int(n[:-11]) for n in names if n.endswith("_stats.json") and n[: -len("_stats.json")].isdigit()
                      and {f"{n[:-11]}.tar", f"{n[:-11]}.parquet"} <= names)
    ids = []
    for stats in sorted_files(out_dir, "*_stats.json"):
        stem = stats.name[: -len("_stats.json")]
        if stem.isdigit() and is_complete(out_dir, int(stem)):
            ids.append(int(stem))
    return sorted(ids)


def _read_stats(out_dir: PathOrUrl, shard_id: int) -> dict[str, Any]:
    try:
        return json.loads(tario.read_bytes(_shard_files(out_dir, shard_id)["stats"]))
    except (OSError, ValueError):
        return {}


def _remove_shard(out_dir: PathOrUrl, shard_id: int) -> None:
    paths = _shard_files(out_dir, shard_id)
    tario.unlink(paths["stats"])  # first: the shard stops counting as complete
    tar = paths["tar"]
    # the manifest and offsets sidecar beside the tar, by the suffixes manifest.py names (URL or path alike)
    for path in (tar, f"{tar}{MANIFEST_SUFFIX}", f"{tar}{OFFSETS_SUFFIX}", paths["parquet"]):
        tario.unlink(path)


def stale_shards(out_dir: PathOrUrl, options: DownloadOptions, regular_total: int | None) -> set[int]:
    """The complete regular shards to download again (they stay in place until their new files replace
    them, so nothing is lost if the redo is interrupted); stale shards that the current options no longer
    produce (beyond ``regular_total``, or retry shards) are removed now.

    Stale: made with other shaping options (:meth:`DownloadOptions.shaping`; e.g. ``allow_private_addresses``
    changed after everything was refused), or every shard under ``incremental_mode: overwrite``. A shard
    without a recorded fingerprint (an older mmprep) is kept as it is.
    """
    wanted = options.fingerprint()
    overwrite = options.incremental_mode == "overwrite"
    stale: list[int] = []
    changed: set[str] = set()
    current = options.shaping()
    for shard_id in _complete_shards(out_dir):
        stats = _read_stats(out_dir, shard_id)
        recorded = stats.get("options_fingerprint")
        if overwrite or (recorded is not None and recorded != wanted):
            stale.append(shard_id)
            old = stats.get("options")
            changed |= {k for k in current if not isinstance(old, dict) or old.get(k) != current[k]}
            if stats.get("retry_round") or regular_total is None or shard_id >= regular_total:
                _remove_shard(out_dir, shard_id)
    if stale:
        why = "incremental_mode: overwrite" if overwrite else f"made with other options ({', '.join(sorted(changed))})"
        log.warning("download_images: redoing %d shard(s) in %s: %s", len(stale), out_dir, why)
    return {s for s in stale if tario.exists(_shard_files(out_dir, s)["stats"])}


def latest_failures(out_dir: PathOrUrl) -> Counter:
    """Failure reasons of the URLs whose latest outcome (retry shards included) is a failure."""
    latest: dict[str, str | None] = {}
    for shard_id in _complete_shards(out_dir):
        table = _read_parquet(_shard_files(out_dir, shard_id)["parquet"], ["key", "status", "error_message"])
        for key, status, error in zip(*(table.column(c).to_pylist() for c in ("key", "status", "error_message"))):
            latest[key] = None if status == "success" else " ".join(str(error or status).split())[:120]
    return Counter(reason for reason in latest.values() if reason is not None)


def check_failures(out_dir: PathOrUrl, summary: dict[str, Any], max_failed_share: float, what: str) -> None:
    """Warn when URLs failed, naming the top reasons; fail the task above ``max_failed_share`` (or when
    every URL failed), so a run that produced nothing never counts as done."""
    urls, successes = summary["urls"], summary["successes"]
    failed = urls - successes
    if urls == 0 or failed <= 0:
        return
    reasons = latest_failures(out_dir)
    top = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(3))
    message = f"{what}: {failed:,} of {urls:,} URLs failed ({failed / urls:.0%}); top reasons: {top}"
    summary["top_failure_reasons"] = dict(reasons.most_common(5))
    if failed == urls or failed / urls > max_failed_share:
        limit = "every URL failed" if failed == urls else f"more than max_failed_share {max_failed_share:g}"
        raise StageError(f"download_images.max_failed_share: {message} ({limit}). Fix the cause (e.g. "
                         "allow_private_addresses, img2dataset options) and rerun: shards made with other "
                         "options are redone; incremental_mode: overwrite redoes them all")
    log.warning("%s", message)


def retry_jobs(out_dir: PathOrUrl, options: DownloadOptions, first_shard: int) -> Iterator[ShardJob]:
    """Jobs re-attempting every key whose latest recorded outcome is a transient failure, keys unchanged."""
    latest: dict[str, int] = {}  # key -> shard holding its latest transient failure
    for shard_id in _complete_shards(out_dir):
        table = _read_parquet(_shard_files(out_dir, shard_id)["parquet"], ["key", "status", "retryable"])
        for key, status, retryable in zip(*(table.column(c).to_pylist() for c in ("key", "status", "retryable"))):
            if status != "success" and retryable:
                latest[key] = shard_id
            else:
                latest.pop(key, None)
    if not latest:
        return
    wanted_by_shard: dict[int, set[str]] = {}
    for key, shard_id in latest.items():
        wanted_by_shard.setdefault(shard_id, set()).add(key)
    tables = []
    for shard_id, keys in sorted(wanted_by_shard.items()):
        table = _read_parquet(_shard_files(out_dir, shard_id)["parquet"])
        mask = pa.array([k in keys for k in table.column("key").to_pylist()])
        tables.append(table.filter(mask))
    rows = pa.concat_tables(tables, promote_options="default").sort_by("key")
    per_shard = options.number_sample_per_shard
    extra_names = [c for c in options.save_additional_columns if c in rows.column_names]
    for number, start in enumerate(range(0, rows.num_rows, per_shard)):
        chunk = rows.slice(start, per_shard)
        yield ShardJob(
            first_shard + number, chunk.column("key").to_pylist(), chunk.column("url").to_pylist(),
            chunk.column("caption").to_pylist() if options.caption_col and "caption" in chunk.column_names else None,
            chunk.select(extra_names) if extra_names else None, retry=True)


def _summary(out_dir: PathOrUrl) -> dict[str, Any]:
    totals = {"shards": 0, "retry_shards": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    rows = 0
    for shard_id in _complete_shards(out_dir):
        stats = json.loads(tario.read_bytes(_shard_files(out_dir, shard_id)["stats"]))
        if stats.get("retry_round"):
            totals["retry_shards"] += 1
            totals["successes"] += stats["successes"]  # recovered samples
        else:
            totals["shards"] += 1
            rows += stats["count"]
            for name in ("successes", "failed_to_download", "failed_to_resize"):
                totals[name] += stats[name]
    totals["urls"] = rows
    return totals


def spool_folder(out_url: str) -> Path:
    """The local folder a task writing to ``out_url`` spools its open pieces and finished shard in
    (``$MMPREP_SPOOL_DIR`` or the temp folder): one per output folder, so a rerun on the same machine
    clears what a killed run left."""
    root = os.environ.get("MMPREP_SPOOL_DIR") or tempfile.gettempdir()
    return Path(root) / f"mmprep-download-{hashlib.sha256(out_url.encode()).hexdigest()[:16]}"


def _local_part(part: PathOrUrl, spool: Path) -> Path:
    """The input part as a local file: itself, or a copy in ``spool`` fetched from object storage (the
    readers stream it in batches; a part is one of many, so the copy is small next to the dataset)."""
    if not is_url(part):
        return Path(part)
    folder, _, name = str(part).rpartition("/")
    target = spool / "input" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tario.store(folder).open_read(name, block_size=8 * 2**20) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 8 * 2**20)
    return target


def run_task(cfg: PipelineConfig, task_id: int, task_count: int) -> dict[str, Any]:
    block = cfg.download_images
    tario.set_storage_options(cfg.storage_options)
    parts = input_parts(cfg)
    if not parts:
        raise StageError(f"download_images.input_dir: no file matching {block.parquet_pattern!r} in "
                         f"{block.input_dir}")
    if task_id >= len(parts):
        raise StageError(f"download_images: task id {task_id} but only {len(parts)} input part(s) match "
                         f"{block.parquet_pattern!r} in {block.input_dir}")
    if task_count != len(parts):
        log.warning("download_images: running task %d of %d, but %d part(s) are present now", task_id, task_count,
                    len(parts))
    part = parts[task_id]
    options = dataclasses.replace(options_from_config(cfg), key_prefix=f"{task_id:05d}")
    out_dir = _out_folder(block.output_dir, part_name(block.input_dir, part))
    if is_url(out_dir):
        # shards are written to a local spool folder and uploaded one by one as they finish (stats last)
        tario.makedirs(out_dir)  # the bucket must exist (one clear line if not)
        removed = tario.remove_leftovers(out_dir)  # temporary keys, unfinished multipart uploads
        work = spool_folder(str(out_dir))
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        options = dataclasses.replace(options, publish_to=str(out_dir))
    else:
        work = Path(out_dir)
        work.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temporaries(work)
    if removed:
        log.info("download_images: removed %d temporary file(s) left by an interrupted run in %s", removed, out_dir)
    try:
        return _run_part(cfg, part, options, out_dir, work)
    finally:
        if work != out_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run_part(cfg: PipelineConfig, part: PathOrUrl, options: DownloadOptions, out_dir: PathOrUrl,
              work: Path) -> dict[str, Any]:
    """Download one part into ``out_dir`` (``work``: where shards are written before they are published
    there; the same folder when ``out_dir`` is local)."""
    block = cfg.download_images
    started = time.monotonic()
    local_part = _local_part(part, work)
    rows = count_rows(local_part, options)
    per_shard = options.number_sample_per_shard
    regular_total = -(-rows // per_shard) if rows is not None else None
    redo = stale_shards(out_dir, options, regular_total)
    complete = set(_complete_shards(out_dir)) - redo
    todo_shards = None if regular_total is None else [s for s in range(regular_total) if s not in complete]
    retry_shards = [s for s in complete if _read_stats(out_dir, s).get("retry_round")]
    if retry_shards and todo_shards:
        # a regular shard is redone (its tar was lost, or its options changed): it fetches its failed URLs
        # again, so the retry shards, which hold earlier re-fetches of some of them, would repeat keys
        log.warning("download_images: %d regular shard(s) to redo in %s: removing its %d retry shard(s)",
                    len(todo_shards or []), out_dir, len(retry_shards))
        for shard_id in retry_shards:
            _remove_shard(out_dir, shard_id)
        complete -= set(retry_shards)
    todo = None if todo_shards is None else len(todo_shards)
    todo_rows = None if todo_shards is None else sum(min(per_shard, rows - s * per_shard) for s in todo_shards)
    name = part_name(block.input_dir, part)
    log.info("download_images: part %s (%s rows) -> %s; %d shard(s) already complete", tario.name_of(part),
             rows if rows is not None else "?", out_dir, len(complete))
    results = run_jobs(iter_shard_jobs(local_part, options, skip=complete), options, work,
                       todo_rows, parallel_hint=todo, what=f"download_images[{name}]")

    retried = 0
    if block.retry_failed:
        complete_now = _complete_shards(out_dir)
        first = max([regular_total or 0] + [s + 1 for s in complete_now])
        retry_results = run_jobs(retry_jobs(out_dir, options, first), options, work, None,
                                 what=f"download_images[{tario.name_of(part)}] retry")
        retried = sum(r["count"] for r in retry_results)

    summary = _summary(out_dir)
    summary.update({"part": name, "output_dir": str(out_dir),
                    "downloaded_shards": len(results), "skipped_shards": len(complete), "redone_shards": len(redo),
                    "retried_urls": retried, "seconds": round(time.monotonic() - started, 3)})
    check_failures(out_dir, summary, block.max_failed_share, f"download_images[{name}]")
    return summary
