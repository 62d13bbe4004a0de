"""The report page: one self-contained ``report.html`` from the collected facts, plots and resume commands.

No script runs in it. A disabled stage or one whose outputs are missing is said so on the page, never an
error: the report is most useful exactly when a run went wrong.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import PipelineConfig
from ..fsutil import atomic_write_bytes
from ..storage import Store, is_url
from ..task_ids import compact_ranges
from .facts import collect, failed_tasks
from .plots import TOP_ERRORS, plot_download_throughput, plot_shard_sizes, plot_status_mix, plot_tar_throughput
from .resume import resume_commands

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"

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


def _beside(path: str | Path, name: str) -> Path | str:
    """``name`` in the folder of ``path``: a URL stays a URL (a ``Path`` would fold its ``//``)."""
    if is_url(str(path)):
        return str(path).rstrip("/").rpartition("/")[0] + "/" + name
    return Path(path).parent / name


def default_report_path(cfg: PipelineConfig) -> Path | str:
    """``report.html`` next to wdinfo.pkl; without generate_wdinfo, in the last enabled stage's output's
    parent (a URL where that is one)."""
    if cfg.generate_wdinfo is not None:
        return _beside(cfg.generate_wdinfo.output_wdinfo_path, REPORT_NAME)
    for name in reversed(cfg.enabled_stages):
        out = getattr(cfg.stage(name), "output_dir", None)
        if out is not None:
            return _beside(out, REPORT_NAME)
    if cfg.dataset_output_root is not None:
        root = cfg.dataset_output_root
        return f"{str(root).rstrip('/')}/{REPORT_NAME}" if is_url(str(root)) else Path(root) / REPORT_NAME
    raise ValueError("no enabled stage has an output folder to put report.html beside")


def build_report_html(cfg: PipelineConfig, *, task_states: Mapping[str, Mapping[int, str]] | None = None,
                      overrides: Sequence[str] = (), dag_id: str | None = None,
                      run_id: str | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    stages, dl = collect(cfg)
    failed = failed_tasks(stages, task_states)
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
                 dag_id: str | None = None, run_id: str | None = None) -> Path | str:
    """Write the run report (atomically) and return its path or URL; default: ``report.html`` beside
    wdinfo.pkl.

    ``task_states`` (stage → {map index: Airflow state}) lets the DAG's final task add what Airflow knows;
    ``overrides`` are repeated in the resume commands so they rebuild the same config.
    """
    path: Path | str = default_report_path(cfg) if out_path is None else \
        str(out_path) if is_url(str(out_path)) else Path(out_path)
    page = build_report_html(cfg, task_states=task_states, overrides=overrides, dag_id=dag_id, run_id=run_id)
    if isinstance(path, str):  # object storage: one PUT with the pipeline's storage options
        folder, _, name = path.rpartition("/")
        Store(folder, cfg.storage_options).write_bytes(name, page.encode("utf-8"))
    else:
        atomic_write_bytes(path, page.encode("utf-8"))
    log.info("report written to %s", path)
    return path
