"""Resume commands: the shell lines that rerun exactly the failed tasks of a run."""

from __future__ import annotations

import shlex
from typing import Mapping, Sequence

from ..config import STAGE_NAMES, PipelineConfig
from ..task_ids import compact_ranges, run_arguments

#: Per-task `mmprep run` lines shown per stage; the `mmprep clear` line always covers every failed task.
MAX_RUN_LINES = 50


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
            lines.append(shlex.join([*base, *run_arguments(stage, task_id, task_counts[stage])]))
        if len(ids) > MAX_RUN_LINES:
            lines.append(f"# ... {len(ids) - MAX_RUN_LINES} more {stage} tasks: "
                         f"{compact_ranges(ids[MAX_RUN_LINES:])}")
        lines.append(shlex.join(["mmprep", "clear", dag_id or cfg.run.name, run_id or "RUN_ID",
                                 "--stage", stage, "--task-ids", compact_ranges(ids)]))
    return lines

