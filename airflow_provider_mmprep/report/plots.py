"""The report's plots: matplotlib (Agg), each a PNG ``data:`` URI, or None when there is nothing to draw.

Embedded as base64 so the page stays one file that can be copied off a cluster and opened anywhere.
matplotlib is imported on the first plot: a caller that cannot import it leaves the plots out.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

from .facts import DownloadFacts, StageFacts

#: More tasks than this and the per-task throughput plot shows the aggregate only (a legend of 1000 is noise).
MAX_TASK_LINES = 12
TOP_ERRORS = 12


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

