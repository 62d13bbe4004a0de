"""Run report: one self-contained ``report.html`` that says what a pipeline run produced and what to redo.

Everything is read from the files the stages leave on disk, so the report can be written at the end of a
run, after a partial run, or later by hand (``mmprep report CONFIG``):

- download_parquet: the parquet parts (row counts from parquet footers, no data read);
- download_images: img2dataset-style ``{shard:05d}_stats.json`` (counts, start/end times) and
  ``{shard:05d}.parquet`` (``status``, ``error_message``) under ``output_dir/<part>/``, one part per task;
- reorganize_tar / precache_encodings: per-tar ``<tar>.manifest.json`` sidecars (:mod:`.manifest`);
- generate_wdinfo: ``wdinfo.pkl`` (loaded with an unpickler that admits no classes at all).

Plots are PNGs embedded as base64 so the page is one file that can be copied off a cluster and opened
anywhere; no script runs in it. A disabled stage or one whose outputs are missing is said so on the page,
never an error: the report is most useful exactly when a run went wrong. Nothing here imports Airflow.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.parquet as pq

from .config import STAGE_NAMES, PipelineConfig
from .fsutil import atomic_write_bytes
from .manifest import INCOMPLETE_SUFFIX, MANIFEST_SUFFIX, load_current_manifest
from .plan import compact_ranges, list_parquet_parts, part_name
from .safepickle import safe_loads_plain

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
#: Airflow task-instance states that mean "this map index needs to run again".
FAILED_STATES = frozenset({"failed", "upstream_failed", "removed"})
#: More tasks than this and the per-task throughput plot shows the aggregate only (a legend of 1000 is noise).
MAX_TASK_LINES = 12
TOP_ERRORS = 12
#: Suffix NeMo (and our reorganize_tar) gives a short last tar so loaders do not take it for a full one.
TAR_SUFFIXES = (".tar", ".tar" + INCOMPLETE_SUFFIX)
#: Per-task `mmprep run` lines shown per stage; the `mmprep clear` line always covers every failed task.
MAX_RUN_LINES = 50


# --------------------------------------------------------------------------------------------------------
# Collected facts
# --------------------------------------------------------------------------------------------------------


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


def _fmt_int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _fmt_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value} B"


def _stage_tars(folder: Path, default_task: dict[str, int] | None = None
                ) -> tuple[list[tuple[str, int, int, float, int | None]], list[str]]:
    """Tars directly in ``folder`` with their manifest facts; returns (tars, names of tars lacking one)."""
    tars, unlisted = [], []
    if not folder.is_dir():
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
        manifest, mtime = loaded
        task = manifest.get("task_id")
        if task is None and default_task:
            task = default_task.get(entry.name)
        tars.append((entry.name, int(manifest["sample_count"]), tar_size, mtime,
                     int(task) if task is not None else None))
    return tars, unlisted


# --------------------------------------------------------------------------------------------------------
# Per-stage collectors
# --------------------------------------------------------------------------------------------------------


def _collect_download_parquet(cfg: PipelineConfig, facts: StageFacts) -> None:
    block = cfg.download_parquet
    parts = list_parquet_parts(block.output_dir, block.parquet_pattern)
    facts.output, facts.task_count, facts.task_ids = str(block.output_dir), 1, [0]
    if not parts:
        facts.notes.append(f"no parquet files matching {block.parquet_pattern!r} in {block.output_dir} "
                           "(stage not run yet, or failed)")
        facts.incomplete[0] = "no parquet output"
        return
    rows = 0
    unreadable = []
    for part in parts:
        try:
            rows += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # a truncated file must not stop the report
            unreadable.append(part.name)
    facts.rows += [("parquet parts", _fmt_int(len(parts))), ("URL rows", _fmt_int(rows)),
                   ("bytes", _fmt_bytes(sum(p.stat().st_size for p in parts)))]
    if unreadable:
        facts.notes.append(f"unreadable parquet files: {', '.join(unreadable[:5])}")
        facts.incomplete[0] = "unreadable parquet output"


def _download_task_folders(cfg: PipelineConfig) -> tuple[list[Path], list[Path | None], str | None]:
    """One output folder per download_images task, in task order (the plan's order of parquet parts), with
    the task's input part where it still exists."""
    block = cfg.download_images
    parts = list_parquet_parts(block.input_dir, block.parquet_pattern)
    if parts:
        return [Path(block.output_dir) / part_name(block.input_dir, p) for p in parts], list(parts), None
    out = Path(block.output_dir)
    if out.is_dir():  # inputs gone (cleaned up): fall back to the folders present, in name order
        folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
        return folders, [None] * len(folders), (
            f"input parquet parts not found in {block.input_dir}; task ids below follow the output folders' "
            "name order")
    return [], [], None


def _parquet_rows(path: Path | None) -> int | None:
    """Row count from the parquet footer (no data read), or None if unknown."""
    if path is None:
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


def _collect_download_images(cfg: PipelineConfig, facts: StageFacts, dl: DownloadFacts) -> None:
    block = cfg.download_images
    facts.output = str(block.output_dir)
    folders, inputs, note = _download_task_folders(cfg)
    if note:
        facts.notes.append(note)
    facts.task_count, facts.task_ids = len(folders), list(range(len(folders)))
    if not folders:
        facts.notes.append(f"no parquet parts in {block.input_dir} and no output in {block.output_dir}: "
                           "nothing to report (stage not run yet)")
        return
    totals: Counter = Counter()
    tar_count = tar_bytes = 0
    for task_id, folder in enumerate(folders):
        stats_files = sorted(folder.glob("[0-9]*_stats.json")) if folder.is_dir() else []
        if not stats_files:
            facts.incomplete[task_id] = f"no *_stats.json in {folder.name}/"
            continue
        shards = []
        tried_before, ok_before = totals["count"], totals["successes"]
        transient, resolved, unknown_transient = 0, 0, False
        for stats_file in stats_files:
            try:
                stats = json.loads(stats_file.read_text())
            except ValueError:
                facts.incomplete[task_id] = f"{stats_file.name} is not valid JSON"
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
            shard = stats_file.name[: -len("_stats.json")]
            tar = folder / f"{shard}.tar"
            if tar.is_file():
                tar_count += 1
                tar_bytes += tar.stat().st_size
            elif int(stats.get("successes", 0)) > 0:
                facts.incomplete[task_id] = f"{shard}_stats.json present but {shard}.tar missing"
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
                _count_status_dict(status_dict, stats, dl)
            else:  # no status_dict: read the two status columns of the shard's parquet
                _collect_statuses(folder / f"{shard}.parquet", task_id, dl)
        if unknown_transient or transient > resolved:
            dl.retryable_tasks.add(task_id)
        if shards:
            dl.shards_by_task[task_id] = sorted(shards)
        expected = _parquet_rows(inputs[task_id])
        tried = totals["count"] - tried_before
        succeeded = totals["successes"] - ok_before
        if expected is not None and tried < expected:  # a task stopped part-way (crash, pod evicted)
            facts.incomplete.setdefault(task_id, f"{tried:,} of {expected:,} URLs of its part have a status")
        elif tried and (succeeded == 0 or (tried - succeeded) / tried > block.max_failed_share):
            # the task itself failed on this (see download_images.max_failed_share)
            facts.incomplete.setdefault(task_id, f"{tried - succeeded:,} of {tried:,} URLs failed "
                                                 f"(max_failed_share {block.max_failed_share:g})")
    done = len(folders) - len(facts.incomplete)
    facts.rows += [
        ("tasks with output", f"{done:,} of {len(folders):,}"),
        ("URLs tried", _fmt_int(totals["count"])),
        ("images downloaded", _fmt_int(totals["successes"])
         + (f" ({totals['successes'] / totals['count']:.1%})" if totals["count"] else "")),
        ("failed to download", _fmt_int(totals["failed_to_download"])),
        ("failed to resize", _fmt_int(totals["failed_to_resize"])),
        ("tars", f"{tar_count:,} ({_fmt_bytes(tar_bytes)})"),
    ]
    # the status mix comes from the stats' own counters, which every shard has
    for status, key in (("success", "successes"), ("failed_to_download", "failed_to_download"),
                        ("failed_to_resize", "failed_to_resize")):
        if totals[key]:
            dl.status_counts[status] = totals[key]


def _count_status_dict(status_dict: dict[str, Any], stats: dict[str, Any], dl: DownloadFacts) -> None:
    """Failure reasons from img2dataset's ``status_dict`` (``{"success": n, "<error message>": n, ...}``):
    cheap at any scale, no parquet read."""
    for reason, count in status_dict.items():
        if reason != "success" and isinstance(count, int) and count > 0:
            dl.error_counts[" ".join(str(reason).split())[:100]] += count


def _collect_statuses(parquet_path: Path, task_id: int, dl: DownloadFacts) -> None:
    if not parquet_path.is_file():
        return
    try:
        table = pq.read_table(parquet_path, columns=["status", "error_message"])
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
    out = Path(block.output_dir)
    facts.output = str(out)
    selection = block.task_selection
    facts.task_count, facts.task_ids = selection.task_count, selection.task_ids
    # precache keeps tar names (one output tar per input tar): the stage says which inputs each task owns
    # (leaving out the short .INCOMPLETE tar unless it is configured to encode it); manifests that record
    # their own task_id take precedence.
    owner: dict[str, int] = {}
    has_input = Path(block.input_dir).is_dir() and any(Path(block.input_dir).glob("*.tar*"))
    if name == "precache_encodings" and has_input:
        from .stages.precache_encodings import task_inputs

        for task_id, owned in enumerate(task_inputs(block, selection.task_count)[0]):
            owner.update((tar.name, task_id) for tar in owned)
        if not owner:
            facts.notes.append(f"nothing to encode: {block.input_dir} holds only the short tar marked "
                               f"{INCOMPLETE_SUFFIX} (fewer samples than tar_chunk_size "
                               f"{block.tar_chunk_size:,}); set {name}.process_incomplete_tars: true to "
                               "encode it, or lower tar_chunk_size")
            return
    tars, unlisted = _stage_tars(out, owner)
    facts.tars = tars
    if not tars and not unlisted:
        facts.notes.append(f"no tars in {out} (stage not run yet, or failed)")
        for task_id in selection.task_ids:
            facts.incomplete[task_id] = "no output tars"
        return
    samples = sum(t[1] for t in tars)
    chunk = block.tar_chunk_size
    short = [t for t in tars if t[1] < chunk]
    marked = [t[0] for t in tars if t[0].endswith(INCOMPLETE_SUFFIX)]
    marked += sorted(p.name[: -len(INCOMPLETE_SUFFIX)] for p in out.glob("*.tar" + INCOMPLETE_SUFFIX)
                     if p.stat().st_size == 0)
    facts.rows += [("tars with manifest", _fmt_int(len(tars))), ("samples", _fmt_int(samples)),
                   ("bytes", _fmt_bytes(sum(t[2] for t in tars))),
                   (f"short tars (< tar_chunk_size {chunk:,})", _fmt_int(len(short))),
                   ("marked .INCOMPLETE (not listed in wdinfo as full)", _fmt_int(len(marked)))]
    unmarked_short = [t[0] for t in short if t[0] not in marked and t[0] + INCOMPLETE_SUFFIX not in marked
                      and not t[0].endswith(INCOMPLETE_SUFFIX)]
    if unmarked_short:
        facts.notes.append(f"{len(unmarked_short)} tar(s) hold fewer than tar_chunk_size samples without an "
                           f".INCOMPLETE mark: {', '.join(unmarked_short[:5])}")
    if unlisted:
        facts.notes.append(f"{len(unlisted)} tar(s) without a current manifest (being written, or written "
                           f"by an interrupted task): {', '.join(unlisted[:5])}")
    if name == "precache_encodings" and owner:
        done_names = {t[0] for t in tars}
        for tar_name, task_id in owner.items():
            if tar_name not in done_names and task_id in selection.task_ids:
                facts.incomplete.setdefault(task_id, f"input {tar_name} has no finished output tar")
    elif any(t[4] is not None for t in tars):
        seen = {t[4] for t in tars}
        for task_id in selection.task_ids:
            if task_id not in seen:
                facts.incomplete[task_id] = "no output tar records this task"


def _collect_wdinfo(cfg: PipelineConfig, facts: StageFacts) -> dict[str, Any] | None:
    block = cfg.generate_wdinfo
    path = Path(block.output_wdinfo_path)
    facts.output, facts.task_count, facts.task_ids = str(path), 1, [0]
    if not path.is_file():
        facts.notes.append(f"{path} not found (stage not run yet, or failed)")
        facts.incomplete[0] = "no wdinfo.pkl"
        return None
    try:
        info = safe_loads_plain(path.read_bytes())  # plain data only: a tampered file can't run code
    except Exception as exc:
        facts.notes.append(f"{path} cannot be read: {exc}")
        facts.incomplete[0] = "unreadable wdinfo.pkl"
        return None
    if not isinstance(info, dict) or not {"tar_files", "chunk_size", "total_key_count"} <= set(info):
        facts.notes.append(f"{path} lacks tar_files/chunk_size/total_key_count")
        facts.incomplete[0] = "wdinfo.pkl without the keys NeMo reads"
        return None
    tar_files = list(info["tar_files"])
    roots = [Path(block.input_dir), path.parent]
    missing = [t for t in tar_files if not any((root / t).is_file() for root in roots)]
    facts.rows += [("tar_files", _fmt_int(len(tar_files))), ("chunk_size", _fmt_int(info["chunk_size"])),
                   ("total_key_count", _fmt_int(info["total_key_count"])),
                   ("listed tars not found", _fmt_int(len(missing)))]
    if len(tar_files) * int(info["chunk_size"]) != int(info["total_key_count"]):
        facts.notes.append("total_key_count is not len(tar_files) × chunk_size: NeMo's sampler assumes it is")
    if missing:
        facts.notes.append(f"listed but not found under {roots[0]}: {', '.join(missing[:5])}")
    extra = sorted(set(info) - {"tar_files", "chunk_size", "total_key_count"})
    if extra:
        facts.rows.append(("extra keys (NeMo ignores them)", ", ".join(map(str, extra))))
    return info


# --------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg; each returns a data: URI or None when there is nothing to draw)
# --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STATUS_COLOURS = {"success": "#2e7d32", "failed_to_download": "#c62828", "failed_to_resize": "#ef6c00"}


def plot_status_mix(dl: DownloadFacts) -> str | None:
    if not dl.status_counts:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
    labels = sorted(dl.status_counts, key=lambda s: (s != "success", s))
    values = [dl.status_counts[s] for s in labels]
    bars = axes[0].barh(labels, values, color=[_STATUS_COLOURS.get(s, "#607d8b") for s in labels])
    axes[0].bar_label(bars, labels=[f"{v:,} ({v / sum(values):.0%})" for v in values], padding=3)
    axes[0].set_title("download status (URLs)")
    axes[0].invert_yaxis()
    axes[0].set_xlim(0, max(values) * 1.35)
    if dl.error_counts:
        top = dl.error_counts.most_common(TOP_ERRORS)[::-1]
        axes[1].barh([r if len(r) <= 48 else r[:45] + "…" for r, _ in top], [c for _, c in top],
                     color="#c62828")
        axes[1].set_title("failures by reason (top error messages)")
        axes[1].tick_params(axis="y", labelsize=8)
    else:
        axes[1].text(0.5, 0.5, "no failed URLs", ha="center", va="center")
        axes[1].set_axis_off()
    fig.tight_layout()
    return _png_uri(fig)


def plot_download_throughput(dl: DownloadFacts) -> str | None:
    """Images/s of each shard, drawn at the shard's end time, one line per task (aggregate when many)."""
    if not dl.shards_by_task:
        return None
    plt = _pyplot()
    t0 = min(s[0] for shards in dl.shards_by_task.values() for s in shards)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    if len(dl.shards_by_task) <= MAX_TASK_LINES:
        for task_id, shards in sorted(dl.shards_by_task.items()):
            xs = [(s[1] - t0) / 60 for s in shards]
            ys = [s[2] / max(s[1] - s[0], 1e-6) for s in shards]
            ax.plot(xs, ys, marker="o", label=f"task {task_id}")
        ax.legend(fontsize=8, ncol=min(4, len(dl.shards_by_task)))
    else:
        ends = sorted((s[1], s[2]) for shards in dl.shards_by_task.values() for s in shards)
        xs, ys, cumulative = [], [], 0
        for end, successes in ends:
            cumulative += successes
            xs.append((end - t0) / 60)
            ys.append(cumulative)
        ax.step(xs, ys, where="post")
        ax.set_ylabel("images downloaded (all tasks)")
        ax.set_title(f"{len(dl.shards_by_task)} tasks: cumulative images over time")
    if len(dl.shards_by_task) <= MAX_TASK_LINES:
        ax.set_ylabel("images/s per shard")
        ax.set_title("download_images throughput per task")
    ax.set_xlabel("minutes since the first shard started")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_uri(fig)


def plot_tar_throughput(stages: Sequence[StageFacts]) -> str | None:
    """Per tar stage: cumulative samples over time (manifest times), each tar's point coloured by the task
    that wrote it where manifests or the input order say so (one legend entry per task up to a dozen)."""
    with_tars = [s for s in stages if s.tars]
    if not with_tars:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(with_tars), figsize=(11, 3.4), squeeze=False)
    for ax, stage in zip(axes[0], with_tars):
        ordered = sorted(stage.tars, key=lambda t: t[3])
        t0 = ordered[0][3]
        xs, ys, tasks, cumulative = [], [], [], 0
        for _, samples, _, mtime, task in ordered:
            cumulative += samples
            xs.append((mtime - t0) / 60)
            ys.append(cumulative)
            tasks.append(task)
        ax.step(xs, ys, where="post", color="#9e9e9e", linewidth=1, label="all tasks")
        known = sorted({t for t in tasks if t is not None})
        if known and len(known) <= MAX_TASK_LINES:
            for task in known:
                ax.plot([x for x, t in zip(xs, tasks) if t == task], [y for y, t in zip(ys, tasks) if t == task],
                        "o", markersize=5, label=f"task {task}")
        else:
            ax.plot(xs, ys, "o", markersize=3, color="#1565c0")
        ax.set_title(f"{stage.name}: samples written ({len(known) or '?'} tasks)")
        ax.set_xlabel("minutes since its first finished tar")
        ax.set_ylabel("samples (cumulative)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png_uri(fig)


def plot_shard_sizes(stages: Sequence[StageFacts], chunk_sizes: Mapping[str, int]) -> str | None:
    """Samples and MB per tar, one colour per stage on shared bins (so small tars stay visible)."""
    import numpy as np

    with_tars = [s for s in stages if s.tars]
    if not with_tars:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, column, scale in ((axes[0], 1, 1), (axes[1], 2, 1e6)):
        series = [[t[column] / scale for t in s.tars] for s in with_tars]
        edges = np.histogram_bin_edges(np.concatenate(series), bins=20)
        ax.hist(series, bins=edges, label=[s.name for s in with_tars])
    for name, chunk in chunk_sizes.items():
        if any(s.name == name for s in with_tars):
            axes[0].axvline(chunk, color="k", linestyle="--", linewidth=1)
    axes[0].set_title("samples per tar (dashed: tar_chunk_size)")
    axes[1].set_title("MB per tar")
    for ax in axes:
        ax.set_ylabel("tars")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_uri(fig)


# --------------------------------------------------------------------------------------------------------
# Resume commands
# --------------------------------------------------------------------------------------------------------


def resume_commands(cfg: PipelineConfig, failed: Mapping[str, Sequence[int]], task_counts: Mapping[str, int],
                    *, overrides: Sequence[str] = (), dag_id: str | None = None, run_id: str | None = None,
                    extra_overrides: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Shell lines that rerun exactly the failed tasks: per task with ``mmprep run``, per stage with
    ``mmprep clear`` (Airflow: clears those map indices so the scheduler reruns them)."""
    config = str(cfg.source_path or "download_multimodal.yaml")
    lines = []
    for stage in STAGE_NAMES:
        ids = sorted(set(failed.get(stage, ())))
        if not ids:
            continue
        base = ["mmprep", "run", config, *overrides, *(extra_overrides or {}).get(stage, ())]
        for task_id in ids[:MAX_RUN_LINES]:
            lines.append(shlex.join([*base, "--stage", stage, "--task-id", str(task_id),
                                     "--task-count", str(task_counts[stage])]))
        if len(ids) > MAX_RUN_LINES:
            lines.append(f"# ... {len(ids) - MAX_RUN_LINES} more {stage} tasks: "
                         f"{compact_ranges(ids[MAX_RUN_LINES:])}")
        lines.append(shlex.join(["mmprep", "clear", dag_id or cfg.run.name, run_id or "RUN_ID",
                                 "--stage", stage, "--task-ids", compact_ranges(ids)]))
    return lines


# --------------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1080px;
color:#1f2328;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
.meta{color:#57606a}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;
padding:4px 10px;text-align:left;vertical-align:top}th{background:#f6f8fa}td.num{text-align:right}
.off{color:#57606a;font-style:italic}.bad{color:#c62828;font-weight:600}.ok{color:#2e7d32;font-weight:600}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;margin:6px 0;border-radius:4px}
pre{background:#f6f8fa;padding:10px;white-space:pre-wrap;border-radius:4px}img{max-width:100%}
"""


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return "".join(out) + "</table>"


def _img(uri: str | None, alt: str, missing: str) -> str:
    if uri is None:
        return f'<p class="off">{html.escape(missing)}</p>'
    return f'<p><img alt="{html.escape(alt)}" src="{uri}"></p>'


def default_report_path(cfg: PipelineConfig) -> Path:
    """``report.html`` next to wdinfo.pkl; without generate_wdinfo, in the last enabled stage's output."""
    if cfg.generate_wdinfo is not None:
        return Path(cfg.generate_wdinfo.output_wdinfo_path).parent / REPORT_NAME
    for name in reversed(cfg.enabled_stages):
        out = getattr(cfg.stage(name), "output_dir", None)
        if out is not None:
            return Path(out).parent / REPORT_NAME
    if cfg.dataset_output_root is not None:
        return Path(cfg.dataset_output_root) / REPORT_NAME
    raise ValueError("no enabled stage has an output folder to put report.html beside")


def build_report_html(cfg: PipelineConfig, *, task_states: Mapping[str, Mapping[int, str]] | None = None,
                      overrides: Sequence[str] = (), dag_id: str | None = None,
                      run_id: str | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
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

    # Failed tasks: Airflow's states where given (authoritative), plus what the disk shows is missing.
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
    task_counts = {f.name: f.task_count or 1 for f in stages}

    chunk_sizes = {n: cfg.stage(n).tar_chunk_size for n in ("reorganize_tar", "precache_encodings")
                   if getattr(cfg, n) is not None}
    plot_problems: list[str] = []

    def plot(function: Any, *args: Any) -> str | None:
        # A plot that cannot be drawn costs that plot, never the report.
        try:
            return function(*args)
        except ImportError:
            plot_problems.append("matplotlib is not installed: plots are left out (pip install matplotlib).")
        except Exception as exc:
            log.exception("report: %s failed", function.__name__)
            plot_problems.append(f"{function.__name__} failed: {type(exc).__name__}: {exc}")
        return None

    status_png = plot(plot_status_mix, dl)
    throughput_png = plot(plot_download_throughput, dl)
    tar_throughput_png = plot(plot_tar_throughput, stages)
    sizes_png = plot(plot_shard_sizes, stages, chunk_sizes)
    plot_note = " ".join(dict.fromkeys(plot_problems)) or None

    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>mmprep report: "
             f"{esc(cfg.run.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>mmprep run report: {esc(cfg.run.name)}</h1>",
             f'<p class=meta>config {esc(str(cfg.source_path or "?"))}'
             + (f" · DAG run {esc(run_id)}" if run_id else "")
             + f" · written {esc(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}</p>"]
    if plot_note:
        parts.append(f"<p class=note>{esc(plot_note)}</p>")

    # Overview: one row per stage.
    overview = []
    for facts in stages:
        if not facts.enabled:
            overview.append([esc(facts.name), '<span class=off>disabled in this config</span>', "", ""])
            continue
        bad = failed.get(facts.name, {})
        state = (f'<span class=bad>{len(bad)} task(s) to redo: {esc(compact_ranges(list(bad)))}</span>'
                 if bad else '<span class=ok>complete</span>')
        tasks = "?" if facts.task_count is None else f"{len(facts.task_ids or []):,} of {facts.task_count:,}"
        overview.append([esc(facts.name), state, esc(tasks), esc(facts.output or "")])
    parts += ["<h2>Stages</h2>", _table(overview, ["stage", "state", "tasks", "output"])]

    for facts in stages:
        parts.append(f"<h3>{esc(facts.name)}</h3>")
        if not facts.enabled:
            parts.append(f'<p class=off>Disabled ({esc(facts.name)}.enable: false); nothing to report.</p>')
            continue
        if facts.rows:
            parts.append(_table([[esc(k), f"<span>{esc(v)}</span>"] for k, v in facts.rows]))
        for note in facts.notes:
            parts.append(f"<p class=note>{esc(note)}</p>")

    parts.append("<h2>Download status and failures by reason</h2>")
    parts.append(_img(status_png, "download status mix",
                      "No download_images status data (stage disabled or not run)."))
    if dl.error_counts:
        parts.append(_table([[esc(r), f"{c:,}"] for r, c in dl.error_counts.most_common(TOP_ERRORS)],
                            ["error message", "URLs"]))
    parts.append("<h2>Throughput</h2>")
    parts.append(_img(throughput_png, "download throughput per task",
                      "No download_images shard timings (stats files absent)."))
    parts.append(_img(tar_throughput_png, "tar stages throughput",
                      "No manifests from reorganize_tar / precache_encodings yet."))
    parts.append("<h2>Shard sizes</h2>")
    parts.append(_img(sizes_png, "shard size histogram", "No tars with manifests yet."))

    parts.append("<h2>Resume</h2>")
    if failed:
        rows = [[esc(stage), str(task_id), esc(reason)]
                for stage, reasons in failed.items() for task_id, reason in sorted(reasons.items())]
        parts.append(_table(rows[:200], ["stage", "task id", "why"]))
        if len(rows) > 200:
            parts.append(f"<p class=note>{len(rows) - 200:,} more not listed.</p>")
        lines = resume_commands(cfg, {s: list(r) for s, r in failed.items()}, task_counts,
                                overrides=overrides, dag_id=dag_id, run_id=run_id)
        parts.append("<p>Rerun each failed task by hand (same config and overrides), or clear them in "
                     "Airflow so the scheduler reruns those map indices:</p>")
        parts.append(f"<pre>{esc(chr(10).join(lines))}</pre>")
    else:
        parts.append("<p class=ok>No failed or missing tasks found.</p>")
    if dl.retryable_tasks:
        ids = sorted(dl.retryable_tasks)
        retry = resume_commands(cfg, {"download_images": ids}, task_counts, overrides=overrides,
                                dag_id=dag_id, run_id=run_id,
                                extra_overrides={"download_images": ["download_images.retry_failed=true"]})
        parts.append(f"<p>{len(ids):,} download task(s) finished with failed URLs. To retry only those URLs "
                     "(<code>download_images.retry_failed=true</code>), then rerun the later stages:</p>")
        retry_lines = [line for line in retry if not line.startswith("mmprep clear")]
        parts.append(f"<pre>{esc(chr(10).join(retry_lines))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(cfg: PipelineConfig, out_path: str | Path | None = None, *,
                 task_states: Mapping[str, Mapping[int, str]] | None = None, overrides: Sequence[str] = (),
                 dag_id: str | None = None, run_id: str | None = None) -> Path:
    """Write the run report (atomically) and return its path; default: ``report.html`` beside wdinfo.pkl.

    ``task_states`` (stage → {map index: Airflow state}) lets the DAG's final task add what Airflow knows;
    ``overrides`` are repeated in the resume commands so they rebuild the same config.
    """
    path = Path(out_path) if out_path is not None else default_report_path(cfg)
    page = build_report_html(cfg, task_states=task_states, overrides=overrides, dag_id=dag_id, run_id=run_id)
    atomic_write_bytes(path, page.encode("utf-8"))
    log.info("report written to %s", path)
    return path
