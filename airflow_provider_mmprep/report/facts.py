"""The report's facts: what each stage left on disk and which of its tasks are to redo, as the stages
themselves answer (their ``incomplete_tasks``, ``finished_outputs``, ...: nothing here globs a stage's
folders or spells its file names), plus Airflow's task states where the DAG passes them.

- download_parquet: its parts (row counts from parquet footers, no data read);
- download_images: each task's shards as img2dataset's ``_stats.json`` describe them (counts, start/end
  times; failure reasons from ``status_dict``, else from the shard parquet's ``status``/``error_message``);
- reorganize_tar / precache_encodings: the tars with a current manifest (:mod:`..manifest`);
- generate_wdinfo: ``wdinfo.pkl``, loaded with an unpickler that admits no classes at all.

A stage whose outputs cannot be read costs a note on that stage, never the report.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import STAGE_NAMES, PipelineConfig
from ..stages import download_images, download_parquet, generate_wdinfo, precache_encodings, reorganize_tar

log = logging.getLogger(__name__)

#: Airflow task-instance states that mean "this map index needs to run again".
FAILED_STATES = frozenset({"failed", "upstream_failed", "removed"})


@dataclass
class StageFacts:
    """What the report knows about one stage; ``rows`` are the (label, value) pairs of its counts table."""

    name: str
    enabled: bool
    output: str | None = None
    task_count: int | None = None
    task_ids: list[int] | None = None
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # task ids found incomplete on disk, with the reason
    incomplete: dict[int, str] = field(default_factory=dict)
    # per tar: (name, sample_count, bytes, mtime, task_id or None)
    tars: list[tuple[str, int, int, float, int | None]] = field(default_factory=list)


@dataclass
class DownloadFacts:
    status_counts: Counter = field(default_factory=Counter)
    error_counts: Counter = field(default_factory=Counter)
    # per task: list of (start_time, end_time, successes, count) per shard
    shards_by_task: dict[int, list[tuple[float, float, int, int]]] = field(default_factory=dict)
    retryable_tasks: set[int] = field(default_factory=set)


def fmt_int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def fmt_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value} B"


# --------------------------------------------------------------------------------------------------------
# Per-stage collectors
# --------------------------------------------------------------------------------------------------------


def _collect_download_parquet(cfg: PipelineConfig, facts: StageFacts) -> None:
    block = cfg.download_parquet
    parts = download_parquet.expected_outputs(cfg)
    facts.output, facts.task_count, facts.task_ids = str(block.output_dir), 1, [0]
    facts.incomplete.update(download_parquet.incomplete_tasks(cfg))
    if not parts:
        facts.notes.append(f"no parquet files matching {block.parquet_pattern!r} in {block.output_dir} "
                           "(stage not run yet, or failed)")
        return
    from .. import tario  # noqa: PLC0415

    tario.set_storage_options(cfg.storage_options)  # parts may be URLs
    rows = [download_parquet.part_rows(part, cfg.storage_options) for part in parts]
    facts.rows += [("parquet parts", fmt_int(len(parts))), ("URL rows", fmt_int(sum(r or 0 for r in rows))),
                   ("bytes", fmt_bytes(sum(tario.size(p) for p in parts)))]
    unreadable = [tario.name_of(part) for part, count in zip(parts, rows) if count is None]
    if unreadable:
        facts.notes.append(f"unreadable parquet files: {', '.join(unreadable[:5])}")


def _collect_download_images(cfg: PipelineConfig, facts: StageFacts, dl: DownloadFacts) -> None:
    block = cfg.download_images
    facts.output = str(block.output_dir)
    folders, inputs = download_images.task_output_dirs(cfg)
    if folders and inputs[0] is None:
        facts.notes.append(f"input parquet parts not found in {block.input_dir}; task ids below follow the output "
                           "folders' name order")
    facts.task_count, facts.task_ids = len(folders), list(range(len(folders)))
    if not folders:
        facts.notes.append(f"no parquet parts in {block.input_dir} and no output in {block.output_dir}: "
                           "nothing to report (stage not run yet)")
        return
    totals: Counter = Counter()
    tar_count = tar_bytes = 0
    for task_id, (folder, part) in enumerate(zip(folders, inputs)):
        shards_read = download_images.task_shards(folder)
        problem = download_images.task_problem(cfg, folder, shards_read,
                                               download_parquet.part_rows(part, cfg.storage_options))
        if problem is not None:
            facts.incomplete[task_id] = problem
        shards = []
        transient, resolved, unknown_transient = 0, 0, False
        for shard in shards_read:
            stats = shard.stats
            if stats is None:
                continue
            retry_round = bool(stats.get("retry_round"))
            for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
                totals[key] += int(stats.get(key, 0))
            if retry_round:
                # a retry shard re-tries URLs already counted as (transient) download failures: they are
                # not new URLs, and each leaves failed_to_download for whatever status it has now
                totals["count"] -= int(stats.get("count", 0))
                totals["failed_to_download"] -= int(stats.get("count", 0))
            if stats.get("start_time") is not None and stats.get("end_time") is not None:
                shards.append((float(stats["start_time"]), float(stats["end_time"]),
                               int(stats.get("successes", 0)), int(stats.get("count", 0))))
            if shard.tar_bytes is not None:
                tar_count += 1
                tar_bytes += shard.tar_bytes
            # URLs still failing transiently (what retry_failed would re-fetch): transient failures of the
            # regular shards less those a retry round settled (success or a permanent failure)
            if "retryable" not in stats:  # stats not written by mmprep: any download failure may be retried
                unknown_transient |= int(stats.get("failed_to_download", 0)) > 0
            elif retry_round:
                resolved += int(stats.get("count", 0)) - int(stats["retryable"])
            else:
                transient += int(stats["retryable"])
            status_dict = stats.get("status_dict")
            if retry_round:
                pass  # failure reasons stay those of the first attempts (not counted twice)
            elif isinstance(status_dict, dict) and status_dict:
                _count_status_dict(status_dict, dl)
            else:  # no status_dict: read the two status columns of the shard's parquet
                _collect_statuses(shard.parquet, dl)
        if unknown_transient or transient > resolved:
            dl.retryable_tasks.add(task_id)
        if shards:
            dl.shards_by_task[task_id] = sorted(shards)
    done = len(folders) - len(facts.incomplete)
    facts.rows += [
        ("tasks with output", f"{done:,} of {len(folders):,}"),
        ("URLs tried", fmt_int(totals["count"])),
        ("images downloaded", fmt_int(totals["successes"])
         + (f" ({totals['successes'] / totals['count']:.1%})" if totals["count"] else "")),
        ("failed to download", fmt_int(totals["failed_to_download"])),
        ("failed to resize", fmt_int(totals["failed_to_resize"])),
        ("tars", f"{tar_count:,} ({fmt_bytes(tar_bytes)})"),
    ]
    # the status mix comes from the stats' own counters, which every shard has
    for status, key in (("success", "successes"), ("failed_to_download", "failed_to_download"),
                        ("failed_to_resize", "failed_to_resize")):
        if totals[key]:
            dl.status_counts[status] = totals[key]


def _count_status_dict(status_dict: dict[str, Any], dl: DownloadFacts) -> None:
    """Failure reasons from img2dataset's ``status_dict`` (``{"success": n, "<error message>": n, ...}``):
    cheap at any scale, no parquet read."""
    for reason, count in status_dict.items():
        if reason != "success" and isinstance(count, int) and count > 0:
            dl.error_counts[" ".join(str(reason).split())[:100]] += count


def _collect_statuses(parquet_path: Path | str, dl: DownloadFacts) -> None:
    from .. import tario  # noqa: PLC0415
    from ..storage import is_url  # noqa: PLC0415

    if not tario.exists(parquet_path):
        return
    try:
        source = pa.BufferReader(tario.read_bytes(parquet_path)) if is_url(parquet_path) else parquet_path
        table = pq.read_table(source, columns=["status", "error_message"])
    except Exception:
        log.warning("report: cannot read status columns of %s", parquet_path)
        return
    statuses = table.column("status").to_pylist()
    errors = table.column("error_message").to_pylist()
    for status, error in zip(statuses, errors):
        status = status or "unknown"
        if status != "success":
            reason = " ".join(str(error or status).split())
            dl.error_counts[reason[:100]] += 1


def _collect_tar_stage(cfg: PipelineConfig, name: str, facts: StageFacts) -> None:
    block = cfg.stage(name)
    out = str(block.output_dir)  # a path or a URL (a Path would fold s3:// to s3:/)
    facts.output = out
    selection = block.task_selection
    facts.task_count, facts.task_ids = selection.task_count, selection.task_ids
    stage = precache_encodings if name == "precache_encodings" else reorganize_tar
    state = stage.output_state(cfg, selection.task_count)
    if state.nothing_to_do is not None:  # precache: only the short tar, left out
        facts.notes.append(f"nothing to encode: {block.input_dir} holds only the short tar marked "
                           ".INCOMPLETE (fewer samples than tar_chunk_size "
                           f"{block.tar_chunk_size:,}); set {name}.process_incomplete_tars: true to "
                           "encode it, or lower tar_chunk_size")
        return
    tars, unlisted = state.tars, state.unlisted
    facts.incomplete.update((t, why) for t, why in state.incomplete.items() if t in selection.task_ids)
    facts.tars = list(tars)
    if not tars and not unlisted:
        facts.notes.append(f"no tars in {out} (stage not run yet, or failed)")
        return
    samples = sum(t.sample_count for t in tars)
    chunk = block.tar_chunk_size
    short_tars = [t for t in tars if t.sample_count < chunk]
    marked = state.marked
    facts.rows += [("tars with manifest", fmt_int(len(tars))), ("samples", fmt_int(samples)),
                   ("bytes", fmt_bytes(sum(t.size for t in tars))),
                   (f"short tars (< tar_chunk_size {chunk:,})", fmt_int(len(short_tars))),
                   ("marked .INCOMPLETE (not listed in wdinfo as full)", fmt_int(len(marked)))]
    unmarked_short = [t.name for t in short_tars if t.name not in marked]
    if unmarked_short:
        facts.notes.append(f"{len(unmarked_short)} tar(s) hold fewer than tar_chunk_size samples without an "
                           f".INCOMPLETE mark: {', '.join(unmarked_short[:5])}")
    if unlisted:
        facts.notes.append(f"{len(unlisted)} tar(s) without a current manifest (being written, or written "
                           f"by an interrupted task): {', '.join(unlisted[:5])}")


def _collect_wdinfo(cfg: PipelineConfig, facts: StageFacts) -> None:
    check = generate_wdinfo.check_output(cfg)
    facts.output, facts.task_count, facts.task_ids = str(check.path), 1, [0]
    if check.info is None:
        facts.notes.append(check.detail or "")
        facts.incomplete[0] = check.problem or "?"
        return
    info = check.info
    tar_files = list(info["tar_files"])
    missing = generate_wdinfo.listed_but_missing(cfg, info)
    facts.rows += [("tar_files", fmt_int(len(tar_files))), ("chunk_size", fmt_int(info["chunk_size"])),
                   ("total_key_count", fmt_int(info["total_key_count"])),
                   ("listed tars not found", fmt_int(len(missing)))]
    if len(tar_files) * int(info["chunk_size"]) != int(info["total_key_count"]):
        facts.notes.append("total_key_count is not len(tar_files) × chunk_size: NeMo's sampler assumes it is")
    if missing:
        facts.notes.append(f"listed but not found under {cfg.generate_wdinfo.input_dir}: {', '.join(missing[:5])}")
    extra = sorted(set(info) - generate_wdinfo.NEMO_KEYS)
    if extra:
        facts.rows.append(("extra keys (NeMo ignores them)", ", ".join(map(str, extra))))


# --------------------------------------------------------------------------------------------------------
# All stages
# --------------------------------------------------------------------------------------------------------


def collect(cfg: PipelineConfig) -> tuple[list[StageFacts], DownloadFacts]:
    """Facts of every stage in pipeline order (disabled ones included, marked so) and download's details."""
    stages: list[StageFacts] = []
    dl = DownloadFacts()
    for name in STAGE_NAMES:
        facts = StageFacts(name, enabled=getattr(cfg, name) is not None)
        stages.append(facts)
        if not facts.enabled:
            continue
        try:
            if name == "download_parquet":
                _collect_download_parquet(cfg, facts)
            elif name == "download_images":
                _collect_download_images(cfg, facts, dl)
            elif name in ("reorganize_tar", "precache_encodings"):
                _collect_tar_stage(cfg, name, facts)
            else:
                _collect_wdinfo(cfg, facts)
        except Exception as exc:  # one unreadable stage must not cost the whole report
            log.exception("report: cannot collect %s", name)
            facts.notes.append(f"could not read this stage's outputs: {type(exc).__name__}: {exc}")
    return stages, dl


def failed_tasks(stages: list[StageFacts], task_states: Mapping[str, Mapping[int, str]] | None
                 ) -> dict[str, dict[int, str]]:
    """Stage → {task id: why} to redo: Airflow's states where given (authoritative), plus what the disk
    shows is missing."""
    failed: dict[str, dict[int, str]] = {}
    for facts in stages:
        if not facts.enabled:
            continue
        reasons = dict(facts.incomplete)
        for task_id, state in (task_states or {}).get(facts.name, {}).items():
            if state in FAILED_STATES:
                reasons[int(task_id)] = f"Airflow state {state}" + (
                    f"; {reasons[int(task_id)]}" if int(task_id) in reasons else "")
        if facts.task_ids is not None:
            reasons = {t: r for t, r in reasons.items() if facts.task_count is None or t < facts.task_count}
        if reasons:
            failed[facts.name] = reasons
    return failed
